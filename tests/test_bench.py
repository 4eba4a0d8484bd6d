"""The benchmark scripts run on a CPU machine: fidelity on the NumPy backend, kernels.py's
no-GPU exit and its report formatting (the GPU measurements themselves run on the device)."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--backend", "numpy", "--seq-lens", "1024", "--queries", "16", "--heads", "16", "--head-dim", "32",
        "--topk", "64", "--block-size", "32", "--block-topk", "4,8,32"]


def test_fidelity_tiny_numpy(tmp_path, capsys):
    fidelity = _load("fidelity")
    assert fidelity.main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| needles | 1024 | 16 | hisa | 8 |" in out
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {(r["kind"], r["method"], r["m"]): r for r in data["rows"]}
    # m = 32 blocks of 32 cover the whole 1024-token context: HISA equals dense (SPEC §5.4).
    for kind in ("random", "segments", "needles"):
        assert rows[kind, "hisa", 32]["iou_mean"] == 1.0
        assert rows[kind, "hisa", 32]["recall"] == 1.0
    # Recall of dense equals the share of dense picks inside the kept blocks (exact backend).
    for r in data["rows"]:
        if r["method"] == "hisa":
            assert r["recall"] == pytest.approx(r["block_coverage"])
    assert rows["needles", "hisa", 4]["dense_needle_recall"] == 1.0
    assert rows["segments", "hisa", 8]["iou_mean"] > rows["random", "hisa", 8]["iou_mean"]


def test_kernels_without_gpu_exits_cleanly():
    from hisa_cupy.__main__ import probe_gpu

    if probe_gpu()[0]:
        pytest.skip("a GPU is present: bench/kernels.py would run the benchmark")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--quick"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no usable CUDA GPU" in proc.stdout


def _fake_run():
    meta = dict(gpu="NVIDIA H200", sm="sm_90", date="2026-01-01", flush="write", reps=20, hisa_cupy="0.1.0",
                commit="abc", torch="2.x", cupy="14")
    rows = []
    for S in (8192, 32768):
        for op, backend, m, ms in (("hisa_select", "cupy", 64, 1.0), ("pool_keys", "cupy", 64, 0.1),
                                   ("select_blocks", "cupy", 64, 0.2), ("refine", "cupy", 64, 0.7),
                                   ("dense_select", "cupy", None, S / 8192), ("torch_reference", "torch", None, 3.0),
                                   ("hisa_select", "numba", 64, 50.0), ("dense_select", "numba", None, 80.0)):
            row = dict(kind="random", S=S, T=1024, backend=backend, op=op, median_ms=ms, wall_median_ms=ms + 0.5)
            if m is not None:
                row["m"] = m
            if op == "hisa_select" and backend == "cupy":
                row.update(iou_vs_dense=0.5, peak_extra_bytes=40 << 20)
            rows.append(row)
    targets = [dict(id="1", target="hisa_select end to end (GPU time)", config="S=128K T=4096", measured=0.9,
                    goal="<= 1.0 ms", unit="ms", passed=True),
               dict(id="6", target="exactness", config="pytest -m gpu", measured=None, goal="-", unit="-",
                    passed=None)]
    return meta, rows, targets


def test_kernels_report_tables():
    kernels = _load("kernels")
    meta, rows, targets = _fake_run()
    md = kernels.markdown(meta, rows, targets)
    assert "| random | 32K | 1024 | 64 | 1.000 | 1.500 | 0.100 | 0.200 | 0.700 | 4.000 | 3.000 | 4.0x | 3.0x | 0.500 | 40 |" in md
    assert "| random | 8K | 1024 | 64 | 50.0 | 1.000 | 50.0x | 80.0 | 1.000 | 80.0x |" in md
    assert "| 1 | hisa_select end to end (GPU time) | S=128K T=4096 | 0.9 ms | <= 1.0 ms | **pass** |" in md
    assert "| 6 | exactness | pytest -m gpu | – | - | n/a |" in md
    assert kernels.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert kernels.block_topk_values(8192) == [16, 64] and kernels.block_topk_values(131072) == [64, 256]


def test_kernels_plot(tmp_path):
    import matplotlib  # a test dependency: the plot is checked, never skipped

    assert matplotlib.__version__

    kernels = _load("kernels")
    meta, rows, _ = _fake_run()
    assert kernels.plot(meta, rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_kernels_host_time_is_measured_before_the_profiler(monkeypatch):
    # torch.profiler leaves CUPTI attached to the process, slowing every later launch: target 5
    # must be timed before target 3 profiles the dense kernels. Everything GPU-side is faked; the
    # run stops at target 4 (it needs a CUDA generator), after both calls of interest.
    import types

    torch = pytest.importorskip("torch")
    kernels = _load("kernels")
    calls = []

    class FakeInputs:
        def __init__(self, wl):
            self.q = self.k = self.w = self.k_scale = self.ks = self.ke = None

        def rows(self, T):
            return self

        def causal_pairs(self):
            return 1

        def hisa_pairs(self, m):
            return 1, 1

    monkeypatch.setattr(kernels, "Inputs", FakeInputs)
    monkeypatch.setattr(kernels, "tensor_core_tflops", lambda kind: calls.append(f"rate {kind}") or 500.0)
    monkeypatch.setattr("hisa_cupy.workloads.make_workload", lambda *a, **kw: None)
    monkeypatch.setattr(kernels, "host_overhead_us", lambda fn, **kw: calls.append("host") or (10.0, [10.0]))
    monkeypatch.setattr(kernels, "profile_kernels", lambda fn, **kw: calls.append("profile") or {"score": 1.0})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    timer = lambda fn: {"median_ms": 1.0, "wall_median_ms": 1.0}  # noqa: E731
    args = types.SimpleNamespace(kinds=["segments"], seed=0, score_kernel_regex="score")
    with pytest.raises(Exception):
        kernels.run_targets(args, timer, [])
    assert calls[:5] == ["host", "host", "rate f16", "rate fp8", "profile"]


def test_exact_scoring_floor_rows():
    # the floor of a target's scoring FLOPs at the measured f16 rate, and the share of that rate
    # its goal asks for: 600 GFLOP at 750 TFLOP/s is 0.8 ms, and a 1.0 ms goal asks for 80%
    kernels = _load("kernels")
    rows = []
    target = lambda *a, **kw: rows.append(a)  # noqa: E731
    kernels.floor_rows(target, {"f16": 750.0}, "1", "cfg", 600e9, 1.0)
    assert [r[0] for r in rows] == ["1", "1"] and rows[0][2] == "cfg"
    assert rows[0][3] == pytest.approx(0.8) and rows[0][6] == "ms"
    assert rows[1][3] == pytest.approx(80.0) and rows[1][6] == "%"
    rows.clear()
    kernels.floor_rows(target, {}, "3", "cfg", 600e9, 14.0)  # rate not measured: no values
    assert [r[3] for r in rows] == [None, None]


def test_device_session_script(tmp_path):
    # bench/device_session.sh parses, insists on $OUT, and refuses an unknown step before running
    # anything (the GPU steps themselves only run on the device)
    script = str(ROOT / "bench" / "device_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "set OUT" in r.stderr
    r = subprocess.run(["bash", script], env={**env, "OUT": str(tmp_path), "STEPS": "tests-typo"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown step tests-typo" in r.stderr
    assert "steps: tests-typo" in (tmp_path / "gpu.txt").read_text()
    r = subprocess.run(["bash", script], env={**env, "OUT": str(tmp_path), "STEPS": "ab"},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "AB_TREES" in r.stderr


def test_device_session_ab_step(tmp_path):
    # the ab step runs each tree's own bench/profile_run.py from inside that tree (PYTHONPATH = the
    # tree), configuration by configuration, and keeps its median and kernel lines, labelled
    script = str(ROOT / "bench" / "device_session.sh")
    for name in ("old", "new"):
        (tmp_path / name / "bench").mkdir(parents=True)
        (tmp_path / name / "bench" / "profile_run.py").write_text(
            "import os, sys\n"
            "print('H200 ' + os.path.basename(os.getcwd()) + ' ' + os.environ['PYTHONPATH'] + ' ' + sys.argv[2] + ': median 1.0 ms')\n"
            "print('noise')\n"
            "print('k_kernel(int)   0.00%   0.000us   0.00%   0.000us   0.000us   1.095ms   67.37%   1.095ms')\n")
    out = tmp_path / "out"
    out.mkdir()
    trees = f"{tmp_path / 'old'} {tmp_path / 'new'}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "STEPS": "ab", "AB_TREES": trees,
           "PY": sys.executable}
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = (out / "ab.txt").read_text().splitlines()
    assert len(lines) == 6 * 2 * 2  # 6 configurations x 2 trees x (median, kernel)
    assert lines[0] == f"old --op hisa --S 131072 --T 4096 : H200 old {tmp_path / 'old'} hisa: median 1.0 ms"
    assert lines[1] == "old --op hisa --S 131072 --T 4096 : k_kernel(int)   1.095ms   67.37%   1.095ms"
    assert lines[2].startswith("new --op hisa --S 131072 --T 4096 : H200 new ")
    assert lines[-2].startswith("new --op topk --rows 64 --cols 131072 : H200 new ")


def test_snapshots_script(tmp_path):
    # bench/snapshots.sh unpacks `git archive REV` under .snap/NAME of its own checkout (here a
    # clone, so the test leaves this checkout alone) and refuses a revision that is not a commit
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    script = str(clone / "bench" / "snapshots.sh")
    shutil.copy(ROOT / "bench" / "snapshots.sh", script)  # this checkout's version of the script
    r = subprocess.run(["bash", script, "HEAD"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    snap = clone / ".snap" / "HEAD"
    assert r.stdout.startswith(".snap/HEAD ")
    assert (snap / "bench" / "device_session.sh").read_text() == (clone / "bench" / "device_session.sh").read_text()
    assert ".snap/" in (clone / ".git" / "info" / "exclude").read_text().split()
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                       capture_output=True, text=True)
    assert r.returncode == 0 and ".snap" not in r.stdout  # the snapshots are ignored
    r = subprocess.run(["bash", script, "no-such-rev"], capture_output=True, text=True)
    assert r.returncode == 2 and "no commit no-such-rev" in r.stderr


def test_ncu_hotspots_summary(tmp_path):
    # a tiny SASS export: the kernel-name line, the header, three instructions (one predicated)
    hot = _load("ncu_hotspots")
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_barrier", "stall_wait", "stall_wait (Not Issued)"]
    rows = [["0x0", "      IMAD R1, R2, R3, RZ", "6", "300", "0", "6", "6"],
            ["0x10", "      @!P0 ATOMS.ADD RZ, [R4], R5", "3", "100", "1", "2", "2"],
            ["0x20", "      BAR.SYNC.DEFER_BLOCKING 0x0", "1", "100", "1", "0", "0"]]
    path = tmp_path / "k.csv"
    with open(path, "w", newline="") as f:
        w = __import__("csv").writer(f)
        w.writerow(["Kernel Name", "k(int)"])
        w.writerow(header)
        w.writerows(rows)
    h, r = hot.load(path)
    assert h == header and len(r) == 3
    out = hot.summarize(h, r, per_row=10, window=2, top=3)
    assert out[0] == "3 SASS instructions, 500 warp instructions executed (50 per row), 10 stall samples"
    assert out[2].split() == ["IMAD", "60.0%", "60.0%"] and out[3].split() == ["ATOMS", "20.0%", "30.0%"]
    assert out[5] == "stalls: wait 80.0%, barrier 20.0%"  # "(Not Issued)" columns are not counted twice
    assert out[7].startswith("  [0:2]  90.0%  80.0%") and "30.0 per row" in out[7]


def test_ncu_hotspots_source_lines(tmp_path):
    # a cuda,sass export: file and function lines, the header, source lines (with their counts)
    # each followed by their SASS rows, which carry no line number
    hot = _load("ncu_hotspots")
    header = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
    rows = [["12", "  x += y;", "-", "-", "1", "40"], ["", "", "0x0", "IADD3 R1, R1, R2, RZ", "1", "40"],
            ["30", "for (;;) atomicAdd(p, 1);", "-", "-", "3", "160"], ["", "", "0x10", "ATOMS.ADD", "3", "160"],
            ["31", "// nothing", "-", "-", "-", "-"]]
    path = tmp_path / "k_source.csv"
    with open(path, "w", newline="") as f:
        w = __import__("csv").writer(f)
        w.writerow(["File Path", "/tmp/k.cu"])
        w.writerow(["Function Name", "k(int)"])
        w.writerow(header)
        w.writerows(rows)
    lines = hot.source_lines(path)
    assert lines == [(12, "x += y;", 40, 1), (30, "for (;;) atomicAdd(p, 1);", 160, 3), (31, "// nothing", 0, 0)]
    out = hot.summarize_lines(lines, per_row=4, top=2)
    assert out[0] == "3 source lines, 200 warp instructions executed (50 per row)"
    assert out[2].split()[:4] == ["30", "80.0%", "75.0%", "40"] and out[3].split()[0] == "12"
    assert len(out) == 4


def test_hisa_pairs_match_the_floor_table():
    # bench/NOTES.md's floor table: 128K/4096 with m = 64 has 67.7 GFLOP of block scores and
    # 549.8 GFLOP of token scores (2 H D = 16384 FLOP per pair); 8K/1024 with m = 64: 1.0 and 129.9
    kernels = _load("kernels")
    inp = kernels.Inputs.__new__(kernels.Inputs)
    for S, T, block_gflop, token_gflop in ((131072, 4096, 67.7, 549.8), (8192, 1024, 1.0, 129.9)):
        inp.ke_host = np.arange(S - T + 1, S + 1, dtype=np.int64)  # the last T positions, causal
        blocks, tokens = inp.hisa_pairs(64)
        assert round(blocks * 16384 / 1e9, 1) == block_gflop
        assert round(tokens * 16384 / 1e9, 1) == token_gflop


def test_source_commit_only_answers_for_its_own_repository(tmp_path):
    # the run's metadata takes git's commit only for the top of a repository, marks modified
    # tracked files, and gives None for a snapshot inside another repository (the device copy's
    # .snap/ trees, where git would answer for the repository around them)
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    kernels = _load("kernels")
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*cmd):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    (repo / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                          capture_output=True, check=True).stdout.strip()
    assert kernels.source_commit(repo) == head
    (repo / "new.txt").write_text("untracked files do not count\n")
    assert kernels.source_commit(repo) == head
    (repo / "a.txt").write_text("two\n")
    assert kernels.source_commit(repo) == head + "+modified"
    snap = repo / ".snap" / "main"
    snap.mkdir(parents=True)
    assert kernels.source_commit(snap) is None
    assert kernels.source_commit(tmp_path / "not-a-repo") is None


def test_device_session_kernel_cache(tmp_path):
    # device_session.sh gives every step one kernel cache directory, seeds it from KCACHE_IN and,
    # with KCACHE_SAVE=1, packs what the steps compiled (here a stand-in "python" that writes one
    # cache entry where the backend would) into $OUT/kernels.txz (xz), without what the seed
    # held (a tar.gz here; xz seeds load the same way)
    import tarfile

    script = str(ROOT / "bench" / "device_session.sh")
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / "old.bin").write_bytes(b"cubin")
    (seed_dir / "old.name").write_text("k_old")
    seed = tmp_path / "kernels.tgz"
    with tarfile.open(seed, "w:gz") as tar:
        for f in sorted(seed_dir.iterdir()):
            tar.add(f, arcname=f.name)
    fake_py = tmp_path / "fake_python"
    fake_py.write_text('#!/bin/sh\necho compiled > "$HISA_CUPY_CACHE_DIR/new.bin"\n')
    fake_py.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "STEPS": "host",
           "PY": str(fake_py), "PACK_PY": sys.executable, "KCACHE_IN": str(seed), "KCACHE_SAVE": "1",
           "HISA_CUPY_CACHE_DIR": str(cache)}
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["new.bin", "old.bin", "old.name"]
    with tarfile.open(out / "kernels.txz", "r:xz") as tar:
        assert tar.getnames() == ["new.bin"]
    log = (out / "gpu.txt").read_text()
    assert f"kernel cache: 1 kernels from {seed}" in log
    assert "kernel cache: 1 kernels compiled in this call saved to kernels.txz" in log
    # the xz archive seeds the next call
    shutil.rmtree(cache)
    r = subprocess.run(["bash", script], env={**env, "KCACHE_IN": str(out / "kernels.txz"), "KCACHE_SAVE": "0"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and sorted(p.name for p in cache.iterdir()) == ["new.bin"]
    assert f"kernel cache: 1 kernels from {out / 'kernels.txz'}" in (out / "gpu.txt").read_text()
    # without KCACHE_SAVE nothing is packed
    (out / "kernels.txz").unlink()
    r = subprocess.run(["bash", script], env={**env, "KCACHE_SAVE": "0"}, capture_output=True, text=True)
    assert r.returncode == 0 and not (out / "kernels.txz").exists()


def test_device_session_tests_step_args(tmp_path):
    # the tests step passes TEST_PATHS and, when set, TEST_K as one pytest -k expression (spaces
    # and all), and logs both; without TEST_K there is no -k
    script = str(ROOT / "bench" / "device_session.sh")
    fake_py = tmp_path / "fake_python"
    fake_py.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$OUT/args.txt"\n')
    fake_py.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "STEPS": "tests", "PY": str(fake_py),
           "HISA_CUPY_CACHE_DIR": str(tmp_path / "cache"), "TEST_PATHS": "tests/gpu/test_cupy_backend.py",
           "TEST_K": "scoring_engines_exact and 128 or wgmma_engine_general"}
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = (out / "args.txt").read_text().splitlines()
    assert args[:5] == ["-m", "pytest", "-m", "gpu", "tests/gpu/test_cupy_backend.py"]
    assert args[5:7] == ["-k", "scoring_engines_exact and 128 or wgmma_engine_general"]
    log = (out / "gpu.txt").read_text()
    assert "tests (tests/gpu/test_cupy_backend.py -k scoring_engines_exact and 128 or wgmma_engine_general): exit 0" in log
    r = subprocess.run(["bash", script], env={**env, "TEST_K": ""}, capture_output=True, text=True)
    assert r.returncode == 0 and "-k" not in (out / "args.txt").read_text().splitlines()


def test_device_session_ncu_step(tmp_path):
    # the ncu step profiles each NCU_SPEC kernel with -lineinfo builds (HISA_CUPY_LINEINFO=1), exports
    # its source and SASS pages and details, summarises both with ncu_hotspots.py and packs it all
    # into $OUT/ncu.tgz, starting from an empty folder (a stand-in ncu prints tiny exports)
    import sys
    import tarfile

    script = str(ROOT / "bench" / "device_session.sh")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ncu = bindir / "ncu"
    ncu.write_text(
        "#!/bin/sh\n"
        'case " $* " in\n'
        '  *" -i "*)\n'
        '    case " $* " in\n'
        '      *"cuda,sass"*) printf \'"File Path","/x.cu"\\n"Line No","Source","Address","Source",'
        '"Warp Stall Sampling (All Samples)","Instructions Executed"\\n"7","x += 1;","-","-","2","64"\\n\' ;;\n'
        '      *"print-source sass"*) printf \'"Kernel Name","k"\\n"Address","Source",'
        '"Warp Stall Sampling (All Samples)","Instructions Executed"\\n"0x0","IADD3 R1, R1, R2, RZ","2","64"\\n\' ;;\n'
        '      *) echo "details page" ;;\n'
        "    esac ;;\n"
        '  *) echo "profiled: HISA_CUPY_LINEINFO=$HISA_CUPY_LINEINFO $*" ;;\n'
        "esac\n")
    ncu.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "ncu_work"
    out.mkdir()
    work.mkdir()
    (work / "stale.txt").write_text("from an earlier step")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "STEPS": "ncu",
           "PY": sys.executable, "NCU_SPEC": "k_regs|--op topk --rows 8", "NCU_DIR": str(work),
           "HISA_CUPY_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out / "ncu.tgz") as tar:
        names = sorted(n.lstrip("./") for n in tar.getnames() if n not in (".", "./"))
        assert names == ["k_regs.log", "k_regs_details.txt", "k_regs_hotspots.txt", "k_regs_sass.csv",
                         "k_regs_source.csv"]
        log = tar.extractfile("./k_regs.log").read().decode()
        hot = tar.extractfile("./k_regs_hotspots.txt").read().decode()
    assert "HISA_CUPY_LINEINFO=1" in log and "regex:^k_regs" in log and "--op topk --rows 8" in log
    assert "1 SASS instructions, 64 warp instructions executed" in hot
    assert "1 source lines, 64 warp instructions executed" in hot and "x += 1;" in hot
    assert "ncu (1 kernels): done" in (out / "gpu.txt").read_text()


def test_precompile_kernels_knows_every_kernel_file():
    # bench/precompile_kernels.py finds each kernel's source file from its name: every kernel
    # the backend can launch must map to the file that defines it, and an unknown name is an error
    from hisa_cupy.kernels import cupy_backend

    pre = _load("precompile_kernels")
    instances = cupy_backend.kernel_instances()
    assert instances
    for filename, expr in instances:
        assert pre.source_file(expr) == filename, expr
    with pytest.raises(ValueError, match="no source file"):
        pre.source_file("mystery_kernel<1>")


def test_precompile_kernels_reads_names_from_a_cache(tmp_path):
    # a device cache's .name files hold lowered names; demangled they are the name expressions,
    # read from the cache directory or from the archive a device call returned
    import tarfile

    pre = _load("precompile_kernels")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.name").write_text("_Z25refine_union_wgmma_kernelILi2ELi0ELi0ELi64ELi128EEvPKvS1_PKfS3_PKiS5_S5_iiiiiiPjxi")
    (cache / "b.name").write_text("_Z18topk_filter_kernelPKjPKfxiiiiPKiS4_iiiiiPjPiS5_S6_")
    (cache / "a.bin").write_bytes(b"\x7fELF")
    want = ["refine_union_wgmma_kernel<2, 0, 0, 64, 128>", "topk_filter_kernel"]
    assert sorted(pre.names_from_cache(str(cache))) == want
    with tarfile.open(tmp_path / "k.txz", "w:xz") as tar:
        tar.add(cache, arcname=".")
    assert sorted(pre.names_from_cache(str(tmp_path / "k.txz"))) == want


def test_precompile_kernels_packs_what_the_backend_looks_up(monkeypatch, tmp_path):
    # the keys the tool packs are the ones the backend opens (cupy_backend.cache_key): a kernel
    # compiled into one cache, packed and unpacked into another, is found there without a compile;
    # a kernel missing from the cache is an error, not a smaller archive
    import tarfile

    from fake_nvrtc import install_fake_nvrtc  # tests/fake_nvrtc.py

    fake = install_fake_nvrtc(monkeypatch)
    monkeypatch.delenv("HISA_CUPY_LINEINFO", raising=False)
    from hisa_cupy.kernels import cupy_backend as cb

    pre = _load("precompile_kernels")
    built, other = tmp_path / "built", tmp_path / "device"
    monkeypatch.setenv("HISA_CUPY_CACHE_DIR", str(built))
    exprs = ["topk_filter_kernel", "refine_union_wgmma_kernel<2, 0, 0, 64, 128>"]
    for e in exprs:
        cb._nvrtc_compile(cb.load_source(pre.source_file(e)), e, "sm_90a")
    keys = pre.cache_keys(cb, exprs, "sm_90a")
    assert pre.pack(str(built), keys.values(), str(tmp_path / "k.txz")) == 2
    with tarfile.open(tmp_path / "k.txz") as tar:
        tar.extractall(other)
    monkeypatch.setenv("HISA_CUPY_CACHE_DIR", str(other))
    fake.createProgram = None  # a compile now would fail: both must come from the unpacked cache
    for e in exprs:
        assert cb._nvrtc_compile(cb.load_source(pre.source_file(e)), e, "sm_90a") == (
            f"cubin of {e}: -std=c++17 -ftz=true -arch=sm_90a".encode(), "lowered_" + e)
    with pytest.raises(FileNotFoundError, match="1 kernels are not in"):
        pre.pack(str(built), [*keys.values(), "0" * 40], str(tmp_path / "k2.txz"))
    assert not (tmp_path / "k2.txz").exists()


def test_filter_scan_model_finds_offsets_and_no_deadlock():
    # bench/filter_scan_model.py: row_filter's chunk claims and look-back under 3000 random
    # schedules with fewer resident CTAs than the grid; it raises on a wrong offset or a spin
    # that never ends, so a change to the modelled protocol that breaks either fails here
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "filter_scan_model.py")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok", "3000"]


def test_filter_sample_sim_columns_and_kept_count():
    # bench/filter_sample_sim.py: runs of run_len columns spread over the row, aligned down to
    # run_len, inside it; on an ascending row every sample takes the threshold at exactly the
    # `expect`-th largest column, so the kept count is `expect` for single columns and runs alike
    spec = importlib.util.spec_from_file_location("filter_sample_sim", ROOT / "bench" / "filter_sample_sim.py")
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    for runs, run_len in sim.SAMPLES.values():
        cols = sim.sample_columns(sim.N, runs, run_len)
        assert cols.shape == (runs * run_len,) and cols.min() >= 0 and cols.max() < sim.N
        assert (cols[::run_len] % run_len == 0).all() and (np.diff(cols[::run_len]) > 0).all()
        assert sim.kept(np.arange(sim.N, dtype=np.float32), runs, run_len) == sim.expect
    short = sim.sample_columns(1000, 512, 4)  # runs past a short row's end repeat its last column
    assert short.min() == 0 and short.max() == 999


def test_threshold_levels_sim_finds_the_kth_key():
    # bench/threshold_levels_sim.py replays range_level's rule: at every level the bin it zooms into
    # holds the k-th largest key, the last level's bin is needed whole or is one key value, and keys
    # spread over more than 2048 values take more than one level; the linear bins round as
    # LinearBins does (the ranking keys: hisa_cupy.testing.score_keys, tests/test_testing_metrics.py)
    spec = importlib.util.spec_from_file_location("threshold_levels_sim", ROOT / "bench" / "threshold_levels_sim.py")
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    rng = np.random.default_rng(0)
    for scores, k in ((rng.standard_normal(8192).astype(np.float32), 2048),
                      (np.round(rng.standard_normal(8192), 1).astype(np.float32), 2048),  # ties at the k-th
                      (np.arange(8192, dtype=np.float32), 100)):
        keys = sim.score_keys(scores)
        kth = np.sort(keys)[::-1][k - 1]
        sizes = sim.key_bit_levels(keys, k)
        assert all(a >= b >= 1 for a, b in zip(sizes, sizes[1:] + [1]))  # each level inside the last's bin
        n_eq = int((keys == kth).sum())
        assert sizes[-1] >= n_eq  # the last bin holds every key equal to the k-th
        lin = sim.linear_bin_size(scores, k)
        assert 1 <= lin <= len(scores)
    # LinearBins' rounding: 8192 consecutive scores in 2048 bins of ~4, the top one short (the range
    # maps below 2047.5); a range of 0 puts every key in bin 0
    ramp = np.arange(8192, dtype=np.float32)
    assert sim.linear_bin_size(ramp, 1) == 3 and sim.linear_bin_size(ramp, 2048) == 4
    assert sim.linear_bin_size(np.ones(100, np.float32), 5) == 100
    # 4096 consecutive keys: bins of 2 keys, then the top bin's two keys one per bin
    assert sim.key_bit_levels(np.arange(4096, dtype=np.uint64), 1) == [2, 1]
    assert sim.key_bit_levels(np.arange(4096, dtype=np.uint64), 2) == [2]  # the top bin needed whole
    # a crowded bin: one value repeated past k takes a single-value bin at the last level
    keys = sim.score_keys(np.concatenate([np.full(5000, 1.0, np.float32), np.arange(3000, dtype=np.float32) + 2]))
    assert sim.key_bit_levels(keys, 4000)[-1] == 5000


def test_threshold_levels_sim_window_paths_cover_the_gpu_rows():
    # window_path (bench/threshold_levels_sim.py) replays cut_by_window's rule (row_select.cuh); the GPU
    # test's rows (tests/gpu/test_row_select.py, _window_rows) must take every way of it, and each
    # way must mean what it says of the window's bin of the k-th largest key
    sim = _load("threshold_levels_sim")
    spec = importlib.util.spec_from_file_location("gpu_row_select", ROOT / "tests" / "gpu" / "test_row_select.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    k = 2048
    kinds, scores, mask = rows._window_rows(np.random.default_rng(66), 8192, k)
    seen = set()
    for r in range(len(kinds)):
        keys = np.where(mask[r], sim.score_keys(scores[r]), 0).astype(np.uint32)
        path, n = sim.window_path(keys, k)
        seen.add(path)
        kth = int(np.sort(keys[keys != 0])[::-1][k - 1])
        hi = int(keys.max())
        if path in ("whole", "rank", "rank ties", "bin levels"):
            assert hi - kth < 1 << 25  # the k-th lies in the window
            assert (n <= sim.WINDOW_RANK_MAX) == (path != "bin levels") or path == "whole"
        if path == "below":
            assert hi - kth >= 1 << 25
    assert seen == set(rows.WINDOW_PATHS), seen
    assert sim.window_path(np.arange(1, 101, dtype=np.uint32), 100) == ("all", 0)


def test_topk_window_sim_paths_cover_the_gpu_rows():
    # bench/topk_window_sim.py mirrors topk_regs_kernel's window below the row's largest key and its
    # sample guard (row_select_regs with WINDOW_SH). The row kinds of the GPU tests
    # (tests/gpu/test_row_select.py, test_register_mode_topk: seed N at N = 8192, k = 2048) must take
    # every path of it there: sorted in the window with the threshold in its lowest bucket and above
    # it, fewer than k keys in the window, a bucket too full, skipped by the guard
    sim = _load("topk_window_sim")
    spec = importlib.util.spec_from_file_location("gpu_row_select", ROOT / "tests" / "gpu" / "test_row_select.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    paths = {}
    for gen in (rows._randn, rows._one_bin, rows._rounded, rows._skewed, rows._all_equal, rows._specials,
                rows._masked, rows._wide, rows._past_max, rows._window_edges):
        for row in gen(np.random.default_rng(8192), 6, 8192):
            path, thr = sim.window_path(row, 2048)
            paths.setdefault(path, set()).add(thr)
    assert {"window", "fewer", "full", "guard"} <= set(paths), paths
    assert 0 in paths["window"] and max(paths["window"]) > 0
    # the rule's edges: k keys or fewer never try the window; the window is the row's whole range
    # when that is narrower (uniform [1, 1.2): thousands of buckets used, not 2^14 keys each)
    rng = np.random.default_rng(1)
    assert sim.window_path(rng.standard_normal(2048).astype(np.float32), 2048) == ("levels", None)
    path, thr = sim.window_path((1.0 + 0.2 * rng.random(8192)).astype(np.float32), 2048)
    assert path == "window" and thr > 1024
    # the guard's line: 3/4 of k keys predicted in the window. 16 * hits = 1536 tries it, 1520 not
    # (the sampled items are 0, 16, 32, ...; 2^-20 lies far below the window under 2.0)
    for hits, expected in ((96, "fewer"), (95, "guard")):
        x = np.full(8192, 2.0 ** -20, np.float32)
        x[: 16 * hits : 16] = 1.5
        x[0] = 2.0
        assert sim.window_path(x, 2048)[0] == expected


def test_warp_select_sim_keeps_the_top_k():
    # bench/warp_select_sim.py replays row_select_warp's threshold search: with and without the
    # block top-m's bound (BOUND: [x, hi] for 3 <= k <= 64) the kept positions are a stable top k
    # (larger keys first, ties to the lower position) on rows with ties, empty slots and up to two
    # forced keys, and on rows whose 64 best unforced keys lie two per lane (where a bound from each
    # lane's largest key, or one used past k = 64, keeps the wrong keys); the block rows carry their
    # first and last eligible blocks as forced keys
    sim = _load("warp_select_sim")
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = 32 * int(rng.choice([8, 16, 32]))
        vals = rng.integers(2, 2 ** 32 - 1, size=n) if trial % 3 else rng.integers(2, 40, size=n)
        keys = np.where(rng.random(n) < 0.1, sim.KEY_NONE, vals).astype(np.int64)
        keys[rng.choice(n, size=int(rng.integers(0, 3)), replace=False)] = sim.KEY_FORCED
        valid = np.nonzero(keys != sim.KEY_NONE)[0]
        for k in (1, 3, 17, 64, 65, int(rng.integers(1, n))):
            want = np.sort(valid[np.lexsort((valid, -keys[valid]))][:k])
            runs = [sim.search(keys, k, bound) for bound in (False, True)]
            for thr, need, steps in runs:
                np.testing.assert_array_equal(np.sort(sim.selected(keys, thr, need)), want, err_msg=f"{trial} k={k}")
    # the bound's edges (as tests/gpu/test_row_select.py's): the 64 best unforced keys two per lane
    keys = 1000 + (np.arange(1024) * 37) % 128
    keys[32:96] = 5000 + np.arange(64)[::-1]
    keys[[0, 1023]] = sim.KEY_FORCED
    for k in (35, 64, 96):
        want = np.sort(np.lexsort((np.arange(1024), -keys))[:k])
        np.testing.assert_array_equal(np.sort(sim.selected(keys, *sim.search(keys, k, True)[:2])), want,
                                      err_msg=f"edge k={k}")
    rows = sim.block_rows(4096, 64, 8, 128, 8, "segments", 0)
    assert len(rows) == 8 and all(len(r) == 32 and (r == sim.KEY_FORCED).sum() <= 2 for r in rows)


def test_warp_select_sim_main(capsys):
    # the replay's command line (hisa_cupy.testing.add_replay_arguments, shared with
    # threshold_levels_sim.py) on a small shape: rows of 128 blocks, 8 kept
    sim = _load("warp_select_sim")
    sim.main(["--S", "16384", "--T", "64", "--m", "8", "--rows", "4"])
    out = capsys.readouterr().out
    assert out.startswith("rows: 4; search steps per row: mean ") and "select nothing: mean " in out
    assert out.rstrip().endswith("of 4")  # 128 blocks: four steps of 32


def test_wgmma_rate_source_compiles_without_spills(tmp_path):
    # bench/wgmma_rate.py's microbenchmark (the engine's MMA chain alone) builds from the engine's
    # own header for sm_90a, every mode without spills; nvcc is on the CI machine
    wr = _load("wgmma_rate")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    insts = "\n".join(f"template __global__ void {wr.name_expr(m)}(int, float*);" for m in wr.MODES)
    (tmp_path / "unit.cu").write_text(wr.source() + "\n" + insts + "\n")
    proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-ftz=true", "-Xptxas", "-v", "-cubin",
                           "unit.cu", "-o", "unit.cubin"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    usage = [line for line in proc.stderr.splitlines() if "spill stores" in line]
    assert len(usage) == len(wr.MODES), proc.stderr[-4000:]
    assert all("0 bytes spill stores" in line for line in usage), usage


def test_ws_rate_source_compiles_and_fits_one_cta_per_sm(tmp_path):
    # bench/ws_rate.py (the union chain fed by bulk copies, warp-specialised) builds from the
    # engine's own header for sm_90a; every mode's CTA (C consumer warpgroups and a producer warp, or
    # warpgroup in the r modes) fits one SM's registers and shared memory, with at most the spill
    # ptxas gives it (4 bytes; the union modes without the r modes' register hand-over 44)
    from test_sass import _nvdisasm

    wr = _load("ws_rate")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    for mode in wr.MODES:
        (tmp_path / "unit.cu").write_text(wr.source() + f"\ntemplate __global__ void {wr.name_expr(mode)}"
                                          "(int, const char*, u32*, float*);\n")
        proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-ftz=true", "-Xptxas", "-v", "-cubin",
                               "unit.cu", "-o", "unit.cubin"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        # both 64-key halves' 8 wgmma each reach the SASS (on a resident tile ptxas kept 8 of 16)
        sass = subprocess.run([_nvdisasm(), "-c", "unit.cubin"], cwd=tmp_path, capture_output=True, text=True).stdout
        assert sass.count("HGMMA.64x128x16") == 16, (mode, sass.count("HGMMA.64x128x16"))
        # the modes with one-row tiles (wsu, wso) also run one row's halves at N = 64: 16 for each
        # row, whose calls fold the row index to a constant
        assert sass.count("HGMMA.64x64x16") == (32 if mode.startswith(("wsu", "wso")) else 0), mode
        usage = proc.stderr[proc.stderr.index("ws_rate_kernel"):]
        regs = int(re.search(r"Used (\d+) registers", usage).group(1))
        spill = int(re.search(r"(\d+) bytes spill stores", usage).group(1))
        stack = int(re.search(r"(\d+) bytes stack frame", usage).group(1))
        assert spill <= (48 if mode in ("wsu2", "wsu3") else 4) and wr.threads(mode) * (-(-regs // 8) * 8) <= 65536, (mode, regs, spill)
        # no local arrays beside the spills: a runtime row index once put the one-row tiles' weights
        # and sums in a 160-byte stack frame (session 52), which the union kernel does not have
        assert stack <= spill + 8, (mode, stack, spill)
        # the r modes: a producer warpgroup hands registers to the consumers (one setmaxnreg each way)
        assert sass.count("USETMAXREG") == (2 if mode.endswith("r") else 0), mode
        assert wr.smem_bytes(mode) + 1024 <= 228 * 1024, mode
    # per tile: two halves of 64 keys x 128 columns x K = 128, 2 FLOP each; every consumer's tiles
    assert wr.flops(ctas=2, iters=3, c=3) == 2 * 3 * 3 * (2 * 64 * 128 * 128 * 2)
    assert wr.name_expr("ws3") == "ws_rate_kernel<3, 0>" and wr.name_expr("wsu2") == "ws_rate_kernel<2, 3>"
    assert wr.name_expr("wsu3r") == "ws_rate_kernel<3, 3, true>" and wr.threads("wsu3r") == 512
    # wso / wsc: wsu's one-row tiles alone, its columns and flags alone
    assert wr.name_expr("wso3r") == "ws_rate_kernel<3, 1, true>" and wr.name_expr("wsc3r") == "ws_rate_kernel<3, 2, true>"
    assert wr.threads("ws3") == 416 and wr.consumers("ws3r") == 3
    # setmaxnreg's budget, as the source asks it: the producer warpgroup's and three consumers' fit 64 K
    asked = dict(re.findall(r"setmaxnreg\.(dec|inc)\.sync\.aligned\.u32 (\d+);", wr.source()))
    assert set(asked) == {"dec", "inc"} and 128 * int(asked["dec"]) + 3 * 128 * int(asked["inc"]) <= 65536, asked
    # the union modes: of every 72 tiles, 16 take one row's MMAs (half a tile's FLOPs)
    assert wr.flops(ctas=1, iters=72, c=1, union=True) == (56 + 16 / 2) * 2 * 64 * 128 * 128 * 2
    # the ring holds STAGES tiles and the producer's slot wait (parity) needs at least two
    assert wr.STAGES >= 2 and wr.smem_bytes("ws2") >= 1024 + 2 * 128 * 256 + wr.STAGES * 128 * 128


def test_wgmma_rate_occupancy_and_flops():
    wr = _load("wgmma_rate")
    for mode in wr.MODES:
        for per_sm in (1, 2, 3, 4):
            smem = wr.smem_bytes(mode, per_sm)
            need = 1024 + wr.N_COLS * 256 + wr.TILE * (256 if mode == "ss" else 128)
            assert smem >= need
            if wr.fits(per_sm, smem, 32):  # the padding lets exactly per_sm CTAs share an SM
                assert not wr.fits(per_sm + 1, smem, 32)
    assert not wr.fits(4, wr.smem_bytes("rs", 4), 154)  # registers: 160 x 128 x 4 > 64 K
    assert wr.fits(3, wr.smem_bytes("rs", 3), 154)
    # one launch: per CTA and iteration, two halves of 64 keys x 128 columns x K = 128, 2 FLOP each
    assert wr.flops(ctas=2, iters=3) == 2 * 3 * (2 * 64 * 128 * 128 * 2)
    # the warpgroup modes: every warpgroup runs the chain, and counts against the SM's registers
    assert wr.flops(ctas=2, iters=3, warpgroups=3) == 3 * wr.flops(ctas=2, iters=3)
    assert wr.fits(1, wr.smem_bytes("wg3_sums", 1), 168, 3) and not wr.fits(1, wr.smem_bytes("wg3_sums", 1), 176, 3)
    assert wr.fits(2, wr.smem_bytes("pp2_sums", 2), 128, 2) and not wr.fits(2, wr.smem_bytes("pp2_sums", 2), 136, 2)
    # wg3q_sums: the shared pair of tiles, then one per warpgroup
    assert wr.smem_bytes("wg3q_sums", 2) >= 1024 + 4 * (wr.N_COLS * 256 + wr.TILE * 128)  # above the padding
    assert all(wr.WARPGROUPS.get(m, 1) in (1, 2, 3) for m in wr.MODES) and set(wr.WARPGROUPS) <= set(wr.MODES)


@pytest.mark.parametrize("script", ["wgmma_rate", "ws_rate"])
def test_rate_scripts_without_gpu_exit_cleanly(script, capsys):
    from hisa_cupy.__main__ import probe_gpu

    if probe_gpu()[0]:
        pytest.skip(f"a GPU is present: bench/{script}.py would measure")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--iters", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no measurement" in proc.stdout
    # an unknown mode is an argument error (parse_modes), not an empty table
    mod = _load(script)
    with pytest.raises(SystemExit) as err:
        mod.main(["--modes", f"{mod.MODES[0]},nope"])
    assert err.value.code == 2 and "unknown modes ['nope']" in capsys.readouterr().err


def test_wgmma_rate_mode_and_occupancy_options(capsys, monkeypatch):
    # --modes / --ctas / --reps reach the measurement (a long run of one mode under an nvidia-smi
    # sampler: bench/NOTES.md, session 46); an unknown mode is an argument error, not an empty table
    wr = _load("wgmma_rate")
    with pytest.raises(SystemExit) as err:
        wr.main(["--modes", "rs,nope"])
    assert err.value.code == 2 and "unknown modes ['nope']" in capsys.readouterr().err
    seen = {}

    def fake_run(iters, reps=7, modes=wr.MODES, per_sms=(1, 2, 3, 4)):
        seen.update(iters=iters, reps=reps, modes=modes, per_sms=per_sms)
        raise RuntimeError("no GPU in this test")

    monkeypatch.setattr(wr, "run", fake_run)
    assert wr.main(["--modes", "rs_sums,wg3_sums", "--ctas", "3,1", "--iters", "9", "--reps", "201"]) == 0
    assert seen == {"iters": 9, "reps": 201, "modes": ("rs_sums", "wg3_sums"), "per_sms": (3, 1)}
    assert "no measurement" in capsys.readouterr().out
    wr.main([])  # the defaults: every mode at 1-4 CTAs per SM, 7 launches
    assert seen == {"iters": 2000, "reps": 7, "modes": wr.MODES, "per_sms": (1, 2, 3, 4)}


def test_clock_power_samples():
    # bench/clock_power.py reads nvidia-smi's CSV (noheader, nounits) and keeps, per workload, the
    # medians of the samples after the first 20% of its run; the f16 peak scales with the clock
    cp = _load("clock_power")
    text = "\n".join(f"2026/12/02 16:00:0{i}.000, {mhz}, {w}, 700.00, {50 + i}, {reason}" for i, (mhz, w, reason) in
                     enumerate([(1980, 120.0, "0x0"), (1890, 690.0, "0x4"), (1455, 691.0, "0x4"), (1500, 689.0, "0x4"),
                                (1980, 118.0, "0x0")])) + "\nnot a sample\n"
    rows = cp.parse_samples(text)
    assert [r[1] for r in rows] == [1980, 1890, 1455, 1500, 1980] and rows[1][5] == "0x4"
    t0, t1 = rows[0][0], rows[3][0]  # a run over samples 0-3: its first 20% (sample 0) left out
    s = cp.summarize(rows, t0, t1)
    assert s["samples"] == 3 and s["sm_mhz"] == 1500 and s["sm_mhz_min"] == 1455 and s["power_w"] == 690.0
    assert s["reasons"] == ["0x4"] and s["power_limit_w"] == 700.0
    assert cp.summarize(rows, t1 + 10, t1 + 20) is None
    assert abs(cp.f16_peak_tflops(1830, 132) - 989.4) < 0.1  # the H100 / H200 datasheet's dense f16 rate
    with pytest.raises(SystemExit) as err:  # an unknown workload is refused before anything runs
        cp.main(["--workloads", "hisa,nope"])
    assert err.value.code == 2


def test_clock_power_protocol_workload(monkeypatch, capsys):
    # the `protocol` workload times hisa_select with bench/kernels.py's own Timer (the run of
    # record's flush, sleep and warm-up), and is accepted where no GPU is
    cp = _load("clock_power")
    assert callable(cp.bench_kernels_module().Timer.__call__)  # the real module loads by path
    built = {}

    class FakeTimer:
        def __init__(self, reps, warmup, flush):
            built.update(reps=reps, warmup=warmup, flush=flush)

    monkeypatch.setattr(cp, "bench_kernels_module", lambda: types.SimpleNamespace(Timer=FakeTimer))
    assert isinstance(cp.protocol_timer(), FakeTimer)
    assert built == {"reps": 10, "warmup": 3, "flush": "write"}
    import torch

    if not torch.cuda.is_available():
        assert cp.main(["--workloads", "idle,protocol"]) == 0
        assert "no CUDA device" in capsys.readouterr().out


def test_union_skeletons_apply_to_the_current_kernel(tmp_path):
    # every skeleton's edits match the union kernel's source as it is (a kernel change that moves
    # them fails here, not on the device), and each skeleton differs from the source
    skeletons = _load("union_skeletons")
    tree = tmp_path / "tree"
    (tree / "kernels" / "cuda").mkdir(parents=True)
    source = (ROOT / skeletons.KERNEL).read_text()
    (tree / skeletons.KERNEL).write_text(source)
    for name, edits in skeletons.SKELETONS.items():
        skeletons.make(str(tree), name, edits)
        changed = (tmp_path / f"tree-skel-{name}" / skeletons.KERNEL).read_text()
        assert changed != source and len(changed) > len(source) - 200, name


def test_ptxas_usage_parses_the_verbose_log():
    # bench/ptxas_usage.py reads ptxas -v's lines per entry function: the stack / spill line and
    # the registers line (with or without static shared memory); a function without a registers
    # line is dropped rather than reported with missing numbers
    pu = _load("ptxas_usage")
    log = "\n".join([
        "ptxas info    : 0 bytes gmem",
        "ptxas info    : Compiling entry function '_Z18topk_filter_kernelPKj' for 'sm_90a'",
        "ptxas info    : Function properties for _Z18topk_filter_kernelPKj",
        "ptxas         .     40 bytes stack frame, 36 bytes spill stores, 40 bytes spill loads",
        "ptxas info    : Used 40 registers, used 1 barriers, 40 bytes cumulative stack size, 16672 bytes smem",
        "ptxas info    : Compiling entry function '_Z9broken_kv' for 'sm_90a'",
        "ptxas info    : Compiling entry function '_Z16topk_regs_kernelPKj' for 'sm_90a'",
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 168 registers, used 1 barriers",
    ])
    rows = pu.parse_ptxas_log(log)
    assert rows == [
        dict(name="_Z18topk_filter_kernelPKj", stack=40, spill_stores=36, spill_loads=40, registers=40, smem=16672),
        dict(name="_Z16topk_regs_kernelPKj", stack=0, spill_stores=0, spill_loads=0, registers=168, smem=0),
    ]
    with pytest.raises(SystemExit):
        pu.main([])  # no kernel named


def test_profile_run_ab(monkeypatch, capsys):
    # --ab: the settings alternate ABC CBA ABC ..., each from the knobs as they were (a setting's
    # knob does not leak into the next), one span and checksum per round, then the means
    profile_run = _load("profile_run")
    from hisa_cupy.kernels import cupy_backend

    assert profile_run.ab_order(3, 3) == [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert profile_run.ab_order(2, 3) == [0, 1, 1, 0, 0, 1]
    seen = []

    def fake_timeline(call, calls):
        seen.append((cupy_backend.UNION_FINE_TAIL_SPLITS, cupy_backend.UNION_SPLITS))
        return 100.0 + cupy_backend.UNION_FINE_TAIL_SPLITS + len(seen) / 10

    monkeypatch.setattr(profile_run, "print_timeline", fake_timeline)
    monkeypatch.setattr(profile_run, "checksum", lambda res: 7)
    monkeypatch.setattr(cupy_backend, "UNION_SPLITS", 0)

    def set_knob(name, value):
        setattr(cupy_backend, name, int(value))

    before = cupy_backend.UNION_FINE_TAIL_SPLITS
    warm = []

    def call():  # each setting is called once before the rounds (its kernels loaded, its plans made)
        warm.append((cupy_backend.UNION_FINE_TAIL_SPLITS, cupy_backend.UNION_SPLITS))

    profile_run.run_ab(["default", "UNION_FINE_TAIL_SPLITS=0,UNION_SPLITS=2"], 2, set_knob, call, 20)
    assert warm[:2] == [(before, 0), (0, 2)]
    assert seen == [(before, 0), (0, 2), (0, 2), (before, 0)]
    assert cupy_backend.UNION_FINE_TAIL_SPLITS == before and cupy_backend.UNION_SPLITS == 0
    out = capsys.readouterr().out.splitlines()
    assert out.count("checksum 7") == 4
    assert out[-2] == f"ab mean {100 + before + 0.25:.2f} us over 2 rounds ({100 + before + 0.1:.1f} {100 + before + 0.4:.1f}): default"
    assert out[-1] == "ab mean 100.25 us over 2 rounds (100.2 100.3): UNION_FINE_TAIL_SPLITS=0,UNION_SPLITS=2"


def test_union_layout_sim_matches_the_model_on_equal_pairs():
    # bench/union_layout_sim.py's launch with every pair the same work ends when the layout's model
    # (_union_makespan) says, for the model's layouts and the fine tail's alike
    sim = _load("union_layout_sim")
    from hisa_cupy.kernels import cupy_backend as cb

    for pairs in (100, 512, 700, 2048):
        for name, layout in sim.layouts(pairs, 396, 132).items():
            assert sim.launch_end(np.ones(pairs), layout, 396) == pytest.approx(
                cb._union_makespan(pairs, layout, 396)), (pairs, name)
    assert sim.layouts(512, 396, 132) == {"model": (380, 1, 3), "default": (393, 1, 8)}
    # unequal pairs: the last pair, twice the work, ends a pair's time after the rest when whole,
    # half of one when every pair is in 2 shares (its shares start as the first ones end), and with
    # the others when only its own work is in 2 shares
    work = np.array([1.0] * 8 + [2.0])
    assert sim.launch_end(work, (9, 1, 1), 10, cta_cost=0.0) == pytest.approx(2.0)
    assert sim.launch_end(work, (0, 2, 2), 10, cta_cost=0.0) == pytest.approx(1.5)  # 18 CTAs over 10 slots
    assert sim.launch_end(work, (8, 1, 2), 10, cta_cost=0.0) == pytest.approx(1.0)  # 10 CTAs of 1.0
    assert sim.launch_end(work, (8, 1, 2), 10) == pytest.approx(1.0 + cb._UNION_CTA_COST)


def test_union_layout_sim_group_unions(capsys):
    # unions of groups of neighbouring rows (padding -1 ignored; a short last group keeps its rows),
    # and main's line per group size against the same rows' pairs
    sim = _load("union_layout_sim")
    blocks = np.array([[0, 1, 2, -1], [0, 1, 3, -1], [0, 1, 2, 4], [5, 6, -1, -1], [0, 7, -1, -1]])
    assert sim.group_union_sizes(blocks, 2).tolist() == [4, 6, 2]
    assert sim.group_union_sizes(blocks, 4).tolist() == [7, 2]
    assert sim.group_union_sizes(blocks, 8).tolist() == [8]
    sim.main(["--S", "4096", "--T", "66", "--m", "4", "--slots", "8", "--sms", "4", "--groups", "4"])
    out = capsys.readouterr().out.splitlines()
    # the line against a direct count: the 16 whole groups of 4 rows (rows 64-65 left out), each
    # against its two pairs' unions
    sel = sim.selected_blocks(4096, 66, 4, 128, "segments", 0)
    rows = [set(int(b) for b in r if b >= 0) for r in sel[:64]]
    quads = [len(set().union(*rows[i:i + 4])) for i in range(0, 64, 4)]
    pairs = [len(rows[i] | rows[i + 1]) + len(rows[i + 2] | rows[i + 3]) for i in range(0, 64, 4)]
    assert out[0] == (f"groups of 4 rows: union blocks mean {np.mean(quads):.1f} (min {min(quads)}, max {max(quads)}), "
                      f"their pairs' unions {np.mean(pairs):.1f} ({sum(quads) / sum(pairs) - 1:+.1%} key tiles)")
    with pytest.raises(SystemExit):
        sim.main(["--S", "4096", "--T", "66", "--m", "4", "--groups", "3"])


def test_union_layout_sim_unions(capsys):
    # the pairs' unions from the reference's block selection: m to 2m blocks each (every row here
    # has more than m eligible blocks), the same as a direct count; main prints the four launches
    sim = _load("union_layout_sim")
    from hisa_cupy import reference, workloads

    sizes = sim.pair_union_sizes(4096, 65, 4, 128, "segments", 0)
    assert sizes.shape == (33,) and sizes[-1] <= 4
    w = workloads.make_workload("segments", seq_len=4096, num_queries=65, seed=0)
    pooled, pscale = reference.pool_keys(w.k, w.k_scale, block_size=128)
    blocks = reference.select_blocks(w.q, pooled, w.weights, pooled_scale=pscale, ks=w.ks, ke=w.ke,
                                     block_size=128, block_topk=4, seq_len=4096)
    assert sizes[5] == len(set(blocks[10]) | set(blocks[11]) - {-1})
    assert ((sizes[:-1] >= 4) & (sizes[:-1] <= 8)).all()
    sim.main(["--S", "4096", "--T", "65", "--m", "4", "--slots", "8", "--sms", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("33 pairs; union blocks per pair: min ") and len(out) == 5
    assert out[1].startswith("model ") and out[1].endswith("(+0.0%)") and "largest first" in out[2]
