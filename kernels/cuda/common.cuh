// common.cuh — device helpers shared by every hisa_cupy stage.
//
// No CUDA headers are included on purpose: NVRTC (CuPy) and nvcc both compile this file as is,
// and fp8 / bf16 / fp16 are handled as raw bit patterns (the physical dtypes of
// docs/internals.md: uint8 = float8_e4m3fn, uint16 = bfloat16).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Programmatic dependent launch (sm_90 and later; cupy_backend.USE_PDL): the host launches a
// call's kernels with the programmatic-serialization attribute. A kernel calls this before it
// reads anything an earlier kernel of the stream writes, and before it writes anything: it waits
// until the grids it depends on have completed and their writes are visible (so it sees exactly
// what stream order gives it, and nothing it writes can race a reader before it). Most kernels
// call it first; the wgmma score tiles of the block scores and the refinement (score_wgmma.cuh)
// call it after their q and head-weight loads, which read only the call's inputs. A no-op for a
// launch without the attribute, and below sm_90.
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// A pointer to a call's input whose loads are to be issued before the kernel waits (a
// grid_dependency_sync after them): ptxas moves read-only loads (ld.global.nc, which nvcc emits
// for a __restrict__ const pointer) past griddepcontrol.wait and keeps plain ones before it. The
// opaque move hides where p came from, so its loads are plain ones.
template <typename V>
__device__ __forceinline__ const V* early_loads(const V* p) {
    asm("mov.b64 %0, %0;" : "+l"(p));
    return p;
}

// An early trigger: the next kernel is launched now rather than when this grid's CTAs have all
// exited, and its CTAs wait in grid_dependency_sync on SMs this one leaves free. Triggered by
// every kernel at its start, the dependents' CTAs took SM room as the first CTAs left and sat
// there packed, and the latency-bound selects after a big kernel got slower (the filtered top-k's
// 64 CTAs 2-3 to an SM: 11 -> 19 us, bench/NOTES.md, session 17). Two one-wave kernels trigger at
// their start: row_filter.cuh's filtered select (when its launch is a single wave; its dependent
// the rescue) and pool_vec_kernel (the block scores' CTAs that fit beside it load q meanwhile and
// start as it ends: -0.6 to -2.3 us per hisa call on an H200, session 37; pool_kernel, the other
// layouts' pool, does not). The block top-m triggers where the host asks (`early`:
// cupy_backend.TOPM_TRIGGER_WAVES, by the union launch's waves): the union CTAs placed beside it
// made a call 2-3 us shorter where that launch has 5.9 waves (T = 4096), and 1-5 us longer where
// it has 2-3.9 (sessions 37-38). A trigger follows its kernel's own grid_dependency_sync, so
// everything before it in the stream is complete when a dependent's CTA starts. A no-op as above.
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Hand-over of one kernel's output to a kernel running beside it (the union kernel's pairs to the
// refine top-k, refine.cu): the writer's CTA syncs, then one thread publishes a flag with a
// release store at GPU scope (ordered after every thread's writes by the barrier); the reader
// spins on the flag with acquire loads, then syncs its CTA, and reads the data with coherent
// (weak) loads, never ld.global.nc, whose cache the data may have changed under.
__device__ __forceinline__ void st_release_gpu(unsigned* p, unsigned v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// ----------------------------------------------------------------------------------------------
// Scalar decoders (exact) and encoders (round to nearest even).

__device__ __forceinline__ float e4m3_to_f32(u32 v) {
    const u32 sign = (v & 0x80u) << 24;
    const u32 e = (v >> 3) & 0xFu;
    const u32 m = v & 7u;
    if (e == 0xFu && m == 7u) return __uint_as_float(sign | 0x7FC00000u);  // NaN (no inf in e4m3fn)
    if (e == 0u) {                                                          // subnormal: m * 2^-9
        const float mag = (float)m * 0.001953125f;
        return sign ? -mag : mag;
    }
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

// The hardware e4m3 -> f16 conversion (sm_89 and later; exact: every e4m3 value, NaN included, is
// an f16 value): two e4m3 values, the low (HALF = 0) or high (HALF = 1) two bytes of v, low byte
// first, as f16x2.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define HISA_HAS_CVT_E4M3 1
template <int HALF>
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 v) {
    static_assert(HALF == 0 || HALF == 1, "HALF: the low or high two bytes");
    u32 r;
    asm("{\n.reg .b16 b0, b1;\nmov.b32 {b0, b1}, %1;\ncvt.rn.f16x2.e4m3x2 %0, b%2;\n}\n" : "=r"(r) : "r"(v), "n"(HALF));
    return r;
}
#else
#define HISA_HAS_CVT_E4M3 0
#endif

__device__ __forceinline__ float bf16_to_f32(u32 v) { return __uint_as_float(v << 16); }

__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u16 f32_to_bf16_rne(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// float -> e4m3fn, round to nearest even, saturating to +-448 (NaN stays NaN).
__device__ __forceinline__ u8 f32_to_e4m3_satfinite(float x) {
    const u32 u = __float_as_uint(x);
    const u32 sign = (u >> 24) & 0x80u;
    if (x != x) return (u8)(sign | 0x7Fu);
    const float a = fabsf(x);
    if (a >= 448.0f) return (u8)(sign | 0x7Eu);
    if (a < 0.015625f) {  // below the smallest normal 2^-6: multiples of 2^-9, code = m (m = 8 is 2^-6)
        const int m = __float2int_rn(a * 512.0f);
        return (u8)(sign | (u32)m);
    }
    const int e = (int)((u >> 23) & 0xFFu) - 127;  // in [-6, 8]
    const u32 mant = u & 0x7FFFFFu;
    u32 keep = mant >> 20;
    const u32 rem = mant & 0xFFFFFu;
    if (rem > 0x80000u || (rem == 0x80000u && (keep & 1u))) keep += 1u;
    u32 code = ((u32)(e + 7) << 3) + keep;  // a mantissa carry bumps the exponent
    if (code > 0x7Eu) code = 0x7Eu;
    return (u8)(sign | code);
}

// ----------------------------------------------------------------------------------------------
// Ranking key (docs/internals.md): larger key ranks higher; NaN -> 1; -0.0 == +0.0;
// 0 = not a candidate; 0xFFFFFFFF = forced block.

#define HISA_KEY_NONE 0u
#define HISA_KEY_NAN 1u
#define HISA_KEY_FORCED 0xFFFFFFFFu
#define HISA_KEY_NEG_INF 0x007FFFFFu  // score_key(-inf): the lowest key of a number
#define HISA_KEY_ZERO 0x80000000u     // score_key(-0.0) == score_key(+0.0)

// The key map, in two instruction forms that give the same key for every fp32 bit pattern (the
// topk tests' bit-pattern rows -- NaNs, zeros of both signs, subnormals, infinities -- check
// loaded_score_key against the reference). Two, because each is faster where the other is slower
// (bench/NOTES.md, session 44):
//  * score_key, compare and select (ISETP, SEL, SHF, LOP3, FSETP, SEL): the score kernels' epilogues
//    (score_tile.cuh, score_wgmma.cuh), where the add form made dense 128K/4096 1.9-2.5% slower.
//  * loaded_score_key, five instructions (FSETP, FADD, SHF, LOP3, SEL): the selects' fp32 words
//    (row_select.cuh, row_filter.cuh), where it made topk [4096 x 8192] 2.0% faster.

// Both forms' end: the bits u of a score whose -0 became +0 -> its key (negatives flipped (~u),
// positives offset (u | sign bit)), or HISA_KEY_NAN where the score is a NaN
__device__ __forceinline__ u32 key_of_plus_zero_bits(u32 u, bool nan) {
    const u32 key = u ^ ((u32)((int)u >> 31) | 0x80000000u);
    return nan ? HISA_KEY_NAN : key;
}

__device__ __forceinline__ u32 score_key(float f) {
    // branch-free: -0 -> +0 by a compare and a select
    u32 u = __float_as_uint(f);
    u = u == 0x80000000u ? 0u : u;
    return key_of_plus_zero_bits(u, f != f);
}

__device__ __forceinline__ u32 loaded_score_key(float f) {
    // f + 0 turns -0 into +0 in round-to-nearest and leaves every other number as it is (inline
    // PTX without .ftz, so subnormals stay whatever -ftz the build uses)
    float z;
    asm("add.rn.f32 %0, %1, 0f00000000;" : "=f"(z) : "f"(f));
    const u32 u = __float_as_uint(z);
    return key_of_plus_zero_bits(u, f != f);
}

// score_key's order-preserving map undone: the bits of the fp32 score whose key is `key`. The
// zeros' shared key gives +0, and a key below that of -inf (NaN's among them) a NaN pattern.
__device__ __forceinline__ u32 score_key_bits(u32 key) { return key >= 0x80000000u ? key ^ 0x80000000u : ~key; }

// ----------------------------------------------------------------------------------------------
// Division by a run-time divisor d >= 1 without the integer-division sequence: q = hi32(n * m)
// with m = ceil(2^32 / d) is floor(n / d) or one above it for every 32-bit n (the error term
// n * (m - 2^32 / d) / 2^32 is below 1), and one multiply-compare fixes the second case.

struct FastDiv {
    u32 d, magic;
    __device__ __forceinline__ explicit FastDiv(int dv)
        : d((u32)dv), magic(dv > 1 ? (u32)((0x100000000ull + (u32)dv - 1u) / (u32)dv) : 0u) {}
    __device__ __forceinline__ u32 div(u32 n) const {
        if (d == 1u) return n;
        u32 q = __umulhi(n, magic);
        if (q * d > n) --q;  // q * d <= n + d: no overflow for n, d < 2^31
        return q;
    }
};

// ----------------------------------------------------------------------------------------------
// Row ranges: query t sees [ks[t], ke[t]) clamped into [0, S]; no ks/ke means the T queries are
// the last T positions of one causal sequence of length S.

struct RowRange {
    int ks;
    int ke;
};

__device__ __forceinline__ int clamp_pos(long long v, int S) {
    return (int)(v < 0 ? 0 : (v > S ? S : v));
}

__device__ __forceinline__ RowRange row_range(const int* ks, const int* ke, int t, int T, int S) {
    RowRange r;
    if (ks != nullptr) {
        r.ks = clamp_pos(ks[t], S);
        r.ke = clamp_pos(ke[t], S);
    } else {
        r.ks = 0;
        r.ke = clamp_pos((long long)S - T + t + 1, S);
    }
    return r;
}

// ----------------------------------------------------------------------------------------------
// Tensor-core primitives (mma.sync + ldmatrix). The fp8 form needs sm_89+; the library only
// dispatches it there, other targets get a trap so that every source compiles for sm_80.

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// the 32-bit word at shared-memory address `addr` (loops over shared memory that nvcc would
// otherwise step with 64-bit generic pointers: a wide add and compare per iteration)
__device__ __forceinline__ u32 lds_u32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// *p = v where pred, as one predicated store: nvcc branched around such stores (the register
// select's in-order emit, the union kernel's and the block scores' keys), re-deriving the address
// inside every branch
__device__ __forceinline__ void store_if(int* p, int v, bool pred) {
    asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.u32 q, %2, 0;\n\t@q st.global.b32 [%0], %1;\n\t}" ::"l"(p), "r"(v),
                 "r"((unsigned)pred)
                 : "memory");
}

// asynchronous global -> shared copies (sm_80+): 16 or 4 bytes, zero-filled when !valid
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_e4m3(float* c, const u32* a, const u32* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// Pairs of rows on the union path: the union of the two rows' block lists, merged once per pair by
// the block top-m (row_select_warp, where it runs in warp mode) instead of by each of the pair's
// union CTAs. Pair p (rows 2p and 2p + 1) has a record of pair_record_ints(m) ints at p *
// pair_record_ints(m): PAIR_RECORD_HEAD ints (row 0's list length, row 1's, the blocks in both,
// unused), then the union's 2m blocks, then for each of them its index in row 0's list and in row 1's
// list (-1: not there) side by side (2m pairs: one 8-byte load gives a block's both), in the union
// kernel's order (score_wgmma.cuh, score_tile_wgmma).
#define PAIR_RECORD_HEAD 4
__host__ __device__ __forceinline__ long long pair_record_ints(int m) { return PAIR_RECORD_HEAD + 6LL * m; }
