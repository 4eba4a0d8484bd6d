"""The rate a warp-specialised union kernel could reach: the union kernel's chain fed by bulk copies.

bench/NOTES.md, session 51: target 1 at T = 4096 needs the union kernel (~600 TFLOP/s today, three
one-warpgroup CTAs per SM, each copying, converting, multiplying and summing in turn) at ~750-850.
Session 15's warp-specialised kernel lost because its producer mapped every item of a tile (~2300
cycles per tile per SM). With whole-block tiles (B = 128: a tile is 16 KB of consecutive e4m3 keys)
a producer needs one bulk copy per tile. This measures that design's ceiling before anyone builds
it: one CTA per SM of C consumer warpgroups and one producer warp. Measured on an H200 (bench/NOTES.md,
session 52): wsu3r 619-680 TFLOP/s against rs_sums' 782, so such a kernel could gain at most ~10% on the
union kernel (~607 in a call); built (branch wip/union-ws), it ran 6% slower.

  ws<C>     the producer's lane 0 copies tile t (a pseudo-random block of a 16 MB key array, as the
            union's blocks are scattered over 128K keys) into ring slot t % STAGES with one
            cp.async.bulk, completion counted on the slot's `full` mbarrier; consumer warpgroup
            t % C waits for it and runs the union kernel's chain on it (score_wgmma.cuh's own
            pieces: A fragments of the unswizzled tile converted to f16, 8 wgmma N = 128 per
            64-key half, the relu * weight head sums), frees the slot (its `empty` mbarrier, one
            arrival per warp) once its A fragments are in registers, and writes the tile's keys
            (two rows x 128 items of 4 bytes: the union kernel's bytes per FLOP) to a 64 MB buffer.
  wsu<C>    ws<C> with the union kernel's own per-tile work: of every 72 tiles 56 hold blocks of both
            rows and 8 of each row alone (taking only that row's N = 64 MMAs on its q rows, as
            SPLIT_ROWS does: 72.4 tiles per pair at 128K/4096, 55.6 of both rows), and each row's keys
            go to their output columns (the block's index in the row's list) by predicated stores,
            flagged by a compare against the row's key range. FLOPs count the MMAs run (a one-row
            tile is half a tile).
The same consumers on one resident tile (no producer) are not a mode: ptxas then kept only one
half's 8 wgmma (the SASS held 8 of 16, and the "rate" came out above the tensor cores' peak;
session 51), so bench/wgmma_rate.py's rs_sums (three CTAs of one warpgroup on a resident tile) is
the chain's reference. tests/test_bench.py checks that every mode's SASS holds all 16.
C = 2 or 3: one CTA of 128 C + 32 threads per SM. ptxas gives a CTA of 416 threads 128 registers
(ws3: 4 bytes spilled, wsu2 / wsu3: 44; tests/test_bench.py). ws3r / wsu3r:
the producer a whole warpgroup that hands registers to the consumers (setmaxnreg: 40 for it, 152
for each of them), as FlashAttention-3 does; listed last, since a fault there would end the run. Each row:
TFLOP/s over the MMAs' FLOPs (per tile 2 x 64 keys x N x K x 2).

    python3 bench/ws_rate.py [--iters 2000] [--modes ws2,ws3,wsu2,wsu3,ws3r,wsu3r,wso3r,wsc3r] [--json OUT.json]

Without a Hopper GPU it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: wgmma_rate's launch helpers
from hisa_cupy.kernels import cupy_backend  # noqa: E402
from wgmma_rate import gpu_name, hopper_target, load_kernel, median_ms, parse_modes  # noqa: E402

MODES = ("ws2", "ws3", "wsu2", "wsu3", "ws3r", "wsu3r", "wso3r", "wsc3r")
# what each mode adds to ws: bit 0 one-row tiles (16 of every 72), bit 1 per-row columns and flags
UNION_PARTS = {"ws": 0, "wso": 1, "wsc": 2, "wsu": 3}
N_COLS = 128          # MMA N: two query rows x 64 heads
TILE = 128            # keys per tile (one block of 128)
D = 128               # MMA K
STAGES = 6            # ring slots of 16 KB
KEY_BLOCKS = 1024     # 16 MB of e4m3 keys: 128K keys of 128 bytes
OUT_WORDS = 16 << 20  # 64 MB of output keys (written round)

KERNEL = r"""
// bench/ws_rate.py: the union kernel's chain fed by bulk copies (see the script's docstring)
#define WS_STAGES %(stages)d
__device__ __forceinline__ void ws_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%%0], %%1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void ws_mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%%0];\n" ::"r"(bar) : "memory");
}
// C consumer warpgroups and one producer warp (the last), the tiles through the ring
// UNION: the union kernel's own per-tile work on top, by bits (the wsu modes: both): bit 0, of every
// 72 tiles 56 hold blocks of both rows and 8 of each row only (one N = 64 group per half on that
// row's q rows, SPLIT_ROWS); bit 1, each row's keys go to its output columns (the block's index in
// the row's list, per tile) by predicated stores, flagged by a compare of the item's key row
// against the row's key range
// REALLOC (the r modes): the producer is a whole warpgroup that gives registers to the consumers
// (setmaxnreg: 40 for it, 152 for each consumer: 128 x 40 + 3 x 128 x 152 <= 64 K)
template <int C, int UNION, bool REALLOC = false>
__global__ void __launch_bounds__(REALLOC ? 128 * (C + 1) : 128 * C + 32, 1) ws_rate_kernel(int iters, const char* __restrict__ keys,
                                                                  u32* __restrict__ kout, float* __restrict__ out) {
#if HISA_HAS_WGMMA
    constexpr int N = 128, KSTEPS = 8, TB = 128 * 128;
    extern __shared__ __align__(16) char smem_raw[];
    char* base = reinterpret_cast<char*>((reinterpret_cast<unsigned long long>(smem_raw) + 1023ull) & ~1023ull);
    char* ring = base + C * N * 256;  // after the consumers' q tiles (32 KB each)
    const u32 bar0 = smem_addr(ring + WS_STAGES * TB);  // full[s] at bar0 + 8 s, empty[s] at bar0 + 8 (STAGES + s)
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    // q: finite f16 values below 1 with varied bits (zeros would lower the tensor cores' power draw)
    for (int i = tid; i < C * N * 64; i += blockDim.x) {
        const u32 h = (u32)i * 2654435761u + 12345u;
        reinterpret_cast<u32*>(base)[i] = h & 0x37FF37FFu;
    }
    if (tid == 0)
        for (int s = 0; s < WS_STAGES; ++s) {
            ws_mbar_init(bar0 + 8 * s, 1);
            ws_mbar_init(bar0 + 8 * (WS_STAGES + s), 4);
        }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_async_smem();
    __syncthreads();
    const int tiles = iters * C;
    if constexpr (REALLOC) {
        if (wg == C) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        else asm volatile("setmaxnreg.inc.sync.aligned.u32 152;\n" ::: "memory");
    }
    if (wg == C) {  // the producer warp (REALLOC: its warpgroup's first warp)
        if (lane == 0 && (!REALLOC || warp == 0))
            for (int t = 0; t < tiles; ++t) {
                const int s = t %% WS_STAGES, k = t / WS_STAGES;
                if (k > 0) mbar_wait(bar0 + 8 * (WS_STAGES + s), (k - 1) & 1);
                const u32 blk = ((u32)(t + blockIdx.x * 7919) * 2654435761u >> 8) %% %(blocks)du;
                mbar_arm(bar0 + 8 * s, TB);
                bulk_copy(smem_addr(ring + s * TB), keys + (size_t)blk * TB, TB, bar0 + 8 * s);
            }
        return;
    }
    const u32 q_lo = wgmma_desc_lo(smem_addr(base + wg * N * 256));
    auto q_desc = [&](int kk) { return q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4); };
    float acc[N / 2];
    float wt[N / 8][2];
#pragma unroll
    for (int i = 0; i < N / 8; ++i) wt[i][0] = 0.5f + 0.01f * (float)(lane & 3), wt[i][1] = 0.25f - 0.01f * (float)i;
    auto issue_rs = [&](const u32 (&af)[KSTEPS][4]) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) WgmmaRS<N>::run(acc, af[kk], q_desc(kk), kk);
        wgmma_commit();
    };
    const int key_item = ((lane & 3) >> 1) * 64 + warp * 16 + (lane >> 2) + 8 * (lane & 1);
    float total = 0.0f;
    // UNION: one row's MMAs and head sums (N = 64: its 64 q rows, as the union kernel's issue_rs_row
    // and row_sums), and the pair's output rows (8192 columns each, round the 64 MB buffer). r must
    // fold to a constant (one_row's two calls): a runtime row index put the weights and sums in local
    // memory (a 160-byte stack frame; session 52's first wso / wsu rows), which the union kernel avoids
    auto issue_row = [&](float (&a)[N / 4], const u32 (&af)[KSTEPS][4], int r) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) WgmmaRS<64>::run(a, af[kk], q_desc(kk) + (u32)((r * 64 * 128) >> 4), kk);
        wgmma_commit();
    };
    auto row_sums = [&](const float (&a)[N / 4], int r, float (&sum)[2]) {
        float p[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                p[e][0] = fmaf(wt[r * 8 + j][0], relu(a[4 * j + 2 * e]), p[e][0]);
                p[e][1] = fmaf(wt[r * 8 + j][1], relu(a[4 * j + 2 * e + 1]), p[e][1]);
            }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float v = p[e][0] + p[e][1];
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
            sum[e] = v;
        }
    };
    u32* pair_out = kout + (size_t)((blockIdx.x * C + wg) %% (%(out_words)dull / 16384)) * 16384;
    for (int i = 0; i < iters; ++i) {
        const int t = i * C + wg, s = t %% WS_STAGES, k = t / WS_STAGES;
        const char* tile = ring + s * TB;
        mbar_wait(bar0 + 8 * s, k & 1);
        u32 af[KSTEPS][4];
        float s0[2][2] = {}, s1[2][2] = {};
        const int kind = (UNION & 1) ? t %% 72 : 0, only = kind < 56 ? -1 : kind < 64 ? 0 : 1;  // only: -1 both rows
        auto release = [&]() {  // the slot is read: its keys are in this warp's registers
            __syncwarp();
            if (lane == 0) ws_mbar_arrive(bar0 + 8 * (WS_STAGES + s));
        };
        fp8a_fragments<true>(tile, 0, warp, lane, af);
        if (only < 0) {
            issue_rs(af);
            wgmma_wait<0>();
            wgmma_fence_operands(acc);
            wgmma_head_sums<N, 64, 2>(acc, wt, s0);
            fp8a_fragments<true>(tile, 1, warp, lane, af);
            release();
            issue_rs(af);
            wgmma_wait<0>();
            wgmma_fence_operands(acc);
            wgmma_head_sums<N, 64, 2>(acc, wt, s1);
        } else {
            // as the union kernel's one-row tiles: two accumulator sets, half 0's sums under half 1's MMAs
            auto one_row = [&](int r) {
                float a0[N / 4], a1[N / 4];
                issue_row(a0, af, r);
                wgmma_wait<0>();
                wgmma_fence_operands(a0);
                fp8a_fragments<true>(tile, 1, warp, lane, af);
                release();
                issue_row(a1, af, r);
                row_sums(a0, r, s0[r]);
                wgmma_wait<0>();
                wgmma_fence_operands(a1);
                row_sums(a1, r, s1[r]);
            };
            if (only == 0) one_row(0);
            else one_row(1);
        }
        const int x = lane & 3;
        if constexpr ((UNION & 2) != 0) {
            // each row's keys: flag by the row's key range, column by the block's index in the row's list
            const int blk = (t * 37) %% 1024;
            const int row_item = blk * 128 + key_item;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float v = x == 0 ? s0[r][0] : x == 1 ? s0[r][1] : x == 2 ? s1[r][0] : s1[r][1];
                const int idx = (only < 0 || only == r) ? (t * 7 + r) %% 64 : -1;
                const int ke = 131072 - 64 * ((i + r) & 63);
                const u32 key = row_item < ke ? score_key(v) : HISA_KEY_NONE;
                store_if(reinterpret_cast<int*>(pair_out) + r * 8192 + max(idx, 0) * 128 + key_item, (int)key, idx >= 0);
                total += v;
            }
            continue;
        }
        // the tile's keys, as the union kernel's write_keys lays them out (lane 4 g + x: item key_item)
        const size_t row0 = ((size_t)(blockIdx.x * C + wg) * iters + i) * 2 %% (%(out_words)dull / 128);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if ((UNION & 1) && only >= 0 && only != r) continue;  // a one-row tile: that row's keys
            const float v = x == 0 ? s0[r][0] : x == 1 ? s0[r][1] : x == 2 ? s1[r][0] : s1[r][1];
            kout[(row0 + r) * 128 + key_item] = __float_as_uint(v);
            total += v;
        }
    }
    out[blockIdx.x * blockDim.x + tid] = total;
#else
    __trap();  // sm_90a only
#endif
}
"""


def source() -> str:
    """The microbenchmark's CUDA source: score_wgmma.cuh (includes expanded) and the kernel."""
    return cupy_backend.load_source("score_wgmma.cuh") + KERNEL % {
        "stages": STAGES, "blocks": KEY_BLOCKS, "out_words": OUT_WORDS}


def union_parts(mode: str) -> int:
    """What the mode adds to ws (UNION_PARTS: bit 0 one-row tiles, bit 1 columns and flags)."""
    return UNION_PARTS[re.match(r"ws[uoc]?", mode).group(0)]


def consumers(mode: str) -> int:
    return int(mode.rstrip("r")[-1])


def threads(mode: str) -> int:
    """Threads per CTA: the consumers' warpgroups and the producer's warp (r modes: a warpgroup)."""
    return 128 * consumers(mode) + (128 if mode.endswith("r") else 32)


def name_expr(mode: str) -> str:
    return f"ws_rate_kernel<{consumers(mode)}, {union_parts(mode)}{', true' if mode.endswith('r') else ''}>"


def smem_bytes(mode: str) -> int:
    """The CTA's q tiles, ring and mbarriers (+1 KB of alignment slack): one CTA per SM."""
    return 1024 + consumers(mode) * N_COLS * 256 + STAGES * TILE * 128 + 16 * STAGES


def flops(ctas: int, iters: int, c: int, union: bool = False) -> float:
    """MMA FLOPs of one launch: per tile two 64-key halves x N x K x 2, iters tiles per consumer;
    union (modes with one-row tiles): tile t (t = i C + consumer) % 72 >= 56 takes one row's half."""
    tiles = iters * ctas * c
    if union:
        one_row = sum(1 for t in range(iters * c) if t % 72 >= 56) * ctas
        return 2.0 * TILE * N_COLS * D * (tiles - one_row / 2)
    return 2.0 * TILE * N_COLS * D * tiles


def run(iters: int, reps: int = 7, modes=MODES) -> dict:
    import cupy

    dev, sms, arch = hopper_target()
    rng = cupy.random.default_rng(5)
    keys = (rng.integers(0, 256, KEY_BLOCKS * TILE * 128, dtype=cupy.uint8) & 0x77).astype(cupy.uint8)
    kout = cupy.empty(OUT_WORDS, dtype=cupy.uint32)
    rows = []
    for mode in modes:
        smem = smem_bytes(mode)
        fn, regs = load_kernel(source(), name_expr(mode), arch, smem)
        c, nt = consumers(mode), threads(mode)
        out = cupy.empty(sms * nt, dtype=cupy.float32)
        args = (cupy.int32(iters), keys, kout, out)
        ms = median_ms(lambda: fn((sms,), (nt,), args, shared_mem=smem), reps)
        rows.append({"mode": mode, "consumers": c, "registers": regs, "smem": smem, "ms": ms,
                     "tflops": flops(sms, iters, c, (union_parts(mode) & 1) == 1) / (ms * 1e-3) / 1e12})
    return {"gpu": gpu_name(dev), "sms": sms,
            "iters": iters, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="key tiles per consumer warpgroup and launch")
    ap.add_argument("--modes", default=",".join(MODES), help="the modes measured (comma-separated)")
    ap.add_argument("--reps", type=int, default=7, help="timed launches per row (their median is kept)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    modes = parse_modes(ap, args.modes, MODES)
    try:
        res = run(args.iters, reps=args.reps, modes=modes)
    except Exception as e:  # no CuPy, no GPU, not Hopper
        print(f"ws_rate: no measurement ({type(e).__name__}: {e})")
        return 0
    print(f"{res['gpu']}, {res['sms']} SMs, {res['iters']} tiles per consumer warpgroup, one CTA per SM")
    print("| mode | consumer warpgroups | registers | shared bytes | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['mode']} | {r['consumers']} | {r['registers']} | {r['smem']} | {r['ms']:.3f} | {r['tflops']:.0f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
