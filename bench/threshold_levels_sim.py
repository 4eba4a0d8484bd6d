"""How many threshold levels the register-mode select (row_select.cuh) takes on refinement rows.

The refinement top-k (refine_topk_regs_kernel) finds the k-th largest of a row's ranking keys by
levels of 2048 bins over key bits (range_level: the valid keys' range [lo, hi] split into bins of
2^sh keys, sh the smallest shift that leaves at most 2048 bins), each level zooming into the bin
that holds the k-th key until that bin is needed whole or is one key value. A level by score value
(LinearBins: 2048 bins linear in the score over the row's range) is the alternative; where its
bin of the k-th key holds few keys, one warp can rank them exactly.

This script replays both rules on the NumPy reference's candidates of a few rows of a workload
(pooled keys, the reference's block selection, then each sampled row's token scores over its
blocks), without a GPU:

    python bench/threshold_levels_sim.py --S 131072 --T 1024 --rows 25

Session 34 (bench/NOTES.md) on segments, 128K keys, T = 1024, 25 rows: two levels over key bits in
23 rows and three in 2 (first-level bins of 35-1660 keys); the level by value left 6-21 keys in the bin.

Since session 45 the kernel's first level covers the window of 2^25 keys below the row's largest
(cut_by_window, row_select.cuh); ``window_path`` replays which way that goes and ``main`` prints the
window's bin of the k-th per row: 3-20 keys on segments rows at 128K keys, T = 4096, so that the bin
is ranked directly in nearly every row instead of by a second level.
"""
from __future__ import annotations

import argparse

import numpy as np

from hisa_cupy.testing import add_replay_arguments, score_keys

NBINS = 2048


def _bin_of_rank(counts: np.ndarray, r: int) -> tuple[int, int]:
    """(bin, keys above it) of the r-th largest key (1-based), counts[b] keys in bin b."""
    from_top = np.cumsum(counts[::-1])
    i = int(np.searchsorted(from_top, r))
    b = len(counts) - 1 - i
    return b, int(from_top[i] - counts[b])


def key_bit_levels(keys: np.ndarray, r: int) -> list[int]:
    """The keys in the k-th's bin at each level of range_level / cut_by_levels (r = k <= len(keys))."""
    lo, hi = int(keys.min()), int(keys.max())
    sizes = []
    while True:
        span = hi - lo
        sh = 0 if span < NBINS else span.bit_length() - 11
        inside = keys[(keys >= lo) & (keys <= hi)]
        counts = np.bincount(((inside - lo) >> sh).astype(np.int64), minlength=(span >> sh) + 1)
        b, above = _bin_of_rank(counts, r)
        sizes.append(int(counts[b]))
        r -= above
        if counts[b] == r or sh == 0:
            return sizes
        lo += b << sh
        hi = min(hi, lo + (1 << sh) - 1)


WINDOW_SH = 14        # cut_by_window's bins: 2^14 keys each, 2048 of them below the largest key
WINDOW_RANK_MAX = 64  # the most keys of the k-th's bin that it ranks directly


def window_path(keys: np.ndarray, k: int) -> tuple[str, int]:
    """The way refine_topk_regs_kernel's threshold goes for one row of ranking keys (0: not a
    candidate), as cut_by_window takes it, and the keys in the window's bin of the k-th (0 where
    there is no window level): "all" (at most k candidates: no threshold), "narrow" (the keys'
    range fits the window: the levels), "below" (the window holds fewer than k keys: the levels over
    the row), "whole" (the window's bin of the k-th is needed whole), "rank" / "rank ties" (that bin
    ranked directly; ties: only some of the keys equal to the k-th are kept), "bin levels" (the bin
    holds more than WINDOW_RANK_MAX keys: the levels over it)."""
    v = np.asarray(keys)[np.asarray(keys) != 0].astype(np.int64)
    if v.size <= k:
        return "all", 0
    lo, hi = int(v.min()), int(v.max())
    width = (1 << (11 + WINDOW_SH)) - 1
    if hi - lo <= width:
        return "narrow", 0
    w = v[v >= hi - width]
    if w.size < k:
        return "below", 0
    b = (w - (hi - width)) >> WINDOW_SH
    counts = np.bincount(b, minlength=NBINS)
    kb, above = _bin_of_rank(counts, k)
    rb, n = k - above, int(counts[kb])
    if n == rb:
        return "whole", n
    if n > WINDOW_RANK_MAX:
        return "bin levels", n
    in_bin = np.sort(w[b == kb])[::-1]
    return ("rank" if (in_bin >= in_bin[rb - 1]).sum() == rb else "rank ties"), n


def linear_bin_size(scores: np.ndarray, r: int) -> int:
    """Keys in the bin of the r-th largest score among NBINS bins linear over [min, max] (finite
    float32 scores), binned as row_select.cuh's LinearBins does: scale = (NBINS - 1)(1 - 1/1024) /
    (max - min) in float32, bin = round(fma(x - min, scale, 2^23)) - 2^23 (the fma's one rounding
    through float64, where the product is exact); scale 0 (a range of 0) puts every key in bin 0."""
    x = np.asarray(scores, dtype=np.float32)
    xmin = x.min()
    rng = np.float32(x.max() - xmin)
    with np.errstate(divide="ignore", over="ignore"):
        scale = np.float32(np.float32((NBINS - 1) * (1 - 1 / 1024)) / rng)
    if not (0 < scale <= 3.0e38):
        scale = np.float32(0)
    d = (x - xmin).astype(np.float32)
    pos = (d.astype(np.float64) * np.float64(scale) + 8388608.0).astype(np.float32)
    b = pos.view(np.int32).astype(np.int64) - 0x4B000000
    counts = np.bincount(b, minlength=NBINS)
    return int(counts[_bin_of_rank(counts, r)[0]])


def sample_rows(S: int, T: int, m: int, B: int, k: int, nrows: int, kind: str, seed: int):
    """(levels over key bits, linear bin size, window path) per sampled row of a workload's refinement
    candidates."""
    from hisa_cupy import reference, workloads

    w = workloads.make_workload(kind, seq_len=S, num_queries=T, seed=seed)
    rows = np.unique(np.linspace(0, T - 1, nrows).astype(int))
    pooled, _ = reference.pool_keys(w.k, w.k_scale, block_size=B)
    blocks = reference.select_blocks(w.q[rows], pooled, w.weights[rows], ks=w.ks[rows], ke=w.ke[rows],
                                     block_size=B, block_topk=m, seq_len=S)
    out = []
    for j, t in enumerate(rows):
        bl = blocks[j][blocks[j] >= 0]
        toks = (bl[:, None] * B + np.arange(B)[None, :]).ravel()
        toks = toks[(toks >= w.ks[t]) & (toks < w.ke[t])]
        scores = reference.token_scores(w.q[t:t + 1], w.k[toks], w.weights[t:t + 1], w.k_scale[toks])[0]
        if len(scores) <= k:
            continue
        keys = score_keys(scores)
        out.append((key_bit_levels(keys, k), linear_bin_size(scores, k), window_path(keys, k)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_replay_arguments(p, rows=25, rows_help="rows sampled evenly over T")
    p.add_argument("--k", type=int, default=2048)
    a = p.parse_args(argv)
    res = sample_rows(a.S, a.T, a.m, a.B, a.k, a.rows, a.kind, a.seed)
    print("levels over key bits per row:", [len(lv) for lv, _, _ in res])
    print("first level's bin sizes:", [lv[0] for lv, _, _ in res])
    print("second level's bin sizes:", [lv[1] for lv, _, _ in res if len(lv) > 1])
    print("one level by value, bin sizes:", [lin for _, lin, _ in res])
    print("window below the largest key, per row (path, keys in the k-th's bin):", [wp for _, _, wp in res])


if __name__ == "__main__":
    main()
