"""How a union launch's layout plays out with the pairs' own work (a CPU simulation).

refine_union_wgmma_kernel scores two neighbouring query rows over the union of their selected
blocks. A launch lays its pairs out as whole pairs, then the last pairs in shorter shares, one CTA
per share (kernels/cupy_backend.py: _union_layout), and its CTAs start in launch order on the slot
that frees first. _union_makespan, the layout's model, counts every pair as the same work. This
script takes each pair's work as its union's block count instead (the NumPy reference's block
selection of a workload, no GPU) and simulates the launch for the model's layout (the fine tail
off), the fine tail (_union_fine_tail, the default), and both with the pairs in order of work,
largest first (not what the kernels do: the host does not know the unions' sizes):

    python bench/union_layout_sim.py --S 131072 --T 1024
    python bench/union_layout_sim.py --S 131072 --T 4096 --groups 4,8   # key tiles of wider row groups

Times are in mean pairs' work; each CTA also costs cupy_backend._UNION_CTA_COST. Session 38
(bench/NOTES.md), segments 128K/1024, m = 64, 396 slots: unions of 64-104 blocks (median 76), the
model's layout 1.64, the fine tail 1.55 (-5.2%; measured on an H200: the union kernel -4.8%),
largest first 1.54 / 1.53. The simulation leaves out that CTAs alone on an SM run faster: where
the pairs are alike it is pessimistic about short shares (bench/NOTES.md, session 38).
"""
from __future__ import annotations

import argparse
import heapq

import numpy as np

from hisa_cupy.kernels import cupy_backend


def selected_blocks(S: int, T: int, m: int, B: int, kind: str, seed: int) -> np.ndarray:
    """[T, m] block ids (ascending, -1 padded): the reference's block selection of the workload."""
    from hisa_cupy import reference, workloads

    w = workloads.make_workload(kind, seq_len=S, num_queries=T, seed=seed)
    pooled, pscale = reference.pool_keys(w.k, w.k_scale, block_size=B)
    return reference.select_blocks(w.q, pooled, w.weights, pooled_scale=pscale, ks=w.ks, ke=w.ke,
                                   block_size=B, block_topk=m, seq_len=S)


def group_union_sizes(blocks: np.ndarray, rows: int) -> np.ndarray:
    """Blocks in the union of each group of ``rows`` neighbouring rows' selected blocks (rows
    g * rows, ...; the last group of a T that ``rows`` does not divide: the rows left)."""
    sizes = []
    for r0 in range(0, blocks.shape[0], rows):
        grp = blocks[r0:r0 + rows]
        sizes.append(len(np.unique(grp[grp >= 0])))
    return np.array(sizes)


def pair_union_sizes(S: int, T: int, m: int, B: int, kind: str, seed: int) -> np.ndarray:
    """Blocks in the union of rows 2p and 2p + 1's selected blocks, per pair p (the last pair of an
    odd T: its one row's), from the reference's block selection of the workload."""
    return group_union_sizes(selected_blocks(S, T, m, B, kind, seed), 2)


def launch_end(work, layout, slots: int, cta_cost: float = cupy_backend._UNION_CTA_COST) -> float:
    """When a union launch over len(work) pairs laid out as ``layout`` (head pairs, their shares,
    the others' shares) ends: pair p's CTAs each take work[p] / shares + cta_cost, and every CTA
    starts, in launch order, on the slot that frees first."""
    head_pairs, head_splits, tail_splits = layout
    free = [0.0] * slots  # when each slot frees (a heap)
    end = 0.0
    for p, w in enumerate(work):
        splits = head_splits if p < head_pairs else tail_splits
        for _ in range(splits):
            t = heapq.heappop(free) + w / splits + cta_cost
            end = max(end, t)
            heapq.heappush(free, t)
    return end


def layouts(pairs: int, slots: int, sms: int) -> dict:
    """The model's layout (the fine tail off) and the default one, as _union_layout gives them."""
    saved = cupy_backend.UNION_FINE_TAIL_SPLITS
    try:
        cupy_backend.UNION_FINE_TAIL_SPLITS = 0
        model = cupy_backend._union_layout(pairs, sms, slots)
    finally:
        cupy_backend.UNION_FINE_TAIL_SPLITS = saved
    return {"model": model, "default": cupy_backend._union_layout(pairs, sms, slots)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--S", type=int, default=131072)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--B", type=int, default=128)
    p.add_argument("--kind", default="segments")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sms", type=int, default=132, help="SMs (H200: 132)")
    p.add_argument("--slots", type=int, default=396, help="union CTAs resident at once (H200, m <= 128: 3 per SM)")
    p.add_argument("--groups", default="", metavar="G1,G2,...",
                   help="also the unions of groups of G neighbouring rows (a multiple of 2), against their pairs' "
                        "(the key tiles a kernel over G rows would load, against the union kernel's)")
    a = p.parse_args(argv)
    blocks = selected_blocks(a.S, a.T, a.m, a.B, a.kind, a.seed)
    sizes = group_union_sizes(blocks, 2)
    for g in (int(x) for x in a.groups.split(",") if x):
        if g % 2 or g < 2:
            p.error(f"--groups: {g} is not an even number of rows")
        whole = (a.T // g) * g  # whole groups only, so that each holds g / 2 whole pairs
        grp = group_union_sizes(blocks[:whole], g)
        pairs = group_union_sizes(blocks[:whole], 2).reshape(-1, g // 2).sum(axis=1)
        print(f"groups of {g} rows: union blocks mean {grp.mean():.1f} (min {grp.min()}, max {grp.max()}), "
              f"their pairs' unions {pairs.mean():.1f} ({grp.sum() / pairs.sum() - 1:+.1%} key tiles)")
    work = sizes / sizes.mean()
    print(f"{len(sizes)} pairs; union blocks per pair: min {sizes.min()}, median {np.median(sizes):g}, "
          f"max {sizes.max()}, cv {sizes.std() / sizes.mean():.3f}")
    largest_first = np.sort(work)[::-1]
    base = None
    for name, layout in layouts(len(sizes), a.slots, a.sms).items():
        for order, w in (("launch order", work), ("largest first", largest_first)):
            end = launch_end(w, layout, a.slots)
            base = end if base is None else base
            print(f"{name:8s} {str(layout):16s} {order:14s} ends at {end:.3f} ({end / base - 1:+.1%})")


if __name__ == "__main__":
    main()
