"""Command line: ``python -m hisa_cupy demo`` and ``python -m hisa_cupy info``.

``demo`` builds a structured workload (``hisa_cupy.workloads``, kind ``segments`` by default),
runs the dense DSA selection and the HISA selection through the public API, and prints how well
HISA reproduces dense (IoU), what the block filter kept (forced blocks, distance back, how much
of dense's top-k lies inside the kept blocks) and how long each took.

With a usable CUDA GPU the default is the CuPy backend at the DeepSeek-V3.2 shape (S = 65536,
T = 4096, H = 64, D = 128, fp8, B = 128, m = 64, k = 2048). Without one it says so and runs the
NumPy reference backend at S = 8192, T = 512 (k = 512, m = 16: the same 4:1 ratio of candidates
to selected tokens), which takes some seconds on two cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

BACKENDS = ("auto", "cupy", "numba", "numpy")
GPU_DEFAULTS = dict(seq_len=65536, queries=4096, block_size=128, block_topk=64, topk=2048)
CPU_DEFAULTS = dict(seq_len=8192, queries=512, block_size=128, block_topk=16, topk=512)


# ------------------------------------------------------------------------------------------
# environment probes
# ------------------------------------------------------------------------------------------
def probe_gpu():
    """``(usable, description)``: whether CuPy sees a CUDA device that can allocate memory."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False, "NUMBA_ENABLE_CUDASIM=1 is set (CUDA simulator mode)"
    try:
        import cupy
    except Exception as exc:  # pragma: no cover - cupy is a dependency
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA driver or device ({type(exc).__name__})"
    if count < 1:
        return False, "no CUDA device"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        cupy.empty(1, dtype=cupy.float32)
        cc = f"sm_{props['major']}{props['minor']}"
    except Exception as exc:
        return False, f"CUDA device 0 is not usable ({type(exc).__name__}: {exc})"
    return True, f"{name} ({cc}, {count} device{'s' if count > 1 else ''})"


def _numba_status():
    try:
        import numba

        version = numba.__version__
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    try:
        from numba import cuda

        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return f"numba {version}, CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        return f"numba {version}, CUDA {'available' if cuda.is_available() else 'not available'}"
    except Exception as exc:
        return f"numba {version}, numba.cuda not importable ({type(exc).__name__})"


def cmd_info(args) -> int:
    import hisa_cupy

    usable, gpu = probe_gpu()
    print(f"hisa_cupy {hisa_cupy.__version__}  (python {sys.version.split()[0]}, numpy {np.__version__})")
    print("backends:")
    print("  numpy  available (NumPy reference, normative)")
    try:
        import cupy

        cupy_ver = f"cupy {cupy.__version__}"
    except Exception as exc:  # pragma: no cover
        cupy_ver = f"cupy not importable ({type(exc).__name__})"
    print(f"  cupy   {'available' if usable else 'not available'}: {cupy_ver}")
    print(f"  numba  {_numba_status()}")
    print(f"GPU: {gpu if usable else 'none usable (' + gpu + ')'}")
    return 0


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------
def _resolve(args):
    """Pick the backend and the default sizes; returns (backend, on_gpu, note) or raises."""
    usable, gpu = probe_gpu()
    backend = args.backend
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if backend == "auto":
        backend = "cupy" if usable else "numpy"
        note = (f"GPU: {gpu}" if usable else
                f"No usable CUDA GPU ({gpu}): running the NumPy reference backend at a small size.")
    elif backend == "cupy" and not usable:
        raise SystemExit(f"error: --backend cupy needs a CUDA GPU, but there is none usable ({gpu}). "
                         "Use --backend numpy (or auto).")
    elif backend == "numba" and not usable and not sim:
        raise SystemExit(f"error: --backend numba needs a CUDA GPU ({gpu}) or the CUDA simulator "
                         "(NUMBA_ENABLE_CUDASIM=1, slow: use a small --seq-len).")
    else:
        note = f"GPU: {gpu}" if usable else f"No usable CUDA GPU ({gpu})."
    on_gpu = backend == "cupy" or (backend == "numba" and not sim)
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return backend, on_gpu, note


class _Timer:
    """Median wall time of a callable: device events on the GPU, perf_counter on the host."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu

    def __call__(self, fn, repeats: int):
        if not self.on_gpu:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return result, statistics.median(times)
        import cupy

        result = fn()  # warm-up: compilation and module load stay out of the numbers
        cupy.cuda.get_current_stream().synchronize()
        times = []
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
        return result, statistics.median(times)


def block_statistics(blocks, dense, ks, ke, *, block_size: int, seq_len: int) -> dict:
    """What the HISA block filter kept, measured against dense's selection (host NumPy arrays).

    ``blocks`` int32 [T, m] (select_blocks output), ``dense`` int32 [T, k] row-relative indices.
    """
    B = int(block_size)
    T, m = blocks.shape
    nb = -(-seq_len // B)
    ks = ks.astype(np.int64)
    ke = ke.astype(np.int64)
    first = ks // B
    last = (ke - 1) // B
    eligible = np.where(ke > ks, last - first + 1, 0)
    ranked_rows = eligible > m  # rows where the block filter actually chose
    valid = blocks >= 0
    selected = valid.sum(axis=1)
    # Block-membership mask [T, nb] of the selected blocks.
    mask = np.zeros((T, nb + 1), dtype=bool)
    rows = np.broadcast_to(np.arange(T)[:, None], blocks.shape)
    mask[rows[valid], blocks[valid]] = True
    forced = (blocks == first[:, None]) | (blocks == last[:, None])
    forced &= valid & ranked_rows[:, None]
    ranked = valid & ~forced & ranked_rows[:, None]
    qpos = ke - 1  # the query's own (last visible) position
    back = (qpos[:, None] - (blocks.astype(np.int64) * B + (B - 1) / 2.0))[ranked]
    # Dense top-k positions (absolute) and whether their block was kept.
    dvalid = dense >= 0
    dabs = dense.astype(np.int64) + ks[:, None]
    dblock = np.where(dvalid, dabs // B, nb)
    covered = mask[np.broadcast_to(np.arange(T)[:, None], dense.shape), dblock] & dvalid
    in_forced = dvalid & ranked_rows[:, None] & ((dblock == first[:, None]) | (dblock == last[:, None]))
    # Selected blocks holding at least one dense pick.
    useful = np.zeros((T, nb + 1), dtype=bool)
    drows = np.broadcast_to(np.arange(T)[:, None], dense.shape)
    useful[drows[dvalid], dblock[dvalid]] = True
    useful_sel = useful[rows[valid], blocks[valid]]
    n_dense = max(1, int(dvalid.sum()))
    return dict(
        rows=T,
        ranked_rows=int(ranked_rows.sum()),
        eligible_mean=float(eligible.mean()) if T else 0.0,
        selected_mean=float(selected.mean()) if T else 0.0,
        forced_mean=float(forced.sum(axis=1).mean()) if T else 0.0,
        forced_fraction=float(forced.sum() / max(1, valid.sum())),
        back_mean=float(back.mean()) if back.size else float("nan"),
        back_median=float(np.median(back)) if back.size else float("nan"),
        dense_covered=float(covered.sum() / n_dense),
        dense_in_forced=float(in_forced.sum() / n_dense),
        useful_blocks=float(useful_sel.mean()) if useful_sel.size else float("nan"),
    )


def _device_arrays(wl):
    """The workload as CuPy arrays (fp8 / bf16 as uint8 / uint16 bit patterns)."""
    import cupy

    return {name: cupy.asarray(value) for name, value in wl.physical().items()}


def cmd_demo(args) -> int:
    import hisa_cupy
    from hisa_cupy import metrics
    from hisa_cupy.testing import to_numpy
    from hisa_cupy.workloads import make_workload

    backend, on_gpu, note = _resolve(args)
    S, T, B, m, k = args.seq_len, args.queries, args.block_size, args.block_topk, args.topk
    print(note)
    print(f"backend: {backend}")
    print(f"workload: kind={args.kind} S={S} T={T} H={args.heads} D={args.head_dim} "
          f"dtype={args.dtype} seed={args.seed}")
    print(f"selection: topk={k} block_size={B} block_topk={m} "
          f"({m * B} candidate tokens per row, pool {args.pool_dtype})")
    t0 = time.perf_counter()
    wl = make_workload(args.kind, seq_len=S, num_queries=T, num_heads=args.heads,
                       head_dim=args.head_dim, dtype=args.dtype, seed=args.seed)
    print(f"built the workload in {time.perf_counter() - t0:.2f} s")

    if on_gpu:
        arrays = _device_arrays(wl)
        dtype_arg = wl.dtype if wl.dtype in ("float8_e4m3fn", "bfloat16") else None
    else:
        arrays = wl.arrays()
        dtype_arg = None
    q, kk, w, ksc, ks, ke = (arrays[n] for n in ("q", "k", "weights", "k_scale", "ks", "ke"))
    common = dict(k_scale=ksc, ks=ks, ke=ke, dtype=dtype_arg, backend=backend)
    timer = _Timer(on_gpu)
    repeats = args.repeats if args.repeats is not None else (10 if on_gpu else 1)
    # With validate=False nothing reads device memory back inside the timed calls.
    validate = not on_gpu

    dense, t_dense = timer(lambda: hisa_cupy.dense_select(q, kk, w, topk=k, validate=validate,
                                                          **common), repeats)
    hisa, t_hisa = timer(lambda: hisa_cupy.hisa_select(
        q, kk, w, block_size=B, block_topk=m, topk=k, pool_dtype=args.pool_dtype,
        validate=validate, **common), repeats)
    pool_common = dict(k_scale=ksc, block_size=B, pool_dtype=args.pool_dtype, dtype=dtype_arg,
                       backend=backend)
    (pooled, pscale), t_pool = timer(lambda: hisa_cupy.pool_keys(kk, **pool_common), repeats)
    blocks, t_blocks = timer(lambda: hisa_cupy.select_blocks(
        q, pooled, w, pooled_scale=pscale, ks=ks, ke=ke, block_size=B, block_topk=m,
        seq_len=S, dtype=dtype_arg, backend=backend, validate=validate), repeats)
    _, t_refine = timer(lambda: hisa_cupy.refine(
        q, kk, w, blocks, k_scale=ksc, ks=ks, ke=ke, block_size=B, topk=k, dtype=dtype_arg,
        backend=backend, validate=validate), repeats)

    dense_np, hisa_np, blocks_np = (np.asarray(to_numpy(x)) for x in (dense, hisa, blocks))
    iou = metrics.iou(hisa_np, dense_np)
    stats = block_statistics(blocks_np, dense_np, wl.ks, wl.ke, block_size=B, seq_len=S)

    print()
    print(f"HISA vs dense: mean IoU {iou.mean():.4f}  (min {iou.min():.4f}, "
          f"10th percentile {np.percentile(iou, 10):.4f}, rows with IoU 1: {np.mean(iou == 1.0):.1%})")
    print(f"selected blocks per row: {stats['selected_mean']:.1f} of {stats['eligible_mean']:.1f} "
          f"eligible on average; block filter active on {stats['ranked_rows']} of {T} rows "
          f"(the others see <= {m} blocks, where HISA equals dense)")
    print(f"forced blocks (first = attention sink, last = own block): "
          f"{stats['forced_mean']:.2f} per row, {stats['forced_fraction']:.1%} of the selected blocks")
    print(f"distance back from the query to the ranked (non-forced) blocks: "
          f"mean {stats['back_mean']:.0f}, median {stats['back_median']:.0f} tokens")
    print(f"dense top-{k} positions inside the selected blocks: {stats['dense_covered']:.1%} "
          f"(HISA's token stage recovers exactly these; {stats['dense_in_forced']:.1%} lie in the forced blocks)")
    print(f"selected blocks holding at least one dense top-{k} position: {stats['useful_blocks']:.1%}")
    if wl.info.get("needle_pairs") is not None and len(wl.info["needle_pairs"]):
        pairs = wl.info["needle_pairs"]
        rel = pairs[:, 1] - wl.ks[pairs[:, 0]]
        for name, sel in (("dense", dense_np), ("hisa", hisa_np)):
            hit = np.mean([r in sel[t] for t, r in zip(pairs[:, 0], rel)])
            print(f"needle recall {name}: {hit:.1%} of {len(pairs)} planted (row, needle) pairs")

    where = "GPU, median of %d runs, device events" % repeats if on_gpu else \
        "host wall time, %d run%s" % (repeats, "s" if repeats > 1 else "")
    print()
    print(f"timings ({backend} backend, {where}):")
    print(f"  dense_select  {t_dense:10.2f} ms")
    print(f"  hisa_select   {t_hisa:10.2f} ms   ({t_dense / max(t_hisa, 1e-9):.2f}x faster than dense)")
    print(f"    pool_keys     {t_pool:10.2f} ms")
    print(f"    select_blocks {t_blocks:10.2f} ms")
    print(f"    refine        {t_refine:10.2f} ms")
    if backend == "numpy":
        print("(the NumPy backend is the float64 reference, written for clarity: its times show the "
              "work saved, not kernel speed; `make bench` measures the GPU kernels)")
    return 0


# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from hisa_cupy.workloads import WORKLOAD_DTYPES, WORKLOAD_KINDS

    parser = argparse.ArgumentParser(prog="python -m hisa_cupy",
                                     description="HISA sparse-attention indexer: demo and info.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info}")
    demo = sub.add_parser("demo", help="run dense and HISA selection on a synthetic workload",
                          description=__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--seq-len", type=int, default=None, help="S, keys (default 65536 on a GPU, 8192 on the CPU)")
    demo.add_argument("--queries", type=int, default=None, help="T, query rows at the end of the sequence "
                      "(default 4096 on a GPU, 512 on the CPU)")
    demo.add_argument("--backend", choices=BACKENDS, default="auto",
                      help="auto: cupy with a GPU, numpy without (default)")
    demo.add_argument("--kind", choices=WORKLOAD_KINDS, default="segments", help="workload (default segments)")
    demo.add_argument("--topk", type=int, default=None, help="k (default 2048 on a GPU, 512 on the CPU)")
    demo.add_argument("--block-size", type=int, default=None, help="B (default 128)")
    demo.add_argument("--block-topk", type=int, default=None, help="m (default 64 on a GPU, 16 on the CPU)")
    demo.add_argument("--pool-dtype", default="bfloat16", choices=("bfloat16", "float32", "float8_e4m3fn"))
    demo.add_argument("--heads", type=int, default=64, help="H (default 64)")
    demo.add_argument("--head-dim", type=int, default=128, help="D (default 128)")
    demo.add_argument("--dtype", choices=WORKLOAD_DTYPES, default="float8_e4m3fn")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=int, default=None,
                      help="timed runs per function (default 10 on a GPU, 1 on the CPU)")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="version, available backends, GPU")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
