// pool.cu — stage 1a: mean-pooled keys per block (SPEC §5.2).
//
// One CTA per block b, one thread per dimension d: pooled[b, d] = (sum over the block's tokens of
// k[s, d] * k_scale[s]) / count, accumulated in fp32 in token order (loads batched BATCH tokens at
// a time so that they overlap; cupy_backend.POOL_BATCH), then stored as fp32, bf16
// (round to nearest even) or e4m3 with a per-block scale max(amax / 448, 1e-10) (NaN propagates).
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

template <int KDT, int POOL, int BATCH>
__global__ void __launch_bounds__(256) pool_kernel(const void* __restrict__ k, const float* __restrict__ kscale,
                                                   int S, int D, int B, void* __restrict__ pooled,
                                                   float* __restrict__ pscale) {
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
    const float mean = sum / (float)(s1 - s0);
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
