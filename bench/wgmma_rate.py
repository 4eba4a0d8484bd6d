"""The MMA rate the wgmma engine's inner loop can reach, with nothing else in the loop.

bench/NOTES.md, session 14: the union kernel (refine_union_wgmma_kernel, 1.05 of hisa_select's 1.40
ms at 128K/4096) runs its MMAs at ~55% of the tensor pipe, takes 0.65 ms without its MMAs, and is
*slower* without its head sums. Before rewriting it around warp specialisation, this measures the
ceiling of its MMA structure alone: each CTA (one warpgroup, as in the engine) repeats one key
tile's MMAs against a resident q tile, N = 128 (two query rows x 64 heads), K = D = 128, on
operands that stay in shared memory (no copies, no barriers, no epilogue).

Modes (the engine's own wrappers and A-fragment loads from kernels/cuda/score_wgmma.cuh):
  rs      the union path's chain today: per 64-key half, the thread's A fragments read from the
          e4m3 tile and converted to f16 in registers, 8 wgmma (A from registers), commit, wait;
  rs2     the same with both halves in flight (two fragment and accumulator sets), then one wait;
  ss      both operands from shared memory (f16 key tile), both halves committed, then one wait:
          the form a producer-converted f16 tile would allow;
  rs_sums rs with the union path's epilogue after each wait: the relu * weight head sums of the
          half (each lane's 64 accumulators, two FMA chains per item, two shuffles), every
          half's MMAs starting fresh as in the kernel -- the chain the kernel runs, less its
          copies, barrier and key writes;
  wg2_sums, wg3_sums
          rs_sums in 2 or 3 warpgroups per CTA that share the q and key tiles, each on its own;
  pp2_sums, pp3_sums
          the same with the warpgroups taking turns to issue their MMAs (ping-pong: warpgroup w
          waits on named barrier 1 + w, which the one before it arrives at after its issue), so
          that one's head sums run under another's MMAs by construction, not by chance;
  wg3q_sums
          wg3_sums with each warpgroup on its own copy of the key tile, q shared (its own q too
          makes ptxas keep the q descriptors in ordinary registers: 168 registers and a spill).
Each at 1-4 CTAs per SM (shared memory padded so that no more fit; fewer when registers or
shared memory allow fewer), as TFLOP/s and as a share of torch.matmul's f16 rate in the same run.

    python3 bench/wgmma_rate.py [--iters 2000] [--json OUT.json]       # H100 / H200 (sm_90a)
    python3 bench/wgmma_rate.py --modes rs_sums --ctas 3 --iters 8000 --reps 201   # ~3.5 s of one mode

The second form keeps one row loaded long enough for the card's power limit to act (bench/NOTES.md,
session 46: run beside an nvidia-smi sampler, the chain drops from 1980 to 1695-1815 MHz).

Without a Hopper GPU it prints why and exits 0 (its source is compile-checked on the CPU by
tests/test_bench.py with nvcc).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from hisa_cupy.kernels import cupy_backend  # noqa: E402

MODES = ("rs", "rs2", "ss", "rs_sums", "wg2_sums", "pp2_sums", "wg3_sums", "pp3_sums", "wg3q_sums")
# warpgroups per CTA of each mode (the rest: one)
WARPGROUPS = {"wg2_sums": 2, "pp2_sums": 2, "wg3_sums": 3, "pp3_sums": 3, "wg3q_sums": 3}
N_COLS = 128          # MMA N: two query rows x 64 heads
TILE = 128            # keys per tile (two 64-row halves)
D = 128               # MMA K
SMEM_PER_SM = 227 * 1024  # the most one SM gives CTAs (H100 / H200)

KERNEL = r"""
// bench/wgmma_rate.py: the engine's MMA chain alone (see the script's docstring)
__device__ __forceinline__ void rate_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void rate_bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
// MODE: the index in MODES; WGS: warpgroups per CTA (modes 4-7: the rs_sums chain in each, 5 and 7
// taking turns to issue)
template <int MODE, int WGS>
__global__ void __launch_bounds__(128 * WGS) wgmma_rate_kernel(int iters, float* __restrict__ out) {
#if HISA_HAS_WGMMA
    constexpr int N = 128, KSTEPS = 8, TILE = 128;
    constexpr bool PINGPONG = MODE == 5 || MODE == 7;
    extern __shared__ __align__(16) char smem_raw[];
    char* base = reinterpret_cast<char*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023ull) & ~1023ull);
    const int tid = threadIdx.x, warp = (tid >> 5) & 3, lane = tid & 31, wg = tid >> 7;
    const int kbytes = MODE == 2 ? TILE * 256 : TILE * 128;
    // mode 8: the warpgroup's own key tile after the shared pair of tiles
    constexpr bool OWN_K = MODE == 8;
    constexpr int PAIR = N * 256 + TILE * 128;  // 48 KB: a multiple of the 1024-byte swizzle pattern
    char* sQ = base;                                            // q: N rows x 128 f16 in two 128-byte panels (32 KB)
    char* sK = base + (OWN_K ? (1 + wg) * PAIR : 0) + N * 256;  // keys: TILE rows of 128 e4m3 (16 KB) or 128 f16 (ss: 32 KB)
    // finite values with varied bits (zeros would lower the tensor cores' power draw)
    for (int i = tid; i < (N * 256 + kbytes) / 4 * (OWN_K ? 1 + WGS : 1); i += 128 * WGS) {
        const u32 h = (u32)i * 2654435761u + 12345u;
        const int j = i % (PAIR / 4);  // the word's place in its pair of tiles
        const u32 v = j < N * 64 ? (h & 0x37FF37FFu)                         // f16 below 1
                      : MODE == 2 ? (h & 0x37FF37FFu) : (h & 0x77777777u);   // f16, or e4m3 below 2^8
        reinterpret_cast<u32*>(base)[i] = v;
    }
    fence_async_smem();
    __syncthreads();
    const u32 q_lo = wgmma_desc_lo(smem_addr(sQ)), k_lo = wgmma_desc_lo(smem_addr(sK));
    float acc[2][N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[0][i] = acc[1][i] = 0.0f;
    // the engine's own A-fragment loads (score_wgmma.cuh)
    auto load_a = [&](u32 (&af)[KSTEPS][4], int half) { fp8a_fragments(sK, half, warp, lane, af); };
    auto q_desc = [&](int kk) { return q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4); };
    // fresh: k-step 0 overwrites D (the kernel's halves, rs_sums); else every k-step accumulates
    auto issue_rs = [&](float (&a)[N / 2], const u32 (&af)[KSTEPS][4], bool fresh) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) WgmmaRS<N>::run(a, af[kk], q_desc(kk), fresh ? kk : 1);
        wgmma_commit();
    };
    // rs_sums: the engine's own head sums (score_wgmma.cuh, wgmma_head_sums) over lane-varied weights
    float wt[N / 8][2];
#pragma unroll
    for (int i = 0; i < N / 8; ++i) wt[i][0] = 0.5f + 0.01f * (float)(lane & 3), wt[i][1] = 0.25f - 0.01f * (float)i;
    float total = 0.0f;
    auto head_sums = [&](const float (&a)[N / 2]) {
        float sum[2][2];
        wgmma_head_sums<N, 64, 2>(a, wt, sum);
        total += sum[0][0] + sum[0][1] + sum[1][0] + sum[1][1];
    };
    auto issue_ss = [&](float (&a)[N / 2], int half) {
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            Wgmma<ENGINE_F16, N>::run(a, k_lo + (u32)(((kk >> 2) * (TILE * 128) + half * 64 * 128 + (kk & 3) * 32) >> 4),
                                      q_desc(kk), 1);
        wgmma_commit();
    };
    for (int it = 0; it < iters; ++it) {
        if constexpr (MODE == 0) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                u32 af[KSTEPS][4];
                load_a(af, half);
                issue_rs(acc[0], af, false);
                wgmma_wait<0>();
            }
        } else if constexpr (MODE == 1) {
            u32 af0[KSTEPS][4], af1[KSTEPS][4];
            load_a(af0, 0);
            issue_rs(acc[0], af0, false);
            load_a(af1, 1);
            issue_rs(acc[1], af1, false);
            wgmma_wait<0>();
        } else if constexpr (MODE == 2) {
            wgmma_fence();
            issue_ss(acc[0], 0);
            issue_ss(acc[1], 1);
            wgmma_wait<0>();
        } else {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                u32 af[KSTEPS][4];
                load_a(af, half);
                // ping-pong: the first issue of warpgroup 0 goes ahead, every other waits its turn
                if (PINGPONG && (it > 0 || half > 0 || wg > 0)) rate_bar_sync(1 + wg, 256);
                issue_rs(acc[0], af, true);
                if (PINGPONG) rate_bar_arrive(1 + (wg + 1) % WGS, 256);
                wgmma_wait<0>();
                head_sums(acc[0]);
            }
        }
    }
    if (PINGPONG && wg == 0) rate_bar_sync(1, 256);  // the last warpgroup's last arrival
    float s = total;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) s += acc[0][i] + acc[1][i];
    out[blockIdx.x * 128 * WGS + tid] = s;
#else
    __trap();  // sm_90a only
#endif
}
"""


def source() -> str:
    """The microbenchmark's CUDA source: score_wgmma.cuh (includes expanded) and the kernel."""
    return cupy_backend.load_source("score_wgmma.cuh") + KERNEL


def name_expr(mode: str) -> str:
    return f"wgmma_rate_kernel<{MODES.index(mode)}, {WARPGROUPS.get(mode, 1)}>"


def smem_bytes(mode: str, ctas_per_sm: int) -> int:
    """Dynamic shared memory of one CTA: its tiles (+1 KB of alignment slack), padded so that no
    more than ``ctas_per_sm`` fit on an SM (about 1 KB per CTA is the driver's)."""
    need = 1024 + N_COLS * 256 + TILE * (256 if mode == "ss" else 128)
    if mode == "wg3q_sums":  # the shared pair, then one pair of tiles per warpgroup (its key tile used)
        need = 1024 + (1 + WARPGROUPS[mode]) * (N_COLS * 256 + TILE * 128)
    return max(need, SMEM_PER_SM // ctas_per_sm - 1024 - 1024 * (ctas_per_sm > 1))


def fits(ctas_per_sm: int, smem: int, regs: int, warpgroups: int = 1) -> bool:
    """Whether ``ctas_per_sm`` CTAs of 128 x ``warpgroups`` threads with ``smem`` bytes of dynamic
    shared memory (plus 1 KB each for the driver) and ``regs`` registers per thread (allocated in
    multiples of 8) are resident on one SM at once (H100 / H200: 228 KB of shared memory, 64 K
    registers)."""
    return (ctas_per_sm * (smem + 1024) <= 228 * 1024
            and ctas_per_sm * 128 * warpgroups * (-(-regs // 8) * 8) <= 65536)


def flops(ctas: int, iters: int, warpgroups: int = 1) -> float:
    """MMA FLOPs of one launch: per iteration and warpgroup two 64-key halves x N x K x 2."""
    return 2.0 * TILE * N_COLS * D * iters * ctas * warpgroups


def hopper_target():
    """(device, its SM count, NVRTC's target arch) of the current device; RuntimeError unless sm_90
    (wgmma)."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    dev = cupy.cuda.Device()
    cc = int(dev.compute_capability)
    if cc != 90:
        raise RuntimeError(f"needs an sm_90 GPU (wgmma), this one is sm_{cc}")
    return dev, dev.attributes["MultiProcessorCount"], cupy_backend.target_arch(cc, tuple(nvrtc.getSupportedArchs()))


def gpu_name(dev) -> str:
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()


def parse_modes(ap, text: str, known) -> tuple:
    """The comma-separated modes of ``text``; an argument error (ap.error) for one not in ``known``."""
    modes = tuple(m for m in text.split(",") if m)
    unknown = [m for m in modes if m not in known]
    if unknown:
        ap.error(f"unknown modes {unknown} (known: {', '.join(known)})")
    return modes


def load_kernel(src: str, name: str, arch: str, smem: int = 0):
    """(function, registers per thread) of kernel ``name`` of ``src`` built by NVRTC for ``arch``,
    allowed ``smem`` bytes of dynamic shared memory."""
    from cupy_backends.cuda.api import driver

    fn = cupy_backend._module_function(src, name, arch)
    if smem:
        driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    return fn, driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_NUM_REGS, fn.ptr)


def median_ms(launch, reps: int) -> float:
    """Median CUDA-event time (ms) of ``reps`` calls of ``launch()``, after two untimed ones."""
    import cupy

    for _ in range(2):
        launch()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return sorted(times)[len(times) // 2]


def run(iters: int, reps: int = 7, modes=MODES, per_sms=(1, 2, 3, 4)) -> dict:
    import cupy
    from cupy_backends.cuda.api import driver

    dev, sms, arch = hopper_target()
    src = source()
    rows = []
    for mode in modes:
        fn, regs = load_kernel(src, name_expr(mode), arch)
        wgs = WARPGROUPS.get(mode, 1)
        for per_sm in per_sms:
            smem = smem_bytes(mode, per_sm)
            if not fits(per_sm, smem, regs, wgs):  # fewer would be resident: the launch would run in waves
                continue
            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            ctas = per_sm * sms
            out = cupy.empty(ctas * 128 * wgs, dtype=cupy.float32)
            args = (cupy.int32(iters), out)
            ms = median_ms(lambda: fn((ctas,), (128 * wgs,), args, shared_mem=smem), reps)
            rows.append({"mode": mode, "ctas_per_sm": per_sm, "warpgroups": wgs, "smem": smem, "ms": ms,
                         "tflops": flops(ctas, iters, wgs) / (ms * 1e-3) / 1e12,
                         "registers": regs})
    return {"gpu": gpu_name(dev), "sms": sms,
            "iters": iters, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="key tiles per CTA and launch")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--modes", default=",".join(MODES), help="the modes measured (comma-separated)")
    ap.add_argument("--ctas", default="1,2,3,4", help="the CTAs per SM tried (comma-separated)")
    ap.add_argument("--reps", type=int, default=7, help="timed launches per row (their median is kept)")
    args = ap.parse_args(argv)
    modes = parse_modes(ap, args.modes, MODES)
    try:
        res = run(args.iters, reps=args.reps, modes=modes, per_sms=tuple(int(c) for c in args.ctas.split(",") if c))
    except Exception as e:  # no CuPy, no GPU, not Hopper
        print(f"wgmma_rate: no measurement ({type(e).__name__}: {e})")
        return 0
    f16 = None
    try:  # bench/kernels.py's measurement, loaded by path (the repository has a kernels/ package too)
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "bench_kernels", os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py"))
        bench_kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_kernels)
        f16 = bench_kernels.tensor_core_tflops("f16")
    except Exception as e:  # torch missing: the share column stays empty
        print(f"(no torch.matmul f16 rate: {type(e).__name__}: {e})")
    res["f16_tflops"] = f16
    print(f"{res['gpu']}, {res['sms']} SMs, {res['iters']} tiles per CTA"
          + (f"; torch.matmul f16 rate {f16:.0f} TFLOP/s" if f16 else ""))
    print("| mode | CTAs per SM | warpgroups per CTA | registers | shared bytes | ms | TFLOP/s | share of f16 rate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        share = f"{100 * r['tflops'] / f16:.0f}%" if f16 else "-"
        print(f"| {r['mode']} | {r['ctas_per_sm']} | {r['warpgroups']} | {r['registers']} | {r['smem']} | {r['ms']:.3f} | "
              f"{r['tflops']:.0f} | {share} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
