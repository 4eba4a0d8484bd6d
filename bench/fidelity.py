#!/usr/bin/env python
"""Selection fidelity of HISA against the dense DSA indexer on the synthetic workloads.

For every workload kind, context length S and block budget m this measures, on the same inputs:
  * IoU of hisa_select with dense_select per query row (mean, 10th percentile, min);
  * block coverage: the share of dense's top-k positions that lie inside the blocks HISA kept
    (select_blocks output), i.e. the most the token stage could recover;
  * on ``needles``: needle recall, the share of planted (query row, needle position) pairs whose
    needle is selected, for dense, HISA and the block-sparse baseline;
  * the block-sparse baseline (SPEC §6: m = k / B blocks, no token refinement) for comparison.

It runs on any backend: the NumPy reference at small sizes on a CPU (the default without a GPU:
S in {4K, 8K}, T = 128, k = 512, m in {8, 16, 32}), or the CuPy kernels at DeepSeek-V3.2 sizes
(with a GPU: S in {8K, 32K, 128K}, T = 1024, k = 2048, m in {32, 64, 128}). Results: a markdown
table on stdout and JSON + markdown under ``--out`` (default bench/results/).

    python bench/fidelity.py                          # CPU: NumPy reference, a minute or two
    python bench/fidelity.py --backend cupy --seq-lens 131072 --block-topk 64
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _gpu():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _ints(text):
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv=None):
    from hisa_cupy.workloads import WORKLOAD_KINDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("auto", "numpy", "cupy", "numba"), default="auto",
                   help="auto: cupy with a GPU, numpy without")
    p.add_argument("--kinds", default=",".join(WORKLOAD_KINDS))
    p.add_argument("--seq-lens", default=None, help="S values, comma separated")
    p.add_argument("--queries", type=int, default=None, help="T query rows at the end of the sequence")
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--block-topk", default=None, help="m values, comma separated")
    p.add_argument("--pool-dtype", default="bfloat16", choices=("bfloat16", "float32", "float8_e4m3fn"))
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float8_e4m3fn")
    p.add_argument("--seeds", default="0", help="workload seeds, comma separated (results averaged)")
    p.add_argument("--no-block-sparse", action="store_true", help="skip the block-sparse baseline")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    for k in args.kinds:
        if k not in WORKLOAD_KINDS:
            p.error(f"--kinds: unknown kind {k!r} (expected {WORKLOAD_KINDS})")
    gpu = _gpu()
    if args.backend == "auto":
        args.backend = "cupy" if gpu else "numpy"
    if args.backend == "cupy" and not gpu:
        p.error("--backend cupy needs a CUDA GPU; none is usable here")
    on_gpu = args.backend == "cupy" or (args.backend == "numba" and gpu is not None)
    args.on_gpu = on_gpu
    args.gpu = gpu
    args.seq_lens = _ints(args.seq_lens) if args.seq_lens else ((8192, 32768, 131072) if on_gpu else (4096, 8192))
    args.queries = args.queries or (1024 if on_gpu else 128)
    args.topk = args.topk or (2048 if on_gpu else 512)
    args.block_topk = _ints(args.block_topk) if args.block_topk else ((32, 64, 128) if on_gpu else (8, 16, 32))
    args.seeds = _ints(args.seeds)
    return args


def _inputs(wl, on_gpu):
    """Selection-API keyword arguments for a workload: NumPy logical dtypes, or CuPy bit patterns."""
    if not on_gpu:
        return wl.arrays(), None
    import cupy

    phys = {name: cupy.asarray(value) for name, value in wl.physical().items()}
    return phys, (wl.dtype if wl.dtype in ("float8_e4m3fn", "bfloat16") else None)


def _needle_recall(idx, wl):
    pairs = wl.info.get("needle_pairs")
    if pairs is None or len(pairs) == 0:
        return None
    rel = pairs[:, 1] - wl.ks[pairs[:, 0]]
    return float(np.mean([r in idx[t] for t, r in zip(pairs[:, 0], rel)]))


def evaluate(args):
    import hisa_cupy
    from hisa_cupy import metrics
    from hisa_cupy.__main__ import block_statistics
    from hisa_cupy.testing import to_numpy
    from hisa_cupy.workloads import make_workload

    B, k = args.block_size, args.topk
    rows = []
    for kind in args.kinds:
        for S in args.seq_lens:
            T = min(args.queries, S)
            per_seed = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                wl = make_workload(kind, seq_len=S, num_queries=T, num_heads=args.heads,
                                   head_dim=args.head_dim, dtype=args.dtype, seed=seed)
                a, dtype = _inputs(wl, args.on_gpu)
                common = dict(k_scale=a["k_scale"], ks=a["ks"], ke=a["ke"], dtype=dtype, backend=args.backend)
                dense = np.asarray(to_numpy(hisa_cupy.dense_select(a["q"], a["k"], a["weights"], topk=k,
                                                                   **common)))
                pooled, pscale = hisa_cupy.pool_keys(a["k"], k_scale=a["k_scale"], block_size=B,
                                                     pool_dtype=args.pool_dtype, dtype=dtype, backend=args.backend)
                result = {}
                for m in args.block_topk:
                    if m * B < k:
                        continue
                    hisa = np.asarray(to_numpy(hisa_cupy.hisa_select(
                        a["q"], a["k"], a["weights"], block_size=B, block_topk=m, topk=k,
                        pool_dtype=args.pool_dtype, **common)))
                    blocks = np.asarray(to_numpy(hisa_cupy.select_blocks(
                        a["q"], pooled, a["weights"], pooled_scale=pscale, ks=a["ks"], ke=a["ke"], block_size=B,
                        block_topk=m, seq_len=S, dtype=dtype, backend=args.backend)))
                    st = block_statistics(blocks, dense, wl.ks, wl.ke, block_size=B, seq_len=S)
                    v, rec = metrics.iou(hisa, dense), metrics.recall(hisa, dense)
                    result[m] = dict(iou_mean=float(v.mean()), iou_p10=float(np.percentile(v, 10)),
                                     iou_min=float(v.min()), recall=float(rec.mean()),
                                     block_coverage=st["dense_covered"], needle_recall=_needle_recall(hisa, wl))
                bs = None
                if not args.no_block_sparse and k // B >= 2:
                    sel = np.asarray(to_numpy(hisa_cupy.block_sparse_select(
                        a["q"], a["k"], a["weights"], block_size=B, topk=k, pool_dtype=args.pool_dtype, **common)))
                    bs = dict(iou_mean=metrics.mean_iou(sel, dense),
                              needle_recall=_needle_recall(sel, wl))
                per_seed.append(dict(result=result, block_sparse=bs, dense_needle_recall=_needle_recall(dense, wl),
                                     seconds=time.perf_counter() - t0))
                print(f"[{kind} S={S} T={T} seed={seed}] {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
            rows.extend(_aggregate(kind, S, T, B, k, per_seed))
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _aggregate(kind, S, T, B, k, per_seed):
    out = []
    ms = sorted(per_seed[0]["result"])
    for m in ms:
        get = lambda key: _mean([p["result"][m][key] for p in per_seed])  # noqa: E731
        out.append(dict(kind=kind, S=S, T=T, B=B, k=k, m=m, method="hisa", iou_mean=get("iou_mean"),
                        iou_p10=get("iou_p10"), iou_min=min(p["result"][m]["iou_min"] for p in per_seed),
                        recall=get("recall"), block_coverage=get("block_coverage"),
                        needle_recall=get("needle_recall"),
                        dense_needle_recall=_mean([p["dense_needle_recall"] for p in per_seed]),
                        seeds=len(per_seed)))
    if per_seed[0]["block_sparse"] is not None:
        out.append(dict(kind=kind, S=S, T=T, B=B, k=k, m=k // B, method="block_sparse",
                        iou_mean=_mean([p["block_sparse"]["iou_mean"] for p in per_seed]),
                        needle_recall=_mean([p["block_sparse"]["needle_recall"] for p in per_seed]),
                        dense_needle_recall=_mean([p["dense_needle_recall"] for p in per_seed]),
                        seeds=len(per_seed)))
    return out


def markdown(args, rows):
    f = lambda v, pct=False: "–" if v is None else (f"{v:.1%}" if pct else f"{v:.3f}")  # noqa: E731
    where = f"{args.backend} backend" + (f" on {args.gpu}" if args.on_gpu else " (CPU)")
    lines = [f"# HISA fidelity vs dense ({where}, {datetime.date.today().isoformat()})", "",
             f"H={args.heads} D={args.head_dim} {args.dtype}, B={args.block_size}, k={args.topk}, "
             f"pool {args.pool_dtype}, seeds {','.join(map(str, args.seeds))}. IoU and recall are per query "
             "row, averaged; block coverage = dense top-k positions inside the kept blocks.", "",
             "| data | S | T | method | m | IoU mean | IoU p10 | IoU min | recall of dense | block coverage "
             "| needle recall | dense needle recall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['S']} | {r['T']} | {r['method']} | {r['m']} | {f(r['iou_mean'])} | "
                     f"{f(r.get('iou_p10'))} | {f(r.get('iou_min'))} | {f(r.get('recall'))} | "
                     f"{f(r.get('block_coverage'), True)} | {f(r.get('needle_recall'), True)} | "
                     f"{f(r.get('dense_needle_recall'), True)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"fidelity: backend {args.backend}{' on ' + args.gpu if args.on_gpu else ''}; S {args.seq_lens}, "
          f"T {args.queries}, k {args.topk}, m {args.block_topk}", file=sys.stderr)
    rows = evaluate(args)
    md = markdown(args, rows)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", (args.gpu or "cpu").lower()).strip("-")
        stem = args.out / f"fidelity_{slug}_{args.backend}_{datetime.date.today().isoformat()}"
        meta = dict(backend=args.backend, gpu=args.gpu, heads=args.heads, head_dim=args.head_dim,
                    dtype=args.dtype, block_size=args.block_size, topk=args.topk, pool_dtype=args.pool_dtype,
                    seeds=list(args.seeds), argv=sys.argv[1:])
        stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.json and .md", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
