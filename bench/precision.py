"""Score precision of the CuPy backend's scoring engines against the float64 reference.

    python bench/precision.py [--S 16384] [--T 128]

For each workload kind and engine (wgmma = the Hopper fp8/bf16 tensor-core path of
score_wgmma.cuh, mma.sync = score_tile.cuh), runs hisa_cupy.refine on the reference's blocks,
decodes the candidate scores the kernel wrote (the ranking keys of the workspace) and compares
them with the reference token scores. Errors are reported relative to the score and relative to
the magnitude sum_h |w_h| * relu(q_h . k) * k_scale, which bounds what any fp32-class
accumulation can promise (the fp8 tensor cores accumulate in a narrower format; see
bench/NOTES.md).
"""
import argparse

import numpy as np
import torch

import hisa_cupy
from hisa_cupy import reference, workloads
from hisa_cupy.kernels import cupy_backend
from hisa_cupy.testing import to_torch


def decode(keys):
    """Ranking keys (common.cuh score_key) -> float32 scores; NaN where not a scored candidate."""
    k = keys.astype(np.uint32)
    bits = np.where(k & 0x80000000, k & 0x7FFFFFFF, ~k).astype(np.uint32)
    out = bits.view(np.float32).copy()
    out[(k == 0) | (k == 1)] = np.nan
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--m", type=int, default=16)
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    B = 128
    for kind in ("random", "segments"):
        w = workloads.make_workload(kind, seq_len=args.S, num_queries=args.T, seed=1)
        ref = reference.token_scores(w.q, w.k, w.weights, w.k_scale).astype(np.float64)
        q64 = w.q.astype(np.float32).astype(np.float64)
        k64 = w.k.astype(np.float32).astype(np.float64)
        logits = np.einsum("thd,sd->ths", q64, k64)
        mag = np.einsum("th,ths->ts", np.abs(w.weights.astype(np.float64)), np.maximum(logits, 0)) * w.k_scale
        rp, _ = reference.pool_keys(w.k, w.k_scale)
        blocks = reference.select_blocks(w.q, rp, w.weights, ks=w.ks, ke=w.ke, block_topk=args.m, seq_len=args.S)
        pos = (blocks[:, :, None] * B + np.arange(B)[None, None, :]).reshape(args.T, -1)
        for engine in ("wgmma", "mma.sync"):
            cupy_backend.USE_WGMMA = engine == "wgmma"
            hisa_cupy.refine(to_torch(w.q), to_torch(w.k), to_torch(w.weights), torch.from_numpy(blocks).cuda(),
                             k_scale=to_torch(w.k_scale), ks=to_torch(w.ks), ke=to_torch(w.ke), topk=1024,
                             backend="cupy")
            torch.cuda.synchronize()
            ws = next(iter(cupy_backend._workspaces.values()))
            got = decode(ws.get("cand_keys", (args.T, args.m * B), np.uint32).get())
            ok = ~np.isnan(got) & (blocks.repeat(B, axis=1) >= 0)
            r = np.take_along_axis(ref, np.clip(pos, 0, args.S - 1), axis=1)
            mg = np.take_along_axis(mag, np.clip(pos, 0, args.S - 1), axis=1)
            err = np.abs(got - r)[ok]
            rel_mag = err / np.maximum(mg[ok], 1e-30)
            rel = err / np.maximum(np.abs(r[ok]), 1e-30)
            print(f"{kind:9s} {engine:9s} S={args.S} T={args.T}: n={ok.sum()} max|err|={err.max():.3g} "
                  f"max err/mag={rel_mag.max():.3g} (p99 {np.quantile(rel_mag, 0.99):.3g})  "
                  f"max err/|score|={rel.max():.3g} (p99 {np.quantile(rel, 0.99):.3g})", flush=True)
    cupy_backend.USE_WGMMA = True


if __name__ == "__main__":
    main()
