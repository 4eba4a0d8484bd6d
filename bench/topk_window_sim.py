"""Which path topk_regs_kernel's score order takes on a row (row_select.cuh, `hisa_cupy.topk`).

Over rows of at most 8192 fp32 scores, by score, row_select_regs with WINDOW_SH (topk_regs_kernel:
2048 buckets, WINDOW_SH = 14) first tries the window of keys below the row's largest key:
2^(11 + 14) keys, the four binades below the largest score, or the row's whole range if that is
smaller. Where the row holds more than k keys:

* ``guard``: one key a thread (items 0, 16, 32, ...: each thread's first of its 16) is tested
  against the window; where 16 times the hits fall below 3/4 of k, the row skips the window;
* ``fewer``: the window's histogram holds fewer than k keys, so the row falls back;
* ``full``: a bucket from the threshold's up holds more than LIST_BUCKET_MAX (128) keys, so the
  row falls back;
* ``window``: the row is sorted in the window, the threshold in bucket ``thr`` (0-2047);

and ``levels`` where it holds k keys or fewer (the window is not tried). The fallback is the level
over the row's whole range, then the same bucket sort from that level's bin up.

This mirrors the kernel's rule for the tests (tests/test_bench.py: the GPU tests' row kinds cover
every path) and for a look at other rows, without a GPU:

    python bench/topk_window_sim.py --rows 6 --cols 8192 --k 2048
"""
from __future__ import annotations

import argparse

import numpy as np

from hisa_cupy.testing import score_keys

BITS = 11         # topk_regs_kernel's DIRECT_BITS: 2048 buckets
WINDOW_SH = 14    # its WINDOW_SH: 2^14 keys a bucket
PER_THREAD = 16   # REG_SELECT_R: keys per thread, the guard's sample stride
BUCKET_MAX = 128  # LIST_BUCKET_MAX


def window_path(scores: np.ndarray, k: int) -> tuple[str, int | None]:
    """(path, threshold bucket or None) of one row of fp32 ``scores`` (all valid: no lengths)."""
    keys = score_keys(scores).astype(np.int64)
    if len(keys) <= k:
        return "levels", None
    lo, hi = int(keys.min()), int(keys.max())
    width = (1 << (BITS + WINDOW_SH)) - 1
    wlo = hi - width if hi - lo > width else lo
    inside = keys >= wlo
    hits = int(inside[::PER_THREAD].sum())
    if 4 * PER_THREAD * hits < 3 * k:
        return "guard", None
    span = hi - wlo
    sh = 0 if span == 0 else max(0, span.bit_length() - BITS)
    counts = np.bincount((keys[inside] - wlo) >> sh, minlength=1 << BITS)
    from_top = np.cumsum(counts[::-1])
    if from_top[-1] < k:
        return "fewer", None
    thr = len(counts) - 1 - int(np.searchsorted(from_top, k))
    if counts[thr:].max() > BUCKET_MAX:
        return "full", thr
    return "window", thr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    kinds = {
        "randn": lambda: rng.standard_normal((args.rows, args.cols)),
        "uniform": lambda: rng.random((args.rows, args.cols)),
        "wide": lambda: rng.choice([-1.0, 1.0], (args.rows, args.cols)) * 10.0 ** rng.uniform(-30, 30, (args.rows, args.cols)),
    }
    for name, make in kinds.items():
        rows = make().astype(np.float32)
        print(f"{name:8s}", [window_path(r, args.k) for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
