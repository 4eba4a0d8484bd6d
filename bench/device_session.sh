#!/usr/bin/env bash
# One device call's worth of GPU work, with logs written under $OUT. Run it on the GPU machine (the
# `device` tool) from the repository root, or from a snapshot of one commit (see bench/NOTES.md,
# "Measurement rules"). The package is used in place (PYTHONPATH), so nothing is installed.
#
#   STEPS="tests kernels" bash bench/device_session.sh   # GPU suite, then per-kernel times
#   STEPS=bench HISA_COMMIT=abc1234 bash bench/device_session.sh   # the run of record
#
# Steps, in the order given:
#   tests    pytest -m gpu tests/gpu                -> $OUT/gpu_tests.txt  (~330 s on an H200)
#   kernels  bench/profile_run.py --kernels at 128K/4096, 128K/1024 and 32K/4096, and both
#            hisa_cupy.topk shapes                  -> $OUT/kernels.txt    (~60 s)
#   bench    bench/kernels.py --targets, the grid of the README table -> $OUT/bench/ (~130 s)
#   host     bench/host_profile.py                  -> $OUT/host/          (~30 s)
# One call may run for at most 600 s: `tests` and `bench` do not fit together. Each step has its
# own time limit (TESTS_TIMEOUT, BENCH_TIMEOUT), so a slow step cannot swallow the ones after it.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?set OUT to the directory that comes back (the device tool sets it)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-"tests kernels"}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
echo "commit ${HISA_COMMIT:-unknown}, steps: $STEPS, $(date -u +%FT%TZ)" >> "$OUT/gpu.txt"

for step in $STEPS; do
  case $step in
    tests)
      timeout "${TESTS_TIMEOUT:-420}" $PY -m pytest -m gpu tests/gpu -q -rf -p no:cacheprovider \
        > "$OUT/gpu_tests.txt" 2>&1
      echo "tests: exit $?" >> "$OUT/gpu.txt" ;;
    kernels)
      {
        for cfg in "--S 131072 --T 4096" "--S 131072 --T 1024" "--S 32768 --T 4096"; do
          $PY bench/profile_run.py --op hisa $cfg --times --kernels --reps 5
        done
        $PY bench/profile_run.py --op topk --rows 4096 --cols 8192 --times --kernels --reps 5
        $PY bench/profile_run.py --op topk --rows 64 --cols 131072 --times --kernels --reps 5
      } 2>&1 | grep -E "median|_kernel|Error|error" > "$OUT/kernels.txt"
      echo "kernels: done" >> "$OUT/gpu.txt" ;;
    bench)
      timeout -s TERM "${BENCH_TIMEOUT:-200}" $PY bench/kernels.py --kinds segments --backends cupy \
        --seq-lens 16384,32768,65536,131072 --targets --out "$OUT/bench" > "$OUT/bench.log" 2>&1
      echo "bench: exit $?" >> "$OUT/gpu.txt" ;;
    host)
      timeout 120 $PY bench/host_profile.py --out "$OUT/host" > /dev/null 2>&1
      echo "host: exit $?" >> "$OUT/gpu.txt" ;;
    *)
      echo "unknown step $step (tests, kernels, bench, host)" >&2
      exit 2 ;;
  esac
done
cat "$OUT/gpu.txt"
