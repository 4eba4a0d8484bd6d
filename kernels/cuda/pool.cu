// pool.cu — stage 1a: mean-pooled keys per block (SPEC §5.2).
//
// One CTA per block b: pooled[b, d] = (sum over the block's tokens of k[s, d] * k_scale[s]) /
// count in fp32, stored as fp32, bf16 (round to nearest even) or e4m3 with a per-block scale
// max(amax / 448, 1e-10) (NaN propagates). Two kernels (cupy_backend.POOL_VEC):
// * pool_vec_kernel: 128 threads read the block's rows as 16-byte vectors, every load of the
//   block in flight at once (thread i: vector i % V of tokens i / V, + G, ...), partial sums per
//   token group, then the groups added in group order per dimension. The order of the sum differs
//   from the token order, which SPEC §9 allows (exact inputs: every order gives the same sum).
//   Rows of D * EB bytes, a multiple of 16, 16-byte aligned; D <= 128. Instances with D fixed at
//   compile time (DFIX; cupy_backend.POOL_FIXED) take the same sums in the same order.
// * pool_kernel: one thread per dimension, the sum in token order, loads batched BATCH tokens at
//   a time so that they overlap (cupy_backend.POOL_BATCH); any D, any alignment.
#include "common.cuh"
#include "score_tile.cuh"

#define POOL_F32 0
#define POOL_BF16 1
#define POOL_E4M3 2

// element i of a key array: its raw bits, then their value (separate, so that a batch of loads is
// issued before the decoders' branches)
template <int KDT>
__device__ __forceinline__ u32 load_bits(const void* p, long long i) {
    if (KDT == DT_E4M3) return reinterpret_cast<const u8*>(p)[i];
    if (KDT == DT_BF16 || KDT == DT_F16) return reinterpret_cast<const u16*>(p)[i];
    return reinterpret_cast<const u32*>(p)[i];
}
template <int KDT>
__device__ __forceinline__ float bits_value(u32 v) {
    if (KDT == DT_E4M3) return e4m3_to_f32(v);
    if (KDT == DT_BF16) return bf16_to_f32(v);
    if (KDT == DT_F16) return f16_to_f32((u16)v);
    return __uint_as_float(v);
}

// the pooled value of dimension d (< D; threads past D take part in the e4m3 block's amax with 0)
// of block b from its sum over n tokens; every thread of the CTA calls it (a barrier for e4m3)
template <int POOL>
__device__ __forceinline__ void pool_store(float n, float sum, int d, int D, int b, void* __restrict__ pooled,
                                           float* __restrict__ pscale, float* sAmax) {
    const float mean = sum / n;
    const long long o = (long long)b * D + d;
    if (POOL == POOL_F32) {
        if (d < D) reinterpret_cast<float*>(pooled)[o] = mean;
    } else if (POOL == POOL_BF16) {
        if (d < D) reinterpret_cast<u16*>(pooled)[o] = f32_to_bf16_rne(mean);
    } else {
        float a = d < D ? fabsf(mean) : 0.0f;
        // max that propagates NaN, like numpy's max
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float y = __shfl_xor_sync(0xFFFFFFFFu, a, off);
            a = (y != y || y > a) ? y : a;
        }
        if ((d & 31) == 0) sAmax[d >> 5] = a;
        __syncthreads();
        float amax = sAmax[0];
        for (int w = 1; w < (int)((blockDim.x + 31) >> 5); ++w) {
            const float y = sAmax[w];
            amax = (y != y || y > amax) ? y : amax;
        }
        float scale = amax / 448.0f;
        if (!(scale != scale)) scale = fmaxf(scale, 1e-10f);
        if (d < D) reinterpret_cast<u8*>(pooled)[o] = f32_to_e4m3_satfinite(mean / scale);
        if (d == 0) pscale[b] = scale;
    }
}

template <int KDT, int POOL, int BATCH>
__global__ void __launch_bounds__(256) pool_kernel(const void* __restrict__ k, const float* __restrict__ kscale,
                                                   int S, int D, int B, void* __restrict__ pooled,
                                                   float* __restrict__ pscale) {
    grid_dependency_sync();
    __shared__ float sAmax[32];
    const int b = blockIdx.x, d = threadIdx.x;
    const int s0 = b * B, s1 = min(s0 + B, S);
    float sum = 0.0f;
    if (d < D) {
        // BATCH tokens' loads in flight at once, then summed in token order
        int s = s0;
        for (; s + BATCH <= s1; s += BATCH) {
            u32 bits[BATCH];
            float c[BATCH];
#pragma unroll
            for (int i = 0; i < BATCH; ++i) {
                bits[i] = load_bits<KDT>(k, (long long)(s + i) * D + d);
                c[i] = kscale ? kscale[s + i] : 1.0f;
            }
#pragma unroll
            for (int i = 0; i < BATCH; ++i) {
                const float v = bits_value<KDT>(bits[i]);
                sum += kscale ? v * c[i] : v;
            }
        }
        for (; s < s1; ++s) {
            const float v = bits_value<KDT>(load_bits<KDT>(k, (long long)s * D + d));
            sum += kscale ? v * kscale[s] : v;
        }
    }
    pool_store<POOL>((float)(s1 - s0), sum, d, D, b, pooled, pscale, sAmax);
}

#define POOL_VEC_THREADS 128

// the VE elements of a 16-byte vector of KDT values, as fp32 (each element's bits, bits_value)
template <int KDT, int VE>
__device__ __forceinline__ void vec_values(const uint4& x, float (&f)[VE]) {
    constexpr int PER = VE / 4, WIDTH = 32 / PER;  // elements per 32-bit word, their bits
    const u32 w[4] = {x.x, x.y, x.z, x.w};
    if constexpr (KDT == DT_E4M3 && HISA_HAS_CVT_E4M3) {  // the hardware conversion, two at a time (exact)
#if HISA_HAS_CVT_E4M3
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 h[2] = {e4m3x2_to_f16x2<0>(w[i]), e4m3x2_to_f16x2<1>(w[i])};
#pragma unroll
            for (int e = 0; e < 4; ++e) f[4 * i + e] = f16_to_f32((u16)(h[e >> 1] >> (16 * (e & 1))));
        }
#endif
    } else {
#pragma unroll
        for (int e = 0; e < VE; ++e) {
            const u32 word = w[e / PER];
            f[e] = bits_value<KDT>(PER == 1 ? word : (word >> (WIDTH * (e % PER))) & ((1u << (WIDTH % 32)) - 1u));
        }
    }
}

// One round of pool_vec_kernel's loop: tokens s, s + G, ..., s + (U - 1) G of a thread's group
// (U loads in flight, then their sums into part, in token order); tokens at or past s1 are skipped.
template <int KDT, int VE, int U>
__device__ __forceinline__ void pool_vec_round(const uint4* rows, const float* __restrict__ kscale, int s, int s1,
                                               int G, int V, int v, float (&part)[VE]) {
    uint4 x[U];
    float c[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int t = s + u * G;
        const bool in = t < s1;
        x[u] = in ? __ldg(rows + (long long)t * V + v) : make_uint4(0u, 0u, 0u, 0u);
        c[u] = in ? (kscale ? __ldg(kscale + t) : 1.0f) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (s + u * G < s1) {
            float f[VE];
            vec_values<KDT, VE>(x[u], f);
#pragma unroll
            for (int e = 0; e < VE; ++e) part[e] += kscale ? f[e] * c[u] : f[e];
        }
    }
}

// DFIX (0: as given at run time): D fixed at compile time (cupy_backend._pool_plan passes 128
// where D is 128), so that the vector and group indices, the row addresses and the groups' sum are
// constants or unrolled: 10.6 -> 7.7 us at 128K keys on an H200, where the index, address and
// guard work had been over half of the kernel's instructions (bench/NOTES.md, session 35). B fixed
// as well (128: a whole block's rounds unguarded, a second copy of the loop) was no faster (7.85 us)
template <int KDT, int POOL, int DFIX = 0>
__global__ void __launch_bounds__(POOL_VEC_THREADS, 8) pool_vec_kernel(const void* __restrict__ k,
                                                                   const float* __restrict__ kscale, int S, int D_arg,
                                                                   int B, void* __restrict__ pooled,
                                                                   float* __restrict__ pscale) {
    grid_dependency_sync();
    grid_dependents_launch();  // the block scores' CTAs load q while this one wave runs
    const int D = DFIX ? DFIX : D_arg;
    constexpr int EB = KDT == DT_E4M3 ? 1 : (KDT == DT_F32 ? 4 : 2);
    constexpr int VE = 16 / EB;  // elements per vector
    constexpr int U = EB == 1 ? 4 : 8;  // tokens a thread loads before it adds them (64 registers)
    __shared__ float sPart[POOL_VEC_THREADS * 16];  // [group][D] partial sums (G * D <= 128 * 16)
    __shared__ float sAmax[32];
    const int tid = threadIdx.x, b = blockIdx.x;
    const int s0 = b * B, s1 = min(s0 + B, S);
    const int V = D / VE;  // vectors per token row
    const int G = POOL_VEC_THREADS / V;  // token groups: group g takes tokens s0 + g, + G, ...
    const int v = tid % V, g = tid / V;
    const uint4* rows = reinterpret_cast<const uint4*>(k);
    float part[VE];
#pragma unroll
    for (int e = 0; e < VE; ++e) part[e] = 0.0f;
    if (g < G) {
        for (int s = s0 + g; s < s1; s += U * G) pool_vec_round<KDT, VE, U>(rows, kscale, s, s1, G, V, v, part);
#pragma unroll
        for (int e = 0; e < VE; ++e) sPart[g * D + v * VE + e] = part[e];
    }
    __syncthreads();
    float sum = 0.0f;
    if (tid < D)
        for (int i = 0; i < G; ++i) sum += sPart[i * D + tid];
    pool_store<POOL>((float)(s1 - s0), sum, tid, D, b, pooled, pscale, sAmax);
}
