"""``python -m hisa_cupy``: the demo and info commands, run as a user would (subprocess)."""
import subprocess
import sys

import numpy as np
import pytest

from hisa_cupy.__main__ import block_statistics, probe_gpu

TINY = ["--seq-len", "1024", "--queries", "24", "--heads", "16", "--head-dim", "32",
        "--block-size", "32", "--block-topk", "8", "--topk", "64"]


def _run(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "hisa_cupy", *args], capture_output=True,
                          text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _number_after(text, label):
    line = next(line for line in text.splitlines() if label in line)
    return float(line.split(label)[1].split()[0].rstrip("%,"))


def test_demo_numpy_backend_tiny():
    out = _run("demo", "--backend", "numpy", *TINY).stdout
    assert "backend: numpy" in out
    assert "S=1024 T=24" in out and "topk=64 block_size=32 block_topk=8" in out
    iou = _number_after(out, "mean IoU")
    assert 0.0 < iou <= 1.0
    assert "forced blocks" in out and "distance back" in out
    covered = _number_after(out, "positions inside the selected blocks:")
    assert 0.0 < covered <= 100.0
    for stage in ("dense_select", "hisa_select", "pool_keys", "select_blocks", "refine"):
        assert stage in out


def test_demo_auto_backend_says_what_it_runs():
    out = _run("demo", *TINY, "--kind", "needles").stdout
    usable, _ = probe_gpu()
    if usable:
        assert "backend: cupy" in out
    else:
        assert "No usable CUDA GPU" in out and "backend: numpy" in out
    assert "IoU" in out
    assert "needle recall dense" in out and "needle recall hisa" in out


def test_demo_hisa_equals_dense_when_every_block_fits():
    # 1024 / 32 = 32 blocks <= m = 32: HISA must reproduce dense exactly (SPEC §5.4).
    args = TINY[:TINY.index("--block-topk")] + ["--block-topk", "32", "--topk", "64"]
    out = _run("demo", "--backend", "numpy", *args).stdout
    assert "block filter active on 0 of 24 rows" in out
    assert "mean IoU 1.0000" in out


def test_demo_cupy_without_gpu_is_a_clear_error():
    if probe_gpu()[0]:
        pytest.skip("a GPU is present: the cupy backend is usable here")
    proc = _run("demo", "--backend", "cupy", *TINY, check=False)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr


def test_info_lists_backends():
    out = _run("info").stdout
    assert "hisa_cupy" in out and "numpy" in out and "cupy" in out and "GPU:" in out


def test_no_command_prints_usage():
    proc = _run(check=False)
    assert proc.returncode == 2 and "demo" in proc.stdout


def test_block_statistics_by_hand():
    # B = 4, S = 32 (8 blocks), m = 3. Row 0 sees [0, 32): blocks 0..7, forced 0 and 7.
    # Row 1 sees [0, 8): blocks 0..1 only (<= m: filter inactive).
    blocks = np.array([[0, 3, 7], [0, 1, -1]], dtype=np.int32)
    dense = np.array([[0, 13, 20, 31], [1, 5, -1, -1]], dtype=np.int32)
    ks = np.array([0, 0], np.int32)
    ke = np.array([32, 8], np.int32)
    st = block_statistics(blocks, dense, ks, ke, block_size=4, seq_len=32)
    assert st["ranked_rows"] == 1
    assert st["selected_mean"] == 2.5 and st["eligible_mean"] == 5.0
    assert st["forced_mean"] == 1.0  # 2 on row 0, none on row 1
    assert st["forced_fraction"] == 2 / 5
    # Ranked block 3 (positions 12..15, centre 13.5) seen from position 31: 17.5 back.
    assert st["back_mean"] == 17.5
    # Dense picks: row 0 -> blocks 0, 3, 5, 7 (5 not kept); row 1 -> blocks 0, 1 (kept).
    assert st["dense_covered"] == 5 / 6
    assert st["dense_in_forced"] == 2 / 6  # blocks 0 and 7 of row 0; row 1 has no forced block
    assert st["useful_blocks"] == 1.0
