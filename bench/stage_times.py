"""Quick per-stage timing of the CuPy backend (the kernel developer's inner loop; the full
protocol with JSON/PNG output is bench/kernels.py).

    python bench/stage_times.py [--S 32768 131072] [--T 1024 4096] [--m 64] [--dense]

fp8 q/k (random normal, per-token k_scale), H=64, D=128, B=128, k=2048. CUDA-event medians of
20 runs after warm-up, with a 256 MB L2 flush before each run. Prints one line per stage.
"""
import argparse
import statistics
import time

import torch

import hisa_cupy


def timed(fn, reps=20, flush=None):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--rows-per-cta", type=int, default=None, help="override cupy_backend.MAX_ROWS_PER_CTA")
    ap.add_argument("--profile", action="store_true", help="print per-kernel GPU times (torch profiler)")
    args = ap.parse_args()
    H, D, k = 64, 128, 2048  # B = 128 (the default block_size)
    if args.rows_per_cta:
        from hisa_cupy.kernels import cupy_backend

        cupy_backend.MAX_ROWS_PER_CTA = args.rows_per_cta
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(torch.cuda.get_device_name())
    for S in args.S:
        for T in args.T:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = (torch.randn(T, H, D, device="cuda", generator=g) * 2).to(torch.float8_e4m3fn)
            kk = (torch.randn(S, D, device="cuda", generator=g) * 2).to(torch.float8_e4m3fn)
            ksc = torch.rand(S, device="cuda", generator=g) * 0.01 + 0.01
            w = torch.randn(T, H, device="cuda", generator=g)
            out = torch.empty(T, k, dtype=torch.int32, device="cuda")
            kw = dict(k_scale=ksc, validate=False)
            pooled, _ = hisa_cupy.pool_keys(kk, k_scale=ksc)
            blocks = hisa_cupy.select_blocks(q, pooled, w, block_topk=args.m, seq_len=S, validate=False)
            r = {
                "pool": timed(lambda: hisa_cupy.pool_keys(kk, k_scale=ksc, validate=False), flush=flush),
                "select_blocks": timed(lambda: hisa_cupy.select_blocks(q, pooled, w, block_topk=args.m, seq_len=S,
                                                                       validate=False), flush=flush),
                "refine": timed(lambda: hisa_cupy.refine(q, kk, w, blocks, topk=k, out=out, **kw), flush=flush),
                "hisa": timed(lambda: hisa_cupy.hisa_select(q, kk, w, block_topk=args.m, topk=k, out=out, **kw),
                              flush=flush),
            }
            if args.dense:
                r["dense"] = timed(lambda: hisa_cupy.dense_select(q, kk, w, topk=k, out=out, **kw), reps=5,
                                   flush=flush)
            print(f"S={S:7d} T={T:5d} m={args.m}: " + "  ".join(f"{n}={v:8.3f}ms" for n, v in r.items()), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        hisa_cupy.hisa_select(q, kk, w, block_topk=args.m, topk=k, out=out, **kw)
                    if args.dense:
                        hisa_cupy.dense_select(q, kk, w, topk=k, out=out, **kw)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                hisa_cupy.hisa_select(q, kk, w, block_topk=args.m, topk=k, out=out, **kw)
            host = (time.perf_counter() - t0) / 50 * 1e6
            torch.cuda.synchronize()
            print(f"   host time per hisa_select call (GPU work queued, no sync): {host:.1f} us")
            if args.profile:
                import cProfile
                import pstats

                pr = cProfile.Profile()
                pr.enable()
                for _ in range(50):
                    hisa_cupy.hisa_select(q, kk, w, block_topk=args.m, topk=k, out=out, **kw)
                pr.disable()
                torch.cuda.synchronize()
                pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
