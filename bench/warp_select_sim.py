"""How many steps the block top-m's warp select takes on a workload's rows (a CPU replay).

row_select_warp (kernels/cuda/row_select.cuh, warp mode) holds a row of up to 32 R ranking keys as
R registers per lane (item n in lane n % 32, register n // 32). It builds the k-th largest key bit
by bit: each step counts the keys at or above a candidate (a pass over the registers and a warp
sum), from the highest bit where the search range's ends differ, and stops as soon as exactly k
keys lie at or above the candidate. Then one in-order pass over the 32 R / 32 steps gives every
kept item its slot by a ballot. With BOUND (the block top-m, 3 <= k <= 64) the range is [x, hi]
instead of the row's [min, max]: x the least over the lanes of each lane's second largest key that
is not forced, hi the largest such key.

This script replays both searches, and counts the in-order pass's steps that select nothing, on
the NumPy reference's block scores of a workload (pooled keys, block scores, the first and last
eligible blocks forced, the kernels' ranking keys), without a GPU:

    python bench/warp_select_sim.py --S 131072 --T 1024 --rows 256

Session 36 (bench/NOTES.md) on segments, m = 64: 15.6 -> 9.7 search steps per row at 128K/1024
(rows span both signs of score, so the unbounded search starts at bit 31), 14.1 -> 10.5 at
32K/4096; 22.7 of the in-order pass's 32 steps select nothing at 128K/1024 (0.2 of 8 at 32K/4096).
"""
from __future__ import annotations

import argparse

import numpy as np

from hisa_cupy.testing import add_replay_arguments, score_keys

KEY_NONE = 0
KEY_FORCED = 0xFFFFFFFF


def search(keys: np.ndarray, k: int, bound: bool = False) -> tuple[int, int, int]:
    """(thr, need, steps) of row_select_warp's threshold search over one row of ranking keys
    (uint32 values as ints, KEY_NONE for no item; a multiple of 32 long). The kernel keeps the keys
    above thr and the first ``need`` keys equal to it in position order (need = -1: all of them);
    ``steps`` is the number of candidate counts it takes."""
    keys = np.asarray(keys, dtype=np.int64)
    valid = keys[keys != KEY_NONE]
    if len(valid) <= k or k <= 0:
        return (1, -1, 0) if k > 0 else (KEY_FORCED, 0, 0)
    mn, mx = int(valid.min()), int(valid.max())
    if mn == mx:
        return mn, k, 0
    lo, hi = mn, mx
    if bound and 3 <= k <= 64:
        lanes = np.where(keys == KEY_FORCED, KEY_NONE, keys).reshape(-1, 32).T  # [lane, register]
        top = np.sort(lanes, axis=1)
        x, y = int(top[:, -2].min()) if top.shape[1] > 1 else 0, int(top[:, -1].max())
        if mn < x < y:
            lo, hi = x, y
    bit = (lo ^ hi).bit_length() - 1
    prefix = lo & ~((2 << bit) - 1) & 0xFFFFFFFF
    steps = 0
    for b in range(bit, -1, -1):
        steps += 1
        cand = prefix | (1 << b)
        c = int((valid >= cand).sum())
        if c >= k:
            prefix = cand
            if c == k:
                return int(valid[valid >= cand].min()), -1, steps
    return prefix, k - int((valid > prefix).sum()), steps


def selected(keys: np.ndarray, thr: int, need: int) -> np.ndarray:
    """Positions the in-order pass keeps: keys above thr, then the first ``need`` equal to it."""
    keys = np.asarray(keys, dtype=np.int64)
    above = (keys > thr) & (keys != KEY_NONE)
    ties = np.nonzero((keys == thr) & (keys != KEY_NONE))[0]
    keep = above.copy()
    keep[ties if need < 0 else ties[:need]] = True
    return np.nonzero(keep)[0]


def block_rows(S: int, T: int, m: int, B: int, nrows: int, kind: str, seed: int):
    """The block top-m's rows of ranking keys (one per sampled query, nb = S / B rounded up to 32)."""
    from hisa_cupy import reference, workloads

    w = workloads.make_workload(kind, seq_len=S, num_queries=T, seed=seed)
    rows = np.arange(0, T, max(1, T // nrows))
    pooled, pscale = reference.pool_keys(w.k, w.k_scale, block_size=B)
    nb = pooled.shape[0]
    J = reference.block_scores(w.q[rows], pooled, w.weights[rows], pscale)
    ks, ke = w.ks[rows], w.ke[rows]
    out = []
    for j in range(len(rows)):
        first, last = int(ks[j]) // B, min(nb - 1, (int(ke[j]) - 1) // B)
        keys = np.zeros(-(-nb // 32) * 32, dtype=np.int64)
        if last >= first:
            keys[first:last + 1] = score_keys(J[j, first:last + 1])
            keys[first] = keys[last] = KEY_FORCED
        out.append(keys)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_replay_arguments(p, rows=256, rows_help="rows sampled at a stride of T // rows")
    a = p.parse_args(argv)
    plain, bounded, empty = [], [], []
    for keys in block_rows(a.S, a.T, a.m, a.B, a.rows, a.kind, a.seed):
        thr, need, steps = search(keys, a.m)
        plain.append(steps)
        bounded.append(search(keys, a.m, bound=True)[2])
        steps_used = np.unique(selected(keys, thr, need) // 32)  # min(m, valid keys) of them
        empty.append(len(keys) // 32 - len(steps_used))
    plain, bounded, empty = np.array(plain), np.array(bounded), np.array(empty)
    print(f"rows: {len(plain)}; search steps per row: mean {plain.mean():.1f}, max {plain.max()} "
          f"(bounded: mean {bounded.mean():.1f}, max {bounded.max()})")
    print(f"in-order pass steps that select nothing: mean {empty.mean():.1f} of {len(keys) // 32}")


if __name__ == "__main__":
    main()
