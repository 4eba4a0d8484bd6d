#!/usr/bin/env bash
# One device call's worth of GPU work, with logs written under $OUT. Run it on the GPU machine (the
# `device` tool) from the repository root, or from a snapshot of one commit (see bench/NOTES.md,
# "Measurement rules"). The package is used in place (PYTHONPATH), so nothing is installed.
#
#   STEPS="tests kernels" bash bench/device_session.sh   # GPU suite, then per-kernel times
#   STEPS=bench HISA_COMMIT=abc1234 bash bench/device_session.sh   # the run of record
#   STEPS=ab AB_TREES=".snap/main .snap/wip" bash bench/device_session.sh   # A/B of two trees
#   KCACHE_SAVE=1 KCACHE_IN=.kcache/kernels.txz STEPS=tests bash bench/device_session.sh
#       # .kcache/kernels.txz built beforehand without a GPU (bench/precompile_kernels.py --pack;
#       # bench/NOTES.md, "Compile before the call"); what the call still had to compile comes
#       # back as $OUT/kernels.txz: unpack it into the local cache before the next --pack
#
# Steps, in the order given:
#   tests    pytest -m gpu $TEST_PATHS (default tests/gpu), narrowed by TEST_K (pytest -k) when set
#            -> $OUT/gpu_tests.txt  (~370 s on an H200)
#   kernels  bench/profile_run.py --kernels at 128K/4096, 128K/1024 and 32K/4096, dense at
#            128K/4096, and both hisa_cupy.topk shapes      -> $OUT/kernels.txt    (~80 s)
#   ab       the same configurations once per tree of AB_TREES (directories holding a snapshot
#            of the package, e.g. from bench/snapshots.sh), interleaved configuration by
#            configuration so that both trees see the same machine state -> $OUT/ab.txt
#   bench    bench/kernels.py --targets, the grid of the README table -> $OUT/bench/ (~130 s)
#   host     bench/host_profile.py                  -> $OUT/host/          (~30 s)
#   clock    bench/clock_power.py: SM clock and power while hisa_select (128K/4096, 32K/4096) and
#            torch.matmul run back to back, and while hisa_select is timed as the run of record
#            times it (workload `protocol`), 3 s each (is the card at its power limit?)
#                                                   -> $OUT/clock.txt      (~60 s)
#   ncu      Nsight Compute source profiles (NCU_SPECS below, or one NCU_SPEC="kernel|args") of
#            kernels built with -lineinfo                        -> $OUT/ncu.tgz (~40 s each)
# One call may run for at most 600 s: the whole suite and `bench` do not fit together (run part
# of the suite with TEST_PATHS). Each step has its own time limit (TESTS_TIMEOUT, BENCH_TIMEOUT,
# PROFILE_TIMEOUT per configuration), so a slow step cannot swallow the ones after it.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the directory that comes back (the device tool sets it)}"
ROOT=$PWD
STEPS=${STEPS:-"tests kernels"}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$OUT/gpu.txt" 2>&1  # appended: several runs may share one $OUT
echo "commit ${HISA_COMMIT:-unknown}, steps: $STEPS, $(date -u +%FT%TZ)" >> "$OUT/gpu.txt"

# Compiled kernels: one on-disk cache for every step and tree (cupy_backend keys it by a hash of
# the source, so trees share only identical kernels). A fresh machine starts empty, and compiling
# is most of the GPU tests' time, so the cache travels: KCACHE_IN (a tarball carried into the
# call, e.g. .kcache/kernels.txz from bench/precompile_kernels.py --pack, built without a GPU;
# gzip or xz) seeds it, and KCACHE_SAVE=1 packs what this call compiled (the entries the seed did
# not hold) into $OUT/kernels.txz at the end, to be unpacked into the local cache. Only the new
# entries: packing a whole cache of ~300 kernels took the device over 48 s once and was cut off
# by the call's limit. xz, through Python's tarfile ($PACK_PY): the cubins share most of their
# bytes, which xz's window finds (324 kernels, 49 MB, pack into 1.5 MB); skipped above the 16 MiB
# a returned file may have.
PACK_PY=${PACK_PY:-python3}
export HISA_CUPY_CACHE_DIR=${HISA_CUPY_CACHE_DIR:-/tmp/hisa_kernel_cache}
mkdir -p "$HISA_CUPY_CACHE_DIR"
if [ -n "${KCACHE_IN:-}" ]; then
  if "$PACK_PY" - "$KCACHE_IN" "$HISA_CUPY_CACHE_DIR" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:  # gzip or xz
    tar.extractall(sys.argv[2])
PY
  then
    echo "kernel cache: $(find "$HISA_CUPY_CACHE_DIR" -name '*.bin' | wc -l) kernels from $KCACHE_IN" >> "$OUT/gpu.txt"
  else
    echo "kernel cache: could not unpack $KCACHE_IN" >> "$OUT/gpu.txt"
  fi
fi
KCACHE_SEEDED=$(mktemp)  # the cache's files before any step ran: KCACHE_SAVE leaves them out
(cd "$HISA_CUPY_CACHE_DIR" && find . -type f | sort) > "$KCACHE_SEEDED"
save_kernel_cache() {
  [ "${KCACHE_SAVE:-0}" = 1 ] || return 0
  local packed
  packed=$("$PACK_PY" - "$HISA_CUPY_CACHE_DIR" "$OUT/kernels.txz" "$KCACHE_SEEDED" <<'PY'
import os, sys, tarfile
cache, archive, seeded = sys.argv[1:4]
with open(seeded) as f:
    old = {line.strip() for line in f}
new = []
for root, _, files in os.walk(cache):
    for name in files:
        rel = "./" + os.path.relpath(os.path.join(root, name), cache)
        if rel not in old:
            new.append(rel)
with tarfile.open(archive, "w:xz", preset=3) as tar:
    for rel in sorted(new):
        tar.add(os.path.join(cache, rel), arcname=rel[2:])
print(sum(rel.endswith(".bin") for rel in new))
PY
)
  local bytes
  bytes=$(wc -c < "$OUT/kernels.txz")
  if [ "$bytes" -gt $((16 << 20)) ]; then
    rm -f "$OUT/kernels.txz"
    echo "kernel cache: $bytes bytes packed, over 16 MiB: not saved" >> "$OUT/gpu.txt"
  else
    echo "kernel cache: $packed kernels compiled in this call saved to kernels.txz ($bytes bytes)" >> "$OUT/gpu.txt"
  fi
}

CONFIGS=(
  "--op hisa --S 131072 --T 4096"
  "--op hisa --S 131072 --T 1024"
  "--op hisa --S 32768 --T 4096"
  "--op dense --S 131072 --T 4096"
  "--op topk --rows 4096 --cols 8192"
  "--op topk --rows 64 --cols 131072"
)

# the ncu step: "kernel name|profile_run.py arguments"
NCU_SPECS=(
  "topk_regs_kernel|--op topk --rows 4096 --cols 8192"
  "topk_filter_kernel|--op topk --rows 64 --cols 131072"
  "topk_filtered_wide_kernel|--op topk --rows 64 --cols 131072"
)
if [ -n "${NCU_SPEC:-}" ]; then NCU_SPECS=("$NCU_SPEC"); fi
# PROFILE_CONFIGS="cfg1;cfg2" replaces CONFIGS (the kernels and ab steps)
if [ -n "${PROFILE_CONFIGS:-}" ]; then IFS=';' read -r -a CONFIGS <<< "$PROFILE_CONFIGS"; fi

# one configuration through the tree $1's own bench/profile_run.py (which puts its tree first on
# sys.path): the median and the per-kernel GPU times (the profiler's table reduced to name and
# times), each line prefixed with $2
profile() {
  local tree=$1 label=$2; shift 2
  (cd "$tree" && PYTHONPATH="$PWD" timeout "${PROFILE_TIMEOUT:-60}" $PY bench/profile_run.py "$@" \
     --times --kernels --reps 5 2>&1) \
    | grep -E "median|_kernel|Error|error|Traceback" \
    | sed -E -e 's/( +[0-9.]+%)? +0\.000us( +0\.00%)?//g' -e "s|^|$label $* : |"
}

for step in $STEPS; do
  case $step in
    tests)
      # shellcheck disable=SC2086
      PYTHONPATH="$ROOT" timeout "${TESTS_TIMEOUT:-420}" $PY -m pytest -m gpu ${TEST_PATHS:-tests/gpu} ${TEST_K:+-k "$TEST_K"} -q -rf --durations=15 \
        -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
      echo "tests (${TEST_PATHS:-tests/gpu}${TEST_K:+ -k $TEST_K}): exit $?" >> "$OUT/gpu.txt" ;;
    kernels)
      for cfg in "${CONFIGS[@]}"; do
        # shellcheck disable=SC2086
        profile "$ROOT" "" $cfg
      done > "$OUT/kernels.txt"
      echo "kernels: done" >> "$OUT/gpu.txt" ;;
    ab)
      : "${AB_TREES:?set AB_TREES to the snapshot directories to compare}"
      for cfg in "${CONFIGS[@]}"; do
        for tree in $AB_TREES; do
          # shellcheck disable=SC2086
          profile "$tree" "$(basename "$tree")" $cfg
        done
      done > "$OUT/ab.txt"
      echo "ab ($AB_TREES): done" >> "$OUT/gpu.txt" ;;
    bench)
      PYTHONPATH="$ROOT" timeout -s TERM "${BENCH_TIMEOUT:-200}" $PY bench/kernels.py --kinds segments \
        --backends cupy --seq-lens 16384,32768,65536,131072 --targets --out "$OUT/bench" > "$OUT/bench.log" 2>&1
      echo "bench: exit $?" >> "$OUT/gpu.txt" ;;
    host)
      PYTHONPATH="$ROOT" timeout 120 $PY bench/host_profile.py --out "$OUT/host" > /dev/null 2>&1
      echo "host: exit $?" >> "$OUT/gpu.txt" ;;
    clock)
      PYTHONPATH="$ROOT" timeout 120 $PY bench/clock_power.py --S 131072 --T 4096 --seconds 3 --workloads idle,hisa,protocol,matmul \
        > "$OUT/clock.txt" 2>&1
      echo "clock 128K/4096: exit $?" >> "$OUT/gpu.txt"
      PYTHONPATH="$ROOT" timeout 90 $PY bench/clock_power.py --S 32768 --T 4096 --seconds 3 --workloads hisa,protocol \
        >> "$OUT/clock.txt" 2>&1
      echo "clock 32K/4096: exit $?" >> "$OUT/gpu.txt" ;;
    ncu)
      # kernels compiled with -lineinfo (their own cache entries), one launch each under
      # `ncu --set full`; per kernel its CUDA source lines with their SASS and counters (CSV:
      # bench/ncu_hotspots.py --lines), the SASS alone (ncu_hotspots.py's summary), and the
      # details page, packed into $OUT/ncu.tgz (the reports themselves stay: they are large)
      NCU_DIR=${NCU_DIR:-/tmp/ncu_out}
      rm -rf "$NCU_DIR" && mkdir -p "$NCU_DIR"
      for spec in "${NCU_SPECS[@]}"; do
        name=${spec%%|*}; args=${spec#*|}
        # shellcheck disable=SC2086
        HISA_CUPY_LINEINFO=1 PYTHONPATH="$ROOT" timeout "${NCU_TIMEOUT:-150}" ncu --set full --import-source yes \
          -k "regex:^${name}" -s 1 -c 1 -o "$NCU_DIR/$name" -f $PY bench/profile_run.py $args --reps 2 \
          > "$NCU_DIR/$name.log" 2>&1
        ncu -i "$NCU_DIR/$name.ncu-rep" --page source --csv --print-source cuda,sass \
          > "$NCU_DIR/${name}_source.csv" 2>&1
        ncu -i "$NCU_DIR/$name.ncu-rep" --page source --csv --print-source sass > "$NCU_DIR/${name}_sass.csv" 2>&1
        ncu -i "$NCU_DIR/$name.ncu-rep" --page details > "$NCU_DIR/${name}_details.txt" 2>&1
        { $PY bench/ncu_hotspots.py "$NCU_DIR/${name}_sass.csv"
          $PY bench/ncu_hotspots.py "$NCU_DIR/${name}_source.csv" --lines --top 40; } > "$NCU_DIR/${name}_hotspots.txt" 2>&1
      done
      tar -czf "$OUT/ncu.tgz" -C "$NCU_DIR" --exclude='*.ncu-rep' .
      echo "ncu (${#NCU_SPECS[@]} kernels): done" >> "$OUT/gpu.txt" ;;
    *)
      echo "unknown step $step (tests, kernels, ab, bench, host, clock, ncu)" >&2
      exit 2 ;;
  esac
done
save_kernel_cache
cat "$OUT/gpu.txt"
