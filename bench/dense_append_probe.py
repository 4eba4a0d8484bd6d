"""Probe (wip/dense-append): what dense_select's score kernel costs in threshold mode.

Threshold mode (score_wgmma.cuh, AppendOut) appends the keys >= a per-row threshold with their
columns instead of writing every ranking key; with thresholds from a sample, that would drop the
filter's second pass over the keys (bench/NOTES.md, session 29). This times, on one row chunk of
the dense call at S / T (segments data, fp8), the score kernel as main launches it against the
threshold-mode kernel, in alternation, with each row's threshold at its R-th largest key (from the
keys the main kernel wrote), and checks that the appended lists hold exactly the keys >= the
threshold. It also counts the (row, CTA) pairs whose keys >= threshold overflow the CTA's
shared-memory list (APPEND_CAP), which then take one global atomic per key.

    python bench/dense_append_probe.py --S 131072 --T 4096 --rank 4096 --reps 10
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

APPEND_CAP = 416                       # score_wgmma.cuh
APPEND_SMEM = 2 * APPEND_CAP * 8 + 16  # score_wgmma.cuh


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--S", type=int, default=131072)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--rank", type=int, action="append", default=None,
                   help="each row's threshold: its rank-th largest key (repeatable)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=-1, help="which row chunk of the call (default: the last)")
    args = p.parse_args(argv)
    ranks = args.rank or [4096]

    import cupy as cp
    import numpy as np
    import torch

    import hisa_cupy
    from hisa_cupy.kernels import cupy_backend as cb
    from hisa_cupy.testing import to_torch
    from hisa_cupy.workloads import make_workload

    wl = make_workload("segments", seq_len=args.S, num_queries=args.T, seed=0)
    q, k, w, ksc = (to_torch(x) for x in (wl.q, wl.k, wl.weights, wl.k_scale))
    out = torch.empty(args.T, 2048, dtype=torch.int32, device="cuda")
    captured = {}
    orig = cb._dense

    def spy(*a):
        captured["args"] = a
        return orig(*a)

    cb._dense = spy
    try:
        hisa_cupy.dense_select(q, k, w, k_scale=ksc, topk=2048, out=out, validate=False)
    finally:
        cb._dense = orig
    torch.cuda.synchronize()
    q_, k_, w_, ksc_, ks_, ke_, topk, _ib, _order, _out, stream, _em = captured["args"]
    T, H, D = q_.shape
    S = k_.shape[0]
    name, smem, rows, launches = cb._dense_plan(q_, k_, T, H, D, S, topk)
    assert "wgmma" in name, name
    r0, nr, grid, head, tail = launches[args.chunk]
    keys = cb.workspace(stream).get("dense_keys", (rows, S), np.uint32)
    ptr = cb._DIRECT.ptr
    ptrs = (ptr(q_), ptr(k_), ptr(w_), ptr(ksc_), ptr(ks_), ptr(ke_))
    fn = cb._kernel("dense.cu", name, smem)
    name_app = name.replace("dense_score_wgmma_kernel", "dense_score_append_wgmma_kernel")
    smem_app = smem + APPEND_SMEM
    fn_app = cb._kernel("dense.cu", name_app, smem_app)
    cap = 16384
    thr = cp.zeros(rows, dtype=cp.uint32)
    cand_key = cp.zeros((rows, cap), dtype=cp.uint32)
    cand_col = cp.zeros((rows, cap), dtype=cp.int32)
    count = cp.zeros(rows, dtype=cp.int32)
    app_args = ptrs + head + (ptr(thr), ptr(cand_key), ptr(cand_col), ptr(count), np.int32(cap), tail[1])

    def launch_main():
        cb._DIRECT.launch(fn, grid, (cb.SCORE_THREADS,), ptrs + head + (ptr(keys),) + tail, smem)

    def launch_app():
        cb._DIRECT.launch(fn_app, grid, (cb.SCORE_THREADS,), app_args, smem_app)

    dev = torch.cuda.get_device_name()
    print(f"{dev}: chunk rows [{r0}, {r0 + nr}) of T = {T}, S = {S}; grid {grid}, smem {smem} / {smem_app}")
    with cb._on_stream(stream):
        launch_main()
        cp.cuda.get_current_stream().synchronize()
        kk = keys[:nr].astype(cp.int64)
        srt = -cp.sort(-kk, axis=1)  # descending per row
        for rank in ranks:
            thr[:nr] = srt[:, rank - 1].astype(cp.uint32)
            count.fill(0)
            launch_app()
            cp.cuda.get_current_stream().synchronize()
            above = kk >= thr[:nr].astype(cp.int64)[:, None]
            ref = above.sum(axis=1)
            got = count[:nr]
            ok_counts = bool((ref == got).all())
            # the lists hold exactly the columns >= the threshold, with their keys (rows sampled)
            ok_sets = True
            for r in range(0, nr, max(1, nr // 16)):
                n = int(got[r])
                cols = cp.sort(cand_col[r, :n])
                want = cp.nonzero(above[r])[0].astype(cp.int32)
                if cols.shape != want.shape or not bool((cols == want).all()):
                    ok_sets = False
                elif not bool((cand_key[r, :n] == keys[r, cand_col[r, :n]]).all()):
                    ok_sets = False
            per_cta = above[:, : (S // 4096) * 4096].reshape(nr, -1, 4096).sum(axis=2)
            over = float((per_cta > APPEND_CAP).mean())
            print(f"rank {rank}: keys >= threshold per row mean {float(ref.mean()):.0f} max {int(ref.max())}; "
                  f"counts equal {ok_counts}, lists equal (16 rows) {ok_sets}; (row, CTA) pairs over the "
                  f"shared list {100 * over:.2f}%, max per CTA {int(per_cta.max())}")
            times = {"main": [], "append": []}
            ev = [cp.cuda.Event() for _ in range(4)]
            for i in range(args.reps):
                order = ("main", "append") if i % 2 == 0 else ("append", "main")
                for label in order:
                    count.fill(0)
                    ev[0].record()
                    (launch_main if label == "main" else launch_app)()
                    ev[1].record()
                    ev[1].synchronize()
                    times[label].append(cp.cuda.get_elapsed_time(ev[0], ev[1]))
            mm, ma = statistics.median(times["main"]), statistics.median(times["append"])
            print(f"rank {rank}: score kernel {mm * 1e3:.1f} us, threshold mode {ma * 1e3:.1f} us "
                  f"({100 * (ma / mm - 1):+.2f}%), medians of {args.reps}")


if __name__ == "__main__":
    main()
