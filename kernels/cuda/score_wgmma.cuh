// score_wgmma.cuh — the Hopper scoring engine (sm_90a): warpgroup MMA (wgmma), operands in
// shared memory (fp8 keys on the f16 engine: A from registers, see FP8A below).
//
// Same contract as score_tile (score_tile.cuh): one CTA (128 threads = one warpgroup) scores
// ROWS query rows against key tiles of SCORE_TILE = 128 items and writes one ranking key per
// (row, item). Why a second engine: on sm_90 the fp8 form of mma.sync is not native (ptxas
// emulates it by converting both operands to f16 for every instruction), which left the v1-v3
// engine bound by integer/ALU work; wgmma runs e4m3, bf16 and f16 natively. The host scores fp8
// inputs on the f16 engine by default (both converted exactly on the way to the MMA): the fp8
// tensor cores accumulate in ~22 bits, too coarse for SPEC §9's tolerance (docs/internals.md).
//
// Orientation: the MMA's M dimension is the key items (64 per instruction, two halves per
// tile), N is the ROWS * H (query row, head) pairs (64 or 128), K is the head dim D = 128. Each
// thread's accumulators then hold 2 items x N/4 heads, so the relu * weight head reduction is
// N/4 fused multiply-adds per item in registers plus two lane shuffles (lanes 4i..4i+3 share
// items) -- the transpose of score_tile's orientation, whose head sums crossed 8 lanes.
//
// Shared-memory layout: every operand row (one key, or one (row, head) of q) is D * EB bytes,
// stored K-major in 128-byte panels with the 128-byte swizzle (16-byte chunk c of row r lands at
// chunk c ^ (r % 8)), 1024-byte aligned; a wgmma descriptor addresses 8-row groups 1024 bytes
// apart and the k-th 32-byte slice by advancing its start address. Keys stream through NBUF
// buffers with cp.async (fp8 rows: lane pairs copy 32 contiguous bytes of a row, a full sector;
// 16-bit rows: eight lanes copy each 128-byte panel, four whole rows per instruction), the
// tensor core works on tile j while tile j + NBUF - 1 loads, and the two 64-item halves are
// committed as separate groups so the epilogue of the first overlaps the MMA of the second.
// Dense fp8 key tiles are 128 consecutive rows: one thread copies each with one bulk copy
// (cp.async.bulk, completion counted on an mbarrier per buffer); they land unswizzled, and the A
// fragment reads take a 2-way bank conflict (fp8a_fragments). The dense score kernel ran
// 4% faster so (H200, 128K/4096); the union path, whose tiles are whole blocks of the union, ran
// no faster that way (-0.4% to +4%: its copies cost through the bytes they move, bench/NOTES.md,
// session 16), so it keeps its per-thread copies.
//
// fp8 keys on the f16 engine (FP8A, the default for fp8 inputs): the key tiles stay e4m3 in
// shared memory (half the bytes from L2, half the tile memory: three union CTAs per SM), and each
// warp converts its A fragments to f16 in registers (wgmma with A from registers, B = q from
// shared memory). The fragments are read in a permuted order of D that makes every thread's
// bytes contiguous; q's tile is staged in the same order, so the dot products are unchanged.
//
// Only compiled for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); other targets get a trap and the host
// never launches it there (kernels/cupy_backend.py: _select_engine, _wgmma_rows).
#pragma once
#include "common.cuh"
#include "score_tile.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HISA_HAS_WGMMA 1
#else
#define HISA_HAS_WGMMA 0
#endif

template <int ENGINE, int KDT, int H, int D, int ROWS, int ITEMS>
struct WgmmaShape {
    static constexpr int N = ROWS * H;                         // MMA N: (query row, head) pairs
    static constexpr int EB = EngineElem<ENGINE>::bytes;       // 1 (e4m3) or 2 (bf16, f16)
    static constexpr int ROWB = D * EB;                        // bytes per q operand row
    static constexpr int CHUNKS = ROWB / 16;                   // 16-byte chunks per q row
    static constexpr int KSTEPS = ROWB / 32;                   // MMA k-steps (32 bytes of K each)
    // fp8 keys on the f16 engine: the key tiles stay e4m3 in shared memory and each warp converts
    // its rows to f16 in registers (exact), the MMA's A operand; q is the f16 B operand
    static constexpr bool FP8A = ENGINE == ENGINE_F16 && KDT == DT_E4M3;
    static constexpr int KROWB = FP8A ? D : ROWB;              // bytes per key row in a tile
    static constexpr int KCHUNKS = KROWB / 16;
    // key tile buffers (H200: 3 for the fp8 union path; 16-bit tiles are twice the size; the
    // register-A path keeps 2 so that three CTAs fit on an SM)
    static constexpr int NBUF = (ITEMS == ITEMS_UNION && EB == 1) ? 3 : 2;
    static constexpr int Q_BYTES = N * ROWB;
    static constexpr int K_BYTES = SCORE_TILE * KROWB;
    // flags and key scales, and on the union path output columns (the block lists and the union,
    // 8 m + 32 ints, come on top: cupy_backend._wgmma_smem), then one mbarrier per key buffer
    static constexpr int META = NBUF * SCORE_TILE * 4 * (1 + ROWS + (ITEMS == ITEMS_UNION ? ROWS : 0)) + 8 * NBUF;
    // + 1024 bytes of slack to align the operand tiles to the 1024-byte swizzle pattern
    static constexpr int SMEM = 1024 + Q_BYTES + NBUF * K_BYTES + META;
    static constexpr bool supported = (ENGINE == ENGINE_E4M3 || ENGINE == ENGINE_BF16 || ENGINE == ENGINE_F16) &&
                                      (KeyPath<ENGINE, KDT>::async || FP8A) && D == 128 && (N == 64 || N == 128) &&
                                      H % 8 == 0;
};

// Byte offset of 16-byte chunk c of row r in a K-major operand tile of R rows (128-byte panels,
// 128-byte swizzle).
template <int R>
__device__ __forceinline__ u32 swizzled(int r, int c) {
    return (u32)((c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// wgmma shared-memory descriptor (K-major, 128-byte swizzle, 8-row groups 1024 bytes apart): the
// high word is constant; the low word holds the start address / 16 (14 bits, so adding offsets
// / 16 to it never carries out) and the unused leading-dimension offset (1).
#define WGMMA_DESC_HI 0x40000040u  // stride offset 1024 / 16 in bits 32-45, swizzle mode 1 (128 B) in bits 62-63
__device__ __forceinline__ u32 wgmma_desc_lo(u32 saddr) { return ((saddr & 0x3FFFFu) >> 4) | (1u << 16); }

#if HISA_HAS_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Pins an accumulator set after the wgmma_wait that retires its MMAs: asm with the registers as
// read-write operands, so the compiler cannot move their reads above the wait (it sees the wgmma's
// asm as writing them when it is issued, and nothing else orders plain arithmetic after an asm
// volatile). Every accumulator read follows one; on an H200 the kernels ran as fast with them
// (bench/NOTES.md, session 24). They emit no PTX, so they do not constrain ptxas: tests/test_sass.py
// checks that its code keeps every relu of the head sums.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&a)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(a[i])::"memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Bulk copies of whole key tiles: one thread arms a buffer's mbarrier with the tile's byte count
// and issues one cp.async.bulk, whose completion ends the barrier's phase; every thread waits for
// that phase (parity = how often the buffer was used before, mod 2).
__device__ __forceinline__ void mbar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\nfence.mbarrier_init.release.cluster;\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arm(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nRETRY:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra RETRY;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}

// D[64 x N] (+)= A[64 x K] * B[N x K]^T, fp32 accumulators, both operands K-major in shared memory
// (descriptor low words a_lo, b_lo); acc = 0 overwrites D
template <int ENGINE, int N> struct Wgmma;
// The wrappers differ only in the instruction's shape and types and the accumulator count, so
// one macro per N writes them: 32 (N = 64) or 64 (N = 128) accumulator operands, then the two
// descriptor low words, the scale-d flag and the constant descriptor high word.
#define HISA_WGMMA_OUT32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define HISA_WGMMA_OUT64 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define HISA_WGMMA_N64(ENG, SHAPE_TYPES, TRANS)                                                    \
    template <> struct Wgmma<ENG, 64> {                                                            \
        static __device__ __forceinline__ void run(float (&d)[32], u32 a_lo, u32 b_lo, int acc) {  \
            asm volatile(                                                                        \
                "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %34, 0;\n"                  \
                "mov.b64 da, {%32, %35};\nmov.b64 db, {%33, %35};\n"                            \
                "wgmma.mma_async.sync.aligned." SHAPE_TYPES " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, da, db, p, 1, 1" TRANS ";\n}\n" \
                : HISA_WGMMA_OUT32                                                               \
                : "r"(a_lo), "r"(b_lo), "r"(acc), "n"(WGMMA_DESC_HI));                           \
        }                                                                                        \
    };
#define HISA_WGMMA_N128(ENG, SHAPE_TYPES, TRANS)                                                   \
    template <> struct Wgmma<ENG, 128> {                                                           \
        static __device__ __forceinline__ void run(float (&d)[64], u32 a_lo, u32 b_lo, int acc) {  \
            asm volatile(                                                                        \
                "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %66, 0;\n"                  \
                "mov.b64 da, {%64, %67};\nmov.b64 db, {%65, %67};\n"                            \
                "wgmma.mma_async.sync.aligned." SHAPE_TYPES " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, da, db, p, 1, 1" TRANS ";\n}\n" \
                : HISA_WGMMA_OUT64                                                               \
                : "r"(a_lo), "r"(b_lo), "r"(acc), "n"(WGMMA_DESC_HI));                           \
        }                                                                                        \
    };
HISA_WGMMA_N64(ENGINE_E4M3, "m64n64k32.f32.e4m3.e4m3", "")
HISA_WGMMA_N128(ENGINE_E4M3, "m64n128k32.f32.e4m3.e4m3", "")
HISA_WGMMA_N64(ENGINE_BF16, "m64n64k16.f32.bf16.bf16", ", 0, 0")
HISA_WGMMA_N128(ENGINE_BF16, "m64n128k16.f32.bf16.bf16", ", 0, 0")
HISA_WGMMA_N64(ENGINE_F16, "m64n64k16.f32.f16.f16", ", 0, 0")
HISA_WGMMA_N128(ENGINE_F16, "m64n128k16.f32.f16.f16", ", 0, 0")

// The same with A from registers (f16 only: the fp8-key path): a[4] is the thread's fragment of
// the 64 x 16 A slice (rows 16 warp + lane / 4 (+ 8), columns 2 (lane % 4) + {0, 1} (+ 8)), B from
// shared memory (descriptor low word b_lo), B K-major (imm-trans-b = 0)
template <int N> struct WgmmaRS;
template <> struct WgmmaRS<64> {
    static __device__ __forceinline__ void run(float (&d)[32], const u32 (&a)[4], u32 b_lo, int acc) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %37, 0;\nmov.b64 db, {%36, %38};\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, db, p, 1, 1, 0;\n}\n"
            : HISA_WGMMA_OUT32
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_lo), "r"(acc), "n"(WGMMA_DESC_HI));
    }
};
template <> struct WgmmaRS<128> {
    static __device__ __forceinline__ void run(float (&d)[64], const u32 (&a)[4], u32 b_lo, int acc) {
        asm volatile(
            "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %69, 0;\nmov.b64 db, {%68, %70};\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, db, p, 1, 1, 0;\n}\n"
            : HISA_WGMMA_OUT64
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_lo), "r"(acc), "n"(WGMMA_DESC_HI));
    }
};

// two fp8 values (the low 16 bits of v) -> two 16-bit engine operands, exact (e4m3 values are
// representable in f16 and bf16; bf16 through f32, whose low 16 bits are then zero)
template <int ENGINE>
__device__ __forceinline__ u32 e4m3x2_to_engine(u32 v) {
    const u32 h = e4m3x2_to_f16x2<0>(v);
    if (ENGINE != ENGINE_BF16) return h;
    const u32 lo = __float_as_uint(f16_to_f32((u16)(h & 0xFFFFu)));
    const u32 hi = __float_as_uint(f16_to_f32((u16)(h >> 16)));
    return (lo >> 16) | (hi & 0xFFFF0000u);
}

// The register-A path (FP8A, D = 128): the thread's A fragments of one 64-key half of an e4m3 key
// tile (rows of 128 bytes, swizzled like the wgmma tiles), converted to f16 in registers. Rows
// g = 16 warp + lane / 4 and g + 8 of the half; the thread reads bytes [32 c, 32 c + 32) of each
// (c = lane % 4: two 16-byte chunks, conflict-free), and k-step s takes bytes 32 c + 4 s + {0..3}:
// the first two as MMA columns 2 c + {0, 1}, the last two as 2 c + 8 + {0, 1}. The MMA thus sums
// over a permutation of D; q's B tile is staged in the same permuted order. LINEAR: the tile is
// unswizzled (bulk copies), so the two rows of each quarter warp hit the same banks (a 2-way
// conflict). Reading odd rows' chunks in swapped order avoids it but needs 16 selects per half
// to swap them back, which cost more: dense_select 0.7-1.2% faster without them (bench/NOTES.md,
// session 25).
template <bool LINEAR = false>
__device__ __forceinline__ void fp8a_fragments(const char* tile, int half, int warp, int lane, u32 (&af)[8][4]) {
    const int g = lane >> 2, c = lane & 3;
    // chunk 2 c + e of the thread's row -> MMA columns of k-steps 4 e .. 4 e + 3
    auto put = [&](int rr, int e, uint4 v) {
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            af[4 * e + i][rr] = e4m3x2_to_f16x2<0>(w[i]);
            af[4 * e + i][2 + rr] = e4m3x2_to_f16x2<1>(w[i]);
        }
    };
    auto chunk = [&](int r, int x) { return *reinterpret_cast<const uint4*>(tile + r * 128 + (x << 4)); };
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int r = half * 64 + warp * 16 + g + 8 * rr;
#pragma unroll
        for (int e = 0; e < 2; ++e) put(rr, e, chunk(r, LINEAR ? 2 * c + e : (2 * c + e) ^ g));
    }
}
#endif  // HISA_HAS_WGMMA

// relu (score_tile.cuh) against -0 (a zero of either sign for x <= 0): head sums of relu * weight
// fused multiply-adds come out bit for bit the same with either (their chains start at +0, and
// adding a zero product to a partial sum gives the partial sum, or +0). A different instruction
// for ptxas: the dense kernel's first MMA half uses it (fp8a_tile).
__device__ __forceinline__ float relu_nz(float x) {
    float y;
    asm("max.NaN.f32 %0, %1, 0f80000000;" : "=f"(y) : "f"(x));
    return y;
}

// The relu * weight head sums of one 64-item half from its accumulators a (N = ROWS * H operand
// columns; the lane's columns 8 i + 2 (lane % 4) + {0, 1}, weights wt as head_weights loads them):
// sum[r][e] = item 16 warp + lane / 4 + 8 e of the half for query row r, reduced over the 4 lanes
// that share the item (all 4 hold it). Two independent FMA chains per item. A function of its own
// so that bench/wgmma_rate.py times the engine's own epilogue. NZ: the relus against -0 (relu_nz;
// the same sums bit for bit).
template <int N, int H, int ROWS, bool NZ = false, bool QUAD = true>
__device__ __forceinline__ void wgmma_head_sums(const float (&a)[N / 2], const float (&wt)[N / 8][2],
                                                float (&sum)[ROWS][2]) {
    float p[ROWS][2][2];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) p[r][0][0] = p[r][0][1] = p[r][1][0] = p[r][1][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < N / 8; ++i) {
        const int r = (8 * i) / H;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            p[r][e][0] = fmaf(wt[i][0], NZ ? relu_nz(a[4 * i + 2 * e]) : relu(a[4 * i + 2 * e]), p[r][e][0]);
            p[r][e][1] = fmaf(wt[i][1], NZ ? relu_nz(a[4 * i + 2 * e + 1]) : relu(a[4 * i + 2 * e + 1]), p[r][e][1]);
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float v = p[r][e][0] + p[r][e][1];
            if constexpr (QUAD) {
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
            }
            sum[r][e] = v;
        }
}

// The reduction over a quad of lanes of a tile's four items, scattered: u0 / u1 are this lane's
// unreduced sums of items e = 0, 1 of halves 0 / 1 (wgmma_head_sums with QUAD = false); returns
// the sum over the quad of item x = lane % 4 (half x / 2, e = x % 2), the item write_keys takes
// from lane x. Three exchanges (two values with lane ^ 1, then one with lane ^ 2) where the
// all-reduce took two per item; the additions pair the same lanes in the same order,
// (v_L + v_{L^1}) + (v_{L^2} + v_{L^3}), so every sum is the all-reduce's bit for bit.
__device__ __forceinline__ float quad_reduce_scatter(const float (&u0)[2], const float (&u1)[2], int lane) {
    const bool odd = lane & 1, high = lane & 2;
    const float a = (odd ? u0[1] : u0[0]) + __shfl_xor_sync(0xFFFFFFFFu, odd ? u0[0] : u0[1], 1);
    const float b = (odd ? u1[1] : u1[0]) + __shfl_xor_sync(0xFFFFFFFFu, odd ? u1[0] : u1[1], 1);
    return (high ? b : a) + __shfl_xor_sync(0xFFFFFFFFu, high ? a : b, 2);
}

// The lane's head weights: operand columns n = 8 i + 2 (lane % 4) + {0, 1}, i.e. query row
// n / H, head n % H (0 for a row past the end). A function of its own so that the pointer keeps
// its __restrict__ (read-only loads with folded offsets; a lambda's capture loses it).
// EARLY: loads kept before the kernel's wait (early_loads, common.cuh).
template <int N, int H, int ROWS, bool EARLY = false>
__device__ __forceinline__ void head_weights(const float* __restrict__ weights, const bool (&live)[ROWS],
                                             const int (&trow)[ROWS], int lane, float (&wt)[N / 8][2]) {
    if constexpr (EARLY) {
        head_weights<N, H, ROWS>(early_loads(weights), live, trow, lane, wt);
    } else {
#pragma unroll
        for (int i = 0; i < N / 8; ++i)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int n = 8 * i + 2 * (lane & 3) + e, r = n / H;
                wt[i][e] = live[r] ? weights[(long long)trow[r] * H + n % H] : 0.0f;
            }
    }
}

// Threshold mode of the dense path (APPEND; dense.cu, dense_score_append_wgmma_kernel): instead of
// writing every ranking key, the keys >= max(thr[row], 1) (row: the launch's row, local0 + r; 1
// keeps NaN's key, never HISA_KEY_NONE) are appended, unordered, with their columns: first to
// per-warp lists of APPEND_WCAP entries per row in shared memory (the warp's count in a register:
// one ballot per row and tile, no atomics), which go out by one global atomic each whenever a tile
// could fill them, and at the CTA's end. count[row] ends as the row's total (it may exceed cap:
// slots past cap are not written). On an H200 the appending kernel takes the score kernel's time
// (12.69 against 12.70 ms at 128K / 4096; one shared list per CTA with a shared atomic per warp,
// row and tile had cost 2.3%: bench/NOTES.md, session 29). The lists take the shared memory left
// by three CTAs per SM.
#define APPEND_CAP 416                                  // entries per row and CTA (cupy_backend.APPEND_CAP)
#define APPEND_WCAP (APPEND_CAP / (SCORE_THREADS / 32))  // per warp and row
struct AppendOut {
    const u32* thr;
    u32* cand_key;
    int* cand_col;
    int* count;
    int cap;
};
#define APPEND_SMEM (2 * APPEND_CAP * 8)  // two rows of (key, column) entries: cupy_backend.APPEND_SMEM

// A union CTA's share of its pair's union: part `part` of `parts` even shares (by work on the
// SPLIT_ROWS path, by tiles elsewhere); part 0 also writes the pair's padding. parts 0: part
// blockIdx.x of gridDim.x.
struct UnionShare {
    int part, parts;
};

template <int ENGINE, int QDT, int KDT, int H, int D, int ITEMS, int ROWS, bool APPEND = false, bool HALF = false,
          bool TILE_MAP = false>
__device__ __forceinline__ void score_tile_wgmma(
    const void* __restrict__ q, const void* __restrict__ keys, const float* __restrict__ weights,
    const float* __restrict__ kscale, const int* __restrict__ ks, const int* __restrict__ ke,
    const int* __restrict__ blocks, int T, int S, int B, int m, int nitems, int col0, int row0, int nrows,
    u32* __restrict__ out, long long ld, int tiles_per_cta, const int* __restrict__ unions = nullptr,
    AppendOut app = AppendOut{nullptr, nullptr, nullptr, nullptr, 0}, int local0_at = -1,
    UnionShare share = UnionShare{0, 0}, bool trigger = false) {
    using Shape = WgmmaShape<ENGINE, KDT, H, D, ROWS, ITEMS>;
    static_assert(Shape::supported, "wgmma engine: D = 128, ROWS * H in {64, 128}, keys in the engine type");
    static_assert(ROWS == 1 || ITEMS != ITEMS_GATHER, "gathered candidates differ per row: one row per CTA");
    static_assert(ITEMS != ITEMS_UNION || ROWS == 2, "the union path pairs two rows");
#if !HISA_HAS_WGMMA
    __trap();
#else
    constexpr bool UNION = ITEMS == ITEMS_UNION;
    constexpr bool DENSE = ITEMS == ITEMS_TOKENS;
    // fp8 keys, two rows of 64 heads: the union path runs a tile's MMAs only for the rows whose
    // blocks it holds (split_runs; issue_rs_row for a tile of one row's blocks)
    constexpr bool SPLIT_ROWS = Shape::FP8A && UNION && H == 64;
    // TILE_MAP (SPLIT_ROWS where B = SCORE_TILE: the host launches it only there): union tile j is
    // the union's block j, so its key rows, each row's output columns and flags follow from three
    // per-tile values (the block, its index in each row's list) read when the tile is copied and
    // when its keys are written, instead of a per-item map whose flags and columns pass through
    // shared memory; each lane's key scale is loaded from memory before the tile's MMAs (as dense's
    // item_scale), not copied into shared memory with the tile; and the head sums are reduced over
    // each quad of lanes by quad_reduce_scatter, not all-reduced item by item. On an H200 the union
    // kernel ran 4-5% faster with the map, 3% faster again with the scales and 2% with the
    // reduce-scatter (bench/NOTES.md, session 53): its loop over two-row tiles has 13% fewer
    // instructions, over one-row tiles 21% fewer. (Blocks of several tiles would need each tile's
    // block and offset: a division per tile and use, which took back half of the instructions
    // saved.) Each warp copies the key rows its own A fragments read, so the tiles need no CTA
    // barrier, and the per-tile addresses start from per-CTA pointers: 1.8% faster again (v60,
    // session 54). Writing a tile's keys under the next tile's MMAs measured 7% slower (session 54).
    constexpr bool TMAP = TILE_MAP && SPLIT_ROWS;
    static_assert(!TILE_MAP || SPLIT_ROWS, "tile map: the union path of fp8 keys on the f16 engine, H = 64");
    constexpr int N = Shape::N, NBUF = Shape::NBUF, CHUNKS = Shape::CHUNKS, KSTEPS = Shape::KSTEPS;
    constexpr int QB = DType<QDT>::bytes, EB = Shape::EB;
    // HALF (block_score_wgmma_kernel's, 16-bit keys, N = 128): the key tiles stream through two
    // buffers of one 64-item half each (half h of every tile in buffer h) and one accumulator set
    // serves both halves, so a CTA takes 68 KB and at most 168 registers: three CTAs per SM
    // instead of two (the two-buffer, two-set loop below keeps a tile's halves in flight at once)
    static_assert(!HALF || (ITEMS == ITEMS_BLOCKS && !Shape::FP8A && EB == 2 && N == 128 && NBUF == 2),
                  "half-tile buffers: the block scores of 16-bit keys, N = 128");
    constexpr int KBUF = HALF ? Shape::K_BYTES / 2 : Shape::K_BYTES;  // bytes per key buffer
    extern __shared__ __align__(16) char smem[];
    char* base = smem + ((1024u - (smem_addr(smem) & 1023u)) & 1023u);
    char* sQ = base;                                          // [N rows] operand tile
    char* sK = sQ + Shape::Q_BYTES;                           // [NBUF][SCORE_TILE rows] (HALF: 64 rows)
    u32* sFlag = reinterpret_cast<u32*>(sK + NBUF * KBUF);    // [NBUF][ROWS][SCORE_TILE]
    float* sScale = reinterpret_cast<float*>(sFlag + NBUF * ROWS * SCORE_TILE);  // [NBUF][SCORE_TILE]
    // union path only: output column of each (row, item) [NBUF][ROWS][SCORE_TILE] (-1: not the
    // row's candidate), both rows' block lists [2][m], the union's blocks [2m] and their index in
    // each row's list [2m][2] (a block's two side by side, as in the pair records), scan scratch [32]
    int* sDst = reinterpret_cast<int*>(sScale + NBUF * SCORE_TILE);
    int* sList = sDst + (UNION ? NBUF * ROWS * SCORE_TILE : 0);
    int* sUnion = sList + 2 * m;
    int* sScan = sUnion + 6 * m;
    // dense fp8 keys: one bulk copy per key tile, one mbarrier per buffer [NBUF] after the key
    // scales (8-byte aligned)
    constexpr bool BULK = Shape::FP8A && DENSE;
    const u32 sBar0 = smem_addr(sDst);
    static_assert(!APPEND || (BULK && ROWS == 2), "threshold mode: the dense fp8 path");
    // APPEND: [warps][ROWS][APPEND_WCAP] (key, column) entries, after the barriers
    uint2* sApp = reinterpret_cast<uint2*>(reinterpret_cast<char*>(sDst) + 8 * NBUF);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int local0 = local0_at >= 0 ? local0_at : blockIdx.y * ROWS;  // local0_at: the dense rescue's rows
    int trow[ROWS];
    bool live[ROWS];
    RowRange rr[ROWS];
    cta_rows<ROWS>(local0, nrows, row0, ks, ke, T, S, trow, live, rr);
    // APPEND: each warp appends to its own lists (APPEND_WCAP entries per row, its count in a
    // register: no shared atomics), and sends a row's list out (one global atomic, then the warp's
    // copy) when a tile could fill it: at a tile's start every list holds at most
    // APPEND_WCAP - 32 entries, and a warp adds at most 32 per row and tile
    u32 app_thr[ROWS];
    int app_n[ROWS];
    uint2* app_list = sApp + warp * ROWS * APPEND_WCAP;  // [ROWS][APPEND_WCAP] of this warp
    const unsigned lanes_below = (1u << lane) - 1u;
    auto append_flush = [&](int limit) {  // the warp's lists, warp-uniform
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (app_n[r] <= limit) continue;
            const long long row = local0 + r;
            int base = 0;
            if (lane == 0) base = atomicAdd(app.count + row, app_n[r]);
            base = __shfl_sync(0xFFFFFFFFu, base, 0);
            for (int i = lane; i < app_n[r]; i += 32)
                if (base + i < app.cap) {
                    const uint2 e = app_list[r * APPEND_WCAP + i];
                    app.cand_key[row * app.cap + base + i] = e.x;
                    app.cand_col[row * app.cap + base + i] = (int)e.y;
                }
            __syncwarp();  // read before the list is written again
            app_n[r] = 0;
        }
    };
    if constexpr (APPEND) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            app_thr[r] = live[r] ? max(app.thr[local0 + r], 1u) : 0xFFFFFFFFu;
            app_n[r] = 0;
        }
    }
    // q's chunks (16 bytes of an operand row each): QITERS per thread, chunk it * SCORE_THREADS +
    // tid is operand row it * QSTEP + q_row (row r = it * QSTEP / H's head it * QSTEP % H + q_row)
    // and chunk q_c of it. q_read reads a chunk's source as QW raw words, q_write converts them
    // and writes the chunk (zeros for a row past the end). The prefetching paths (q_load /
    // q_store, by iteration) work the addresses out per thread (q_row, q_c, each row's source
    // base) and per iteration (constants: the loop unrolls). Worked out per chunk (a division, a
    // remainder and a 64-bit product each) they were 12% of the block scores' instructions at
    // 32K / 4096; per iteration the block scores ran 16% faster there and the union kernel 3%
    // (H200, bench/NOTES.md, session 32). Dense keeps the per-chunk form (q_load_chunk /
    // q_store_chunk, below).
    constexpr bool PREFETCH = !DENSE;  // q loaded at once (q_src: early_loads), before the kernel's wait (below)
    constexpr int QITERS = N * CHUNKS / SCORE_THREADS;
    constexpr int QSTEP = SCORE_THREADS / CHUNKS;  // operand rows per iteration
    static_assert(N * CHUNKS % SCORE_THREADS == 0 && SCORE_THREADS % CHUNKS == 0 && H % QSTEP == 0,
                  "q tile: whole rows per iteration, the same number of chunks per thread, rows of one query row");
    constexpr int QW = (Shape::FP8A && QB == 1) || (!Shape::FP8A && QB != EB) ? 2 : 4;
    const int q_row = tid / CHUNKS, q_c = tid % CHUNKS;
    // each row's q (PREFETCH; through early_loads, which dense's q must not pass: a pointer that
    // reaches an asm statement loses its read-only loads, and dense's kernel its SASS)
    const char* q_src[ROWS];
    const char* q_rows = reinterpret_cast<const char*>(q);
    if constexpr (PREFETCH) q_rows = early_loads(q_rows);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) q_src[r] = q_rows + (long long)(live[r] ? trow[r] : 0) * H * D * QB;
    // q_read: chunk c of the operand row at src (zeros for a row past the end)
    auto q_read = [&](const char* src, int c, bool lv, u32 (&w)[QW]) {
#pragma unroll
        for (int e = 0; e < QW; ++e) w[e] = 0u;
        if (!lv) return;
        if constexpr (Shape::FP8A) {
            // the register-A path's K order (load_a): MMA column 8 c + 2 p + {0, 1} holds element
            // 32 p + 2 c + {0, 1}; fp8: two 2-byte pieces per word
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const int d0 = 32 * p + 2 * c;
                if constexpr (QB == 1) w[p >> 1] |= (u32)*reinterpret_cast<const u16*>(src + d0) << ((p & 1) * 16);
                else w[p] = *reinterpret_cast<const u32*>(src + 2 * d0);
            }
        } else if constexpr (QB == EB) {
            const uint4 v = reinterpret_cast<const uint4*>(src)[c];
            w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
        } else {  // e4m3 q, 16-bit engine: 8 source bytes per chunk
            const uint2 x = reinterpret_cast<const uint2*>(src)[c];
            w[0] = x.x, w[1] = x.y;
        }
    };
    // q_write: converts a chunk's words and writes them as operand row rowq's chunk c
    auto q_write = [&](int rowq, int c, bool lv, const u32 (&w)[QW]) {
        u32 o[4];
        if constexpr (Shape::FP8A && QB == 1) {  // fp8 q: the keys' conversion instruction
            o[0] = e4m3x2_to_f16x2<0>(w[0]);
            o[1] = e4m3x2_to_f16x2<1>(w[0]);
            o[2] = e4m3x2_to_f16x2<0>(w[1]);
            o[3] = e4m3x2_to_f16x2<1>(w[1]);
        } else if constexpr (QW == 4) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[e] = w[e];
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[e] = e4m3x2_to_engine<ENGINE>(w[e >> 1] >> ((e & 1) * 16));
        }
        const uint4 v = lv ? make_uint4(o[0], o[1], o[2], o[3]) : make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(sQ + swizzled<N>(rowq, c)) = v;
    };
    // dense's chunks, by chunk index i (its strided staging loop): in the per-iteration form its
    // append kernel ran 1.2% slower at 128K / 4096 (12.81 vs 12.66 ms, H200, session 32); this form
    // compiles to the same SASS as before the per-iteration form (nvdisasm, every instance)
    auto q_load_chunk = [&](int i, u32 (&w)[QW]) {
        const int rowq = i / CHUNKS, c = i % CHUNKS, r = rowq / H;
        const char* src = reinterpret_cast<const char*>(q) +
                          ((long long)(live[r] ? trow[r] : 0) * H + rowq % H) * D * QB;
        q_read(src, c, live[r], w);
    };
    auto q_store_chunk = [&](int i, const u32 (&w)[QW]) {
        const int rowq = i / CHUNKS, c = i % CHUNKS, r = rowq / H;
        q_write(rowq, c, live[r], w);
    };
    // the prefetching paths' chunks, by iteration
    auto q_load = [&](int it, u32 (&w)[QW]) {
        const int r = it * QSTEP / H;
        q_read(q_src[r] + (it * QSTEP % H + q_row) * (D * QB), q_c, live[r], w);
    };
    auto q_store = [&](int it, const u32 (&w)[QW]) { q_write(it * QSTEP + q_row, q_c, live[it * QSTEP / H], w); };
    // every path but dense loads all of q and its head weights now, beside the row ranges: their
    // latency passes while the tile range (and the union of the two block lists) is worked out
    // and the first key tiles are requested (QITERS x QW registers, free again before the
    // accumulators are live), and before the kernel waits for the one before it
    u32 qraw[PREFETCH ? QITERS : 1][QW];
    float wt[N / 8][2];
    if constexpr (PREFETCH) {
#pragma unroll
        for (int it = 0; it < QITERS; ++it) q_load(it, qraw[it]);
        head_weights<N, H, ROWS, true>(weights, live, trow, lane, wt);
        // only now does the CTA wait for the kernel before it (common.cuh): q, the head weights
        // and the row ranges are the call's inputs, so a CTA launched early (the pool triggers
        // the block scores at its start, the block top-m the union kernel where the host asks)
        // has its q loads in flight before that kernel ends; elsewhere the wait has returned by
        // then. Dense's kernels wait at their start.
        grid_dependency_sync();
        // trigger: the launch after this one may start now (the union kernel's, where the refine
        // top-k waits for each pair's ready flags instead of for the whole launch: refine.cu)
        if (trigger) grid_dependents_launch();
    }
    const int nb = (S + B - 1) / B;
    const FastDiv Bd(B);
    // block scores: each row's key range becomes its eligible blocks' range [first, last + 1)
    // (empty where the row sees no keys), once per CTA instead of two divisions per row and item
    // (item_row's; map_item below)
    if constexpr (ITEMS == ITEMS_BLOCKS) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            rr[r] = rr[r].ke > rr[r].ks ? RowRange{(int)Bd.div((u32)rr[r].ks), (int)Bd.div((u32)(rr[r].ke - 1)) + 1}
                                        : RowRange{0, 0};
    }
    const int ntiles = (nitems + SCORE_TILE - 1) / SCORE_TILE;
    const int j_begin = blockIdx.x * tiles_per_cta;
    const int j_end = min(ntiles, j_begin + tiles_per_cta);
    const char* kbase = reinterpret_cast<const char*>(keys);
    auto orow = [&](int r) { return out + (long long)(local0 + r) * ld; };
    int j_first, j_stop, n_union = 0;
    // SPLIT_ROWS: the union's tiles [0, split_runs[0]) hold blocks of both rows, then up to
    // split_runs[1] blocks of row 0 only, then of row 1 only
    int split_runs[2] = {0, 0};
    // key row of item n (-1: none), each row's flag for it (0 not a candidate, 1 scored, 2 forced
    // block) and, on the union path, each row's output column for it (-1: not the row's)
    auto map_item = [&](int n, u32 (&f)[ROWS], int (&col)[ROWS]) {
        int row = -1;
        if constexpr (UNION) {
            const bool in = n < n_union * B;
            const int u = in ? (int)Bd.div((u32)n) : 0;
            const int off = n - u * B;
            const int s = in ? sUnion[u] * B + off : 0;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int idx = in ? sUnion[2 * m + 2 * u + r] : -1;
                col[r] = idx >= 0 ? idx * B + off : -1;
                f[r] = (idx >= 0 && s >= rr[r].ks && s < rr[r].ke) ? 1u : 0u;
                if (f[r]) row = s;
            }
        } else {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                col[r] = n;
                if constexpr (ITEMS == ITEMS_BLOCKS) {
                    // item_row's flags from the row's block range (rr, above): 2 for its first and
                    // last block (forced, not scored), 1 for the others
                    const bool in = n < nitems && n >= rr[r].ks && n < rr[r].ke;
                    f[r] = in ? (n == rr[r].ks || n == rr[r].ke - 1 ? 2u : 1u) : 0u;
                    if (f[r] == 1u) row = n;
                } else {
                    const int rw = item_row<ITEMS>(n, nitems, trow[r], rr[r], blocks, S, Bd, m, col0, nb, &f[r]);
                    if (rw >= 0) row = rw;
                }
            }
        }
        return row;
    };
    auto write_unscored = [&](int n, const u32 (&f)[ROWS]) {
        if constexpr (!APPEND) {  // threshold mode writes no keys
            if (n >= nitems) return;
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                if (live[r]) orow(r)[n] = f[r] == 2u ? HISA_KEY_FORCED : HISA_KEY_NONE;
        }
    };

    // the barriers are published by the first CTA-wide barrier below (tile_has_candidate)
    if (BULK && tid == 0)
        for (int s = 0; s < NBUF; ++s) mbar_init(sBar0 + 8 * s);
    if constexpr (UNION) {
        // Union of the two rows' block lists (strictly ascending, -1 padded: select_blocks'
        // output); a block in both lists is emitted once, from row 0. In block order, a block's
        // union index = (its index in its list) + (entries of the other list below it) - (common
        // entries below it). SPLIT_ROWS groups it instead: the common blocks, then row 0's own,
        // then row 1's own, each ascending (index d, common + i - d, len0 + i - d for entry i of
        // its list with d common entries below it; row 1 goes first, which counts the common
        // ones). The order decides only which CTA scores an item, never its key or column.
        // With `unions` (pair records of the block top-m, written in this order; rows row0 +
        // local0 + {0, 1} are pair (row0 + local0) / 2, row0 even) the union is read, else merged here.
        int len[2], common = 0;
        if (unions != nullptr) {
            const int* rec = unions + (long long)((row0 + local0) >> 1) * pair_record_ints(m);
            len[0] = rec[0];
            len[1] = rec[1];
            common = rec[2];
            const int nu = len[0] + len[1] - common;
            for (int i = tid; i < nu; i += SCORE_THREADS) {
                sUnion[i] = rec[PAIR_RECORD_HEAD + i];
                reinterpret_cast<int2*>(sUnion + 2 * m)[i] = reinterpret_cast<const int2*>(rec + PAIR_RECORD_HEAD + 2 * m)[i];
            }
        } else {
            for (int i = tid; i < m; i += SCORE_THREADS)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int b = live[r] ? blocks[(long long)trow[r] * m + i] : -1;
                    sList[r * m + i] = (b >= 0 && b < nb) ? b : 0x7FFFFFFF;  // padding sorts last
                }
            __syncthreads();
            auto lower_bound = [&](const int* a, int n, int v) {
                int lo = 0;
                while (n > 0) {
                    const int half = n >> 1;
                    if (a[lo + half] < v) { lo += half + 1; n -= half + 1; } else { n = half; }
                }
                return lo;
            };
            len[0] = lower_bound(sList, m, 0x7FFFFFFF);
            len[1] = lower_bound(sList + m, m, 0x7FFFFFFF);
#pragma unroll
            for (int pass = 0; pass < 2; ++pass) {
                const int r = SPLIT_ROWS ? 1 - pass : pass;
                const int* mine = sList + r * m;
                const int* other = sList + (1 - r) * m;
                int seen = 0;  // common entries in earlier chunks
                for (int c0 = 0; c0 < len[r]; c0 += SCORE_THREADS) {
                    const int i = c0 + tid;
                    int lb = 0, dup = 0;
                    if (i < len[r]) {
                        lb = lower_bound(other, len[1 - r], mine[i]);
                        dup = lb < len[1 - r] && other[lb] == mine[i];
                    }
                    // exclusive prefix count of dup over the chunk
                    unsigned bal = __ballot_sync(0xFFFFFFFFu, dup);
                    const int in_warp = __popc(bal & ((1u << lane) - 1u));
                    if (lane == 0) sScan[warp] = __popc(bal);
                    __syncthreads();
                    int before = 0, total = 0;
#pragma unroll
                    for (int w = 0; w < SCORE_THREADS / 32; ++w) {
                        before += w < warp ? sScan[w] : 0;
                        total += sScan[w];
                    }
                    __syncthreads();
                    if (i < len[r] && (r == 0 || !dup)) {
                        const int d = seen + before + in_warp;
                        const int pos = !SPLIT_ROWS ? i + lb - d : r == 1 ? len[0] + i - d : dup ? d : common + i - d;
                        sUnion[pos] = mine[i];
                        sUnion[2 * m + 2 * pos] = r == 0 ? i : -1;
                        sUnion[2 * m + 2 * pos + 1] = r == 0 ? (dup ? lb : -1) : i;
                    }
                    seen += total;
                }
                common = seen;
            }
        }
        n_union = len[0] + len[1] - common;
        // parts 0 does not occur (every union CTA passes its share), but without this fallback
        // ptxas scheduled the union kernel 1-2% slower (H200, bench/NOTES.md, session 39)
        const int part = share.parts > 0 ? share.part : (int)blockIdx.x;
        const int parts = share.parts > 0 ? share.parts : (int)gridDim.x;
        // list entries past a row's valid blocks hold no candidates
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (live[r] && part == 0)
                for (int n = len[r] * B + tid; n < nitems; n += SCORE_THREADS) orow(r)[n] = HISA_KEY_NONE;
        // TMAP: the rows' key ranges for write_keys_tmap (start and length), in the merge's scratch
        // (free now): read by broadcast per tile rather than held in registers across the MMAs
        if (TMAP && tid == 0)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sScan[2 * r] = rr[r].ks, sScan[2 * r + 1] = max(rr[r].ke - rr[r].ks, 0);
        __syncthreads();
        const int total = (n_union * B + SCORE_TILE - 1) / SCORE_TILE;
        if constexpr (SPLIT_ROWS) {
            // whole tiles per block: a tile holds blocks of one group (else every tile takes both
            // rows' MMAs). The tiles split over the pair's `parts` CTAs by work, a tile of both
            // rows counting twice: part x takes the tiles of work [x W / G, (x + 1) W / G)
            if (B % SCORE_TILE == 0) {
                split_runs[0] = common * (B / SCORE_TILE);
                split_runs[1] = len[0] * (B / SCORE_TILE);
            } else {
                split_runs[0] = split_runs[1] = total;
            }
            const int both = split_runs[0], work = total + both, G = parts;
            auto tile_at = [&](int w) { return w <= 2 * both ? (w + 1) / 2 : w - both; };
            j_first = tile_at((int)((long long)work * part / G));
            j_stop = tile_at((int)((long long)work * (part + 1) / G));
        } else {
            // the union's tiles split evenly over the pair's CTAs (shorter tail)
            const int per = (total + parts - 1) / parts;
            j_first = part * per;
            j_stop = min(total, j_first + per);
        }
        if (j_first >= j_stop) return;
    } else {
        // first and last tile of this CTA holding a candidate (masked CTAs never stage q). Every
        // tile in between is scored: a per-tile skip would put the wgmma under a branch, and ptxas
        // then serialises the MMAs (candidates of a row are contiguous on the dense and block paths).
        // whether tile j holds a candidate of any row (CTA-wide); f: each row's flags of this
        // thread's item
        auto tile_has_candidate = [&](int j, u32 (&f)[ROWS]) {
            int col[ROWS];
            map_item(j * SCORE_TILE + tid, f, col);
            bool mine = false;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) mine |= f[r] == 1u;
            return __syncthreads_or(mine) != 0;
        };
        j_first = j_end;
        int j_last = j_begin - 1;
        for (int j = j_begin; j < j_end; ++j) {
            u32 f[ROWS];
            if (tile_has_candidate(j, f)) {
                j_first = j;
                break;
            }
            write_unscored(j * SCORE_TILE + tid, f);
        }
        if (j_first == j_end) return;
        for (int j = j_end - 1; j >= j_first; --j) {
            u32 f[ROWS];
            if (tile_has_candidate(j, f)) {
                j_last = j;
                break;
            }
            write_unscored(j * SCORE_TILE + tid, f);
        }
        j_stop = j_last + 1;
    }

    // dense stages q here, before its first key tiles, in a strided loop over the chunks (its
    // q is staged once per many key tiles), then loads the lane's head weights and fences (q
    // was written by the generic proxy, wgmma reads it through the async one). Staged like the
    // other paths, after the first copies, it ran 17% slower on an H200 (16.9 vs 14.3 ms of
    // score kernel at 128K/4096); this form gives the same PTX as before that change outside
    // the staging block.
    if constexpr (DENSE) {
        for (int i = tid; i < N * CHUNKS; i += SCORE_THREADS) {
            u32 w[QW];
            q_load_chunk(i, w);
            q_store_chunk(i, w);
        }
        head_weights<N, H, ROWS>(weights, live, trow, lane, wt);
        fence_async_smem();
    }

    // tile j -> buffer slot. Each thread maps its own item; the warp then copies its 32 key rows.
    // Rows of one 128-byte panel (fp8 keys): lane pairs on one row (2 x 16 contiguous bytes:
    // every request is a full 32-byte sector), 16 rows per instruction: lane l serves rows l / 2
    // and 16 + l / 2, chunks 2 i + l % 2. Row bases and the swizzle are computed once per row;
    // chunk offsets are immediates (the swizzled chunk is (2 i) ^ x with x = (l % 2) ^ (row % 8)).
    // Rows of two panels (16-bit keys): four whole rows per instruction, lane l on chunk l % 8
    // of each panel of row 4 s + l / 8 (full lines; block scores at 128K/4096 181 -> 166 us on an
    // H200, while the same pattern on fp8 rows made the union and dense kernels 15% / 8% slower:
    // bench/NOTES.md, session 14).
    constexpr bool WHOLE_ROWS = Shape::KCHUNKS == 16;
    const u32 sK0 = smem_addr(sK);
    const int pair = lane >> 1, sub = lane & 1;
    const int sub8 = lane & 7, rq = lane >> 3;
    // TMAP: warp w copies the rows its own A fragments read (16 w .. 16 w + 15 of each 64-row half,
    // fp8a_fragments), so that a tile needs no CTA barrier; elsewhere rows 32 w .. 32 w + 31
    constexpr int WARP_ROWS = TMAP ? 16 : 32, H_ROWS = TMAP ? 64 : 16;
    const u32 dst_lane = (u32)((warp * WARP_ROWS + pair) * 128) | (u32)(((sub ^ (pair & 7)) << 4));
    // fp8 key rows by lane pairs: the pair's key row rw (zeros where !ok; rw a row of k all the
    // same, so that the address needs no select) into row H_ROWS h + pair of the warp's in buffer
    // slot; lane l copies chunks 2 i + l % 2 (panel i / 4, swizzled chunk (2 (i % 4)) ^ x). The
    // swizzle's bits 5-6 come from dst_lane alone (the buffers are 1024-byte aligned), so h's and
    // the panel's offsets add after it. ksub: the lane's chunk of row 0, once per CTA (the asm
    // hides how it was made: each row's address is then one IMAD.WIDE, where nvcc rebuilt it in 4)
    const char* ksub = kbase + sub * 16;
    asm("" : "+l"(ksub));
    auto copy_pair_row = [&](int slot, int h, int rw, bool ok) {
        const char* src = ksub + (long long)rw * Shape::KROWB;
        const u32 dst = sK0 + slot * Shape::K_BYTES + dst_lane;
#pragma unroll
        for (int i = 0; i < Shape::KCHUNKS / 2; ++i)
            cp_async16((dst ^ ((u32)(i & 3) << 5)) + h * H_ROWS * 128 + (i >> 2) * (SCORE_TILE * 128), src + i * 32, ok);
    };
    // 16-bit key rows (WHOLE_ROWS), four whole rows per instruction: lane l copies chunk l % 8 of
    // each 128-byte panel of row 4 s + l / 8 of the warp's `rows` rows, which start at dst_warp in a
    // buffer whose panels lie `panel` bytes apart; row: the key row of lane rl's item (-1: none)
    auto copy_whole_rows = [&](u32 dst_warp, int row, int rows, int panel) {
#pragma unroll
        for (int s = 0; s < rows / 4; ++s) {
            const int rl = 4 * s + rq;  // the row among the warp's
            const int rw = __shfl_sync(0xFFFFFFFFu, row, rl);
            const char* src = kbase + (rw >= 0 ? (long long)rw * Shape::KROWB + sub8 * 16 : 0);
            const u32 dst = dst_warp + (u32)(rl * 128) + (u32)((sub8 ^ (rl & 7)) << 4);
#pragma unroll
            for (int p = 0; p < 2; ++p) cp_async16(dst + p * panel, src + p * 128, rw >= 0);
        }
    };
    auto stage = [&](int j, int slot) {
        if constexpr (BULK) {
            // dense fp8 keys: only the key tile (flags and scales come in write_keys); thread 0:
            // rows col0 + n .. of k, those past S left out (no row's candidates, whatever the
            // buffer holds)
            if (tid == 0) {
                const long long start = (long long)col0 + j * SCORE_TILE;
                const long long rows = j < j_stop ? min((long long)SCORE_TILE, (long long)S - start) : 0;
                const u32 bytes = rows > 0 ? (u32)rows * Shape::KROWB : 0u;
                mbar_arm(sBar0 + 8 * slot, bytes);
                if (bytes) bulk_copy(sK0 + slot * Shape::K_BYTES, kbase + start * Shape::KROWB, bytes, sBar0 + 8 * slot);
            }
            return;
        }
        if constexpr (TMAP) {
            // tile j = the union's block j: warp w copies its rows 16 w .. 16 w + 15 of each half
            // (rows past S, of a last partial block, as zeros); the key rows of items that are no
            // row's candidate are copied too, and their keys come out as HISA_KEY_NONE (write_keys_tmap)
            if (j < j_stop) {
                const int first = sUnion[j] * SCORE_TILE;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int rw = first + h * 64 + warp * 16 + pair;
                    copy_pair_row(slot, h, min(rw, S - 1), rw < S);
                }
            }
            cp_async_commit();
            return;
        }
        u32 f[ROWS];
        int col[ROWS];
        int row = -1;
        if (j < j_stop) {
            row = map_item(j * SCORE_TILE + tid, f, col);
        } else {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) f[r] = 0u, col[r] = -1;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            sFlag[(slot * ROWS + r) * SCORE_TILE + tid] = f[r];
            if (UNION) sDst[(slot * ROWS + r) * SCORE_TILE + tid] = col[r];
        }
        if constexpr (WHOLE_ROWS) {
            copy_whole_rows(sK0 + slot * Shape::K_BYTES + (u32)(warp * 32 * 128), row, 32, SCORE_TILE * 128);
        } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rw = __shfl_sync(0xFFFFFFFFu, row, h * 16 + pair);
                copy_pair_row(slot, h, max(rw, 0), rw >= 0);
            }
        }
        if (kscale) cp_async4(smem_addr(sScale + slot * SCORE_TILE + tid), row >= 0 ? kscale + row : kscale, row >= 0);
        cp_async_commit();
    };
    // HALF: tile j's flags (and key scales) into meta slot ms, and its half h's key rows into
    // buffer h (64 rows: each warp copies 16, four whole rows per instruction, as stage does; a
    // row's 8-row swizzle phase is the same in the half as in the tile)
    auto stage_meta = [&](int j, int ms) {
        u32 f[ROWS];
        int col[ROWS];
        const int row = map_item(j * SCORE_TILE + tid, f, col);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) sFlag[(ms * ROWS + r) * SCORE_TILE + tid] = f[r];
        if (kscale) cp_async4(smem_addr(sScale + ms * SCORE_TILE + tid), row >= 0 ? kscale + row : kscale, row >= 0);
    };
    auto stage_half = [&](int j, int h) {
        u32 f[ROWS];
        int col[ROWS];
        const int row = map_item(j * SCORE_TILE + h * 64 + warp * 16 + (lane & 15), f, col);
        copy_whole_rows(sK0 + (u32)(h * KBUF) + (u32)(warp * 16 * 128), row, 16, 64 * 128);
    };
    if constexpr (HALF) {
        stage_meta(j_first, 0);
        stage_half(j_first, 0);
        cp_async_commit();
    } else {
#pragma unroll
        for (int s = 0; s < NBUF - 1; ++s) stage(j_first + s, s);
    }

    // the other paths convert their prefetched q into the operand rows r * H + h while the first
    // key tiles' copies are in flight (ncu, block scores at 128K/4096, before any prefetch: the
    // chunk-at-a-time staging loop held a quarter of the kernel's stall samples), then fence
    if constexpr (PREFETCH) {
#pragma unroll
        for (int it = 0; it < QITERS; ++it) q_store(it, qraw[it]);
        fence_async_smem();
    }

    // one accumulator set per 64-item half: with both operands in shared memory both halves are
    // in flight at once (the epilogue of the first overlaps the MMA of the second); the
    // register-A path runs them one after the other with one set (its A fragments take the
    // registers, and three CTAs per SM overlap each other's epilogues instead)
    float acc[2][N / 2];
    // head sums of one half (wgmma_head_sums)
    auto head_sums = [&](const float (&a)[N / 2], float (&sum)[ROWS][2]) { wgmma_head_sums<N, H, ROWS>(a, wt, sum); };
    // ranking keys of one tile: lane 4 g + x writes item (x / 2) * 64 + 16 warp + g + 8 (x % 2)
    const int key_item = ((lane & 3) >> 1) * 64 + warp * 16 + (lane >> 2) + 8 * (lane & 1);
    // dense fp8 keys: the scale of the lane's item of tile j (write_keys), loaded before the tile's
    // MMAs so that they hide its latency
    auto item_scale = [&](int j) {
        const int n = min(j * SCORE_TILE + key_item, nitems - 1);
        return kscale ? kscale[col0 + n] : 1.0f;
    };
    auto write_keys = [&](const float (&s0)[ROWS][2], const float (&s1)[ROWS][2], int n0, int slot, float sc_bulk = 1.0f) {
        const int x = lane & 3;
        const int item = key_item;
        // dense fp8 keys (BULK): flags from the rows' key ranges, the scale prefetched (item_scale);
        // the other paths read both from the tile's staging
        const float sc = BULK ? sc_bulk : kscale ? sScale[slot * SCORE_TILE + item] : 1.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float v = x == 0 ? s0[r][0] : x == 1 ? s0[r][1] : x == 2 ? s1[r][0] : s1[r][1];
            const int col = UNION ? sDst[(slot * ROWS + r) * SCORE_TILE + item] : n0 + item;
            const int s = col0 + col;
            const u32 flag = BULK ? (s >= rr[r].ks && s < rr[r].ke ? 1u : 0u) : sFlag[(slot * ROWS + r) * SCORE_TILE + item];
            if constexpr (APPEND) {
                const u32 key = item_key(flag, v, kscale != nullptr, sc);
                const bool pass = col < nitems && key >= app_thr[r];
                const unsigned bal = __ballot_sync(0xFFFFFFFFu, pass);
                if (bal != 0u) {  // warp-uniform; inside the list (append_flush)
                    if (pass) app_list[r * APPEND_WCAP + app_n[r] + __popc(bal & lanes_below)] = make_uint2(key, (u32)col);
                    app_n[r] += __popc(bal);
                }
            } else if constexpr (!DENSE) {
                // item_key's value by selects and one predicated store: nvcc branched on the flag
                // and around the store (~25 instructions per row and item). Dense keeps the plain
                // form: its score kernels' SASS stays as measured (they react to any change here)
                const u32 scored = score_key(kscale != nullptr ? v * sc : v);
                const u32 key = flag == 2u ? HISA_KEY_FORCED : flag == 1u ? scored : HISA_KEY_NONE;
                const bool in = UNION ? col >= 0 : col < nitems;
                store_if(reinterpret_cast<int*>(orow(r)) + (UNION ? max(col, 0) : in ? col : 0), (int)key, live[r] && in);
            } else {
                if (live[r] && col < nitems) orow(r)[col] = item_key(flag, v, kscale != nullptr, sc);
            }
        }
    };
    // TMAP's keys of tile j = union block j (idx[r]: the block's index in row r's list, >= 0 for
    // every row the tile is scored for): row r's column idx[r] B + item, its flag from the row's
    // key range (in sScan as ks and ke - ks, one unsigned compare: read by broadcast, not held in
    // registers across the MMAs); only >= 0: a
    // tile of that row's blocks alone (a constant: the other row's stores fold away; it has no
    // column for this block)
    // key_out[r]: row r's output at column key_item, once per CTA (the asm hides how it was made,
    // so that each tile's store address is one IMAD.WIDE from it: nvcc otherwise rebuilt it from
    // the row's offset per tile, 5 instructions a row)
    int* key_out[ROWS] = {};
    if constexpr (TMAP) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            key_out[r] = reinterpret_cast<int*>(orow(r)) + key_item;
            asm("" : "+l"(key_out[r]));
        }
    }
    auto write_keys_tmap = [&](const float (&s0)[ROWS][2], const float (&s1)[ROWS][2], int j,
                               const int (&idx)[ROWS], float sc, int only) {
        const int item = key_item;
        const int s = sUnion[j] * SCORE_TILE + item;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (only >= 0 && r != only) continue;
            const float v = quad_reduce_scatter(s0[r], s1[r], lane);  // s0 / s1 unreduced (TMAP)
            const u32 scored = score_key(kscale != nullptr ? v * sc : v);
            const int2 range = reinterpret_cast<const int2*>(sScan)[r];  // ks, ke - ks
            const u32 key = (u32)(s - range.x) < (u32)range.y ? scored : HISA_KEY_NONE;
            store_if(key_out[r] + (unsigned long long)max(idx[r], 0) * SCORE_TILE, (int)key, live[r] && idx[r] >= 0);
        }
    };
    // descriptors are computed once: k-step, half and buffer offsets are added to the start
    // address field (address / 16)
    const u32 q_lo = wgmma_desc_lo(smem_addr(sQ));
    const u32 k_lo = wgmma_desc_lo(sK0);
    auto issue = [&](float (&a)[N / 2], int slot, int half) {
        const u32 kt = k_lo + (u32)(slot * (Shape::K_BYTES >> 4));
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            Wgmma<ENGINE, N>::run(a, kt + (u32)(((kk >> 2) * (SCORE_TILE * 128) + half * 64 * 128 + (kk & 3) * 32) >> 4),
                                  q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4), kk);
        wgmma_commit();
    };
    // register-A path (FP8A): the thread's A fragments of one 64-item half (fp8a_fragments)
    auto load_a = [&](u32 (&af)[KSTEPS][4], int slot, int half) {
        if constexpr (Shape::FP8A) fp8a_fragments<BULK>(sK + slot * Shape::K_BYTES, half, warp, lane, af);
    };
    auto issue_rs = [&](float (&a)[N / 2], const u32 (&af)[KSTEPS][4]) {
        wgmma_fence();  // the A registers were just written
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            WgmmaRS<N>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4), kk);
        wgmma_commit();
    };
    // the register-A path's tile of all ROWS rows (A fragments of half 0 loaded): one N group
    // per half, the halves one after the other (three CTAs per SM overlap each other's epilogues)
    auto fp8a_tile = [&](u32 (&af)[KSTEPS][4], int j, int slot, int next, float (&s0)[ROWS][2],
                         float (&s1)[ROWS][2]) {
        issue_rs(acc[0], af);
        stage(j + NBUF - 1, next);
        wgmma_wait<0>();
        wgmma_fence_operands(acc[0]);
        // dense and TMAP: the first half's relus against -0 (relu_nz), so that ptxas sees other
        // instructions than the second half's, which read the same accumulator registers: in this
        // form of the dense loop it merged them (bench/NOTES.md, session 24), and of TMAP's it
        // dropped 32 (session 53; tests/test_sass.py). TMAP keeps each lane's sums unreduced, for
        // quad_reduce_scatter (write_keys_tmap)
        wgmma_head_sums<N, H, ROWS, BULK || TMAP, !TMAP>(acc[0], wt, s0);
        load_a(af, slot, 1);
        issue_rs(acc[0], af);
        wgmma_wait<0>();
        wgmma_fence_operands(acc[0]);
        wgmma_head_sums<N, H, ROWS, false, !TMAP>(acc[0], wt, s1);
    };
    // The union path's MMAs for one query row (SPLIT_ROWS, tiles of one row's blocks): one commit
    // group of N = H, B = that row's H operand rows of q (H * 128 bytes into each 128-byte panel:
    // a multiple of the 1024-byte swizzle pattern, so the descriptor's phase is unchanged). Per
    // (item, head) the products and their sum are those of the N = 128 instruction (and of the
    // one-row refine kernel, whose N is H): only which MMA computes a column changes.
    auto issue_rs_row = [&](float (&a)[H / 2], const u32 (&af)[KSTEPS][4], int r) {
        wgmma_fence();  // the A registers were just written, or a was just read
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            WgmmaRS<H>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + r * H * 128 + (kk & 3) * 32) >> 4), kk);
        wgmma_commit();
    };
    // head sums of one query row r of one half from its own accumulators (SPLIT_ROWS): the same
    // FMA chains, in the same order, as head_sums' row r (columns 8 i' + ..., i' = i + r H / 8)
    auto row_sums = [&](const float (&a)[H / 2], int r, float (&sum)[2]) {
        float p[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int i = 0; i < H / 8; ++i)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                p[e][0] = fmaf(wt[r * (H / 8) + i][0], relu(a[4 * i + 2 * e]), p[e][0]);
                p[e][1] = fmaf(wt[r * (H / 8) + i][1], relu(a[4 * i + 2 * e + 1]), p[e][1]);
            }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float v = p[e][0] + p[e][1];
            if constexpr (!TMAP) {  // TMAP: unreduced, for quad_reduce_scatter
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
            }
            sum[e] = v;
        }
    };

    // both operands in shared memory: a tile's two halves' MMAs (buffer buf), then tile j_next's
    // copies into buffer next_buf, then each half's head sums once its MMAs are done
    auto ss_mmas = [&](int buf, int j_next, int next_buf, float (&s0)[ROWS][2], float (&s1)[ROWS][2]) {
        wgmma_fence();
        issue(acc[0], buf, 0);
        issue(acc[1], buf, 1);
        stage(j_next, next_buf);
        wgmma_wait<1>();
        wgmma_fence_operands(acc[0]);
        head_sums(acc[0], s0);
        wgmma_wait<0>();
        wgmma_fence_operands(acc[1]);
        head_sums(acc[1], s1);
    };

    int slot = 0;
    u32 phases = 0;  // BULK: bit s = parity of buffer s's next completion
    if constexpr (SPLIT_ROWS) {
        // the union's tiles in three runs: blocks of both rows, of row 0 only, of row 1 only
        // (split_runs). One tile: only = -1 takes both rows, one N = 2H group per half as on the
        // other paths; only = r takes only row r's MMAs, two N = H groups, the first half's head
        // sums under the second half's MMA. The three calls pass constants and the inlined body
        // folds them: straight-line code, no MMA under a branch, no indexed weights (ptxas: 168
        // registers, no serialisation). Splitting the two-row tiles per row as well (four N = H
        // groups) measured slower: bench/NOTES.md, 312882e.
        auto tile = [&](int j, int only) {
            cp_async_wait<NBUF - 2>();  // no proxy fence: register A (see the loop below)
            // TMAP: each warp reads only the key rows it copied (stage), so its lanes' copies are
            // all it waits for; elsewhere every warp's
            if constexpr (TMAP) __syncwarp(); else __syncthreads();
            int next = slot + NBUF - 1;
            if (next >= NBUF) next -= NBUF;
            float s0[ROWS][2] = {}, s1[ROWS][2] = {};
            u32 af[KSTEPS][4];
            float a0[H / 2], a1[H / 2];
            // TMAP: the key scale of the lane's item (write_keys_tmap), loaded before the MMAs so
            // that they hide its latency (the last block's rows past S take row S - 1's)
            float sc = 1.0f;
            if (TMAP && kscale) sc = kscale[min(sUnion[j] * SCORE_TILE + key_item, S - 1)];
            load_a(af, slot, 0);
            if (only < 0) {  // both rows: one N = 2H group per half, as on the other paths
                fp8a_tile(af, j, slot, next, s0, s1);
            } else {
                issue_rs_row(a0, af, only);
                stage(j + NBUF - 1, next);
                wgmma_wait<0>();
                wgmma_fence_operands(a0);
                load_a(af, slot, 1);
                issue_rs_row(a1, af, only);
                row_sums(a0, only, s0[only]);
                wgmma_wait<0>();
                wgmma_fence_operands(a1);
                row_sums(a1, only, s1[only]);
            }
            if constexpr (TMAP) {
                // the block's index in each row's list, read after the MMAs (read before them,
                // ptxas spilled: bench/NOTES.md, session 53)
                const int2 both = reinterpret_cast<const int2*>(sUnion + 2 * m)[j];
                const int idx[ROWS] = {only == 1 ? -1 : both.x, only == 0 ? -1 : both.y};
                write_keys_tmap(s0, s1, j, idx, sc, only);
            } else {
                write_keys(s0, s1, j * SCORE_TILE, slot);
            }
            slot = slot + 1 == NBUF ? 0 : slot + 1;
        };
        if constexpr (TMAP) __syncthreads();  // q staged by every warp (the tiles have no CTA barrier)
        for (int j = j_first; j < min(j_stop, split_runs[0]); ++j) tile(j, -1);
        for (int j = max(j_first, split_runs[0]); j < min(j_stop, split_runs[1]); ++j) tile(j, 0);
        for (int j = max(j_first, split_runs[1]); j < j_stop; ++j) tile(j, 1);
    } else if constexpr (HALF) {
        // one accumulator set, the halves one after the other: half 1's copy runs under half 0's
        // MMAs and head sums, and the next tile's half 0 under half 1's (one barrier per half:
        // its copy has landed, and every warp's MMAs on the other buffer are done). Each half's
        // descriptors are its buffer's base plus constants
        auto issue_half = [&](float (&a)[N / 2], int h) {
            const u32 kt = k_lo + (u32)(h * (KBUF >> 4));
            wgmma_fence();  // a was just read (the head sums of the other half)
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
                Wgmma<ENGINE, N>::run(a, kt + (u32)(((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4),
                                      q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4), kk);
            wgmma_commit();
        };
        for (int j = j_first; j < j_stop; ++j) {
            const int ms = (j - j_first) & 1;  // tile j's meta slot
            cp_async_wait<0>();  // half 0 of tile j (and its scales) has landed
            fence_async_smem();
            // ... for every thread; and every warp is done with buffer 1 (tile j - 1's half 1)
            // and with meta slot 1 - ms (tile j - 1's keys)
            __syncthreads();
            stage_half(j, 1);
            cp_async_commit();
            float s0[ROWS][2], s1[ROWS][2];
            issue_half(acc[0], 0);
            wgmma_wait<0>();
            wgmma_fence_operands(acc[0]);
            head_sums(acc[0], s0);
            cp_async_wait<0>();  // half 1 has landed
            fence_async_smem();
            __syncthreads();  // ... for every thread; every warp's MMAs on buffer 0 are done
            if (j + 1 < j_stop) {
                stage_meta(j + 1, 1 - ms);
                stage_half(j + 1, 0);
            }
            cp_async_commit();
            issue_half(acc[0], 1);
            wgmma_wait<0>();
            wgmma_fence_operands(acc[0]);
            head_sums(acc[0], s1);
            write_keys(s0, s1, j * SCORE_TILE, ms);
        }
    } else if constexpr (ITEMS == ITEMS_BLOCKS && !Shape::FP8A && NBUF == 2) {
        // block scores (both operands in shared memory, two buffers): two tiles per iteration,
        // the first in buffer 0 and the second in buffer 1 (tile j_first + i in buffer i % 2), so
        // every descriptor is the tile base plus a constant
        auto ss_tile = [&](int j, int buf) {  // buf: a constant at each (inlined) call
            cp_async_wait<0>();  // tile j has landed
            fence_async_smem();
            // the barrier also retires every thread's epilogue of tile j - 1, freeing its buffer
            __syncthreads();
            float s0[ROWS][2], s1[ROWS][2];
            ss_mmas(buf, j + 1, 1 - buf, s0, s1);
            write_keys(s0, s1, j * SCORE_TILE, buf);
        };
        int j = j_first;
        for (; j + 1 < j_stop; j += 2) {
            ss_tile(j, 0);
            ss_tile(j + 1, 1);
        }
        if (j < j_stop) ss_tile(j, 0);
    } else {
        for (int j = j_first; j < j_stop; ++j) {
            cp_async_wait<NBUF - 2>();  // tile j has landed (only the NBUF - 2 newest groups may pend)
            if constexpr (BULK) {
                mbar_wait(sBar0 + 8 * slot, (phases >> slot) & 1u);
                phases ^= 1u << slot;
            }
            // the MMAs read the key tile through the async proxy only where both operands are in
            // shared memory (the register-A path reads it with ordinary loads, and q was fenced once)
            if constexpr (!Shape::FP8A) fence_async_smem();
            // the barrier also retires every thread's epilogue of tile j - 1, freeing its buffer
            __syncthreads();
            if constexpr (APPEND) append_flush(APPEND_WCAP - 32);
            const int n0 = j * SCORE_TILE;
            int next = slot + NBUF - 1;
            if (next >= NBUF) next -= NBUF;
            float s0[ROWS][2], s1[ROWS][2];
            float sc = 1.0f;
            if constexpr (BULK) sc = item_scale(j);
            if constexpr (Shape::FP8A) {
                u32 af[KSTEPS][4];
                load_a(af, slot, 0);
                fp8a_tile(af, j, slot, next, s0, s1);
            } else {
                ss_mmas(slot, j + NBUF - 1, next, s0, s1);
            }
            write_keys(s0, s1, n0, slot, sc);
            slot = slot + 1 == NBUF ? 0 : slot + 1;
        }
    }
    cp_async_wait<0>();
    if constexpr (APPEND) append_flush(0);  // the warp's lists out
#endif
}
