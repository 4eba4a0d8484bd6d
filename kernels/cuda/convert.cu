// convert.cu — fp8 e4m3 keys to f16 (exact: every e4m3 value is an f16 value), so that the Hopper
// wgmma engine scores fp8 inputs on the f16 tensor cores with fp32 accumulation, converting each
// key once per call instead of once per (query row, key).
#include "common.cuh"

// in: n8 groups of 8 e4m3 bytes; out: n8 groups of 8 f16 (16-byte aligned)
__global__ void __launch_bounds__(256) e4m3_to_f16_kernel(const uint2* __restrict__ in, uint4* __restrict__ out,
                                                          long long n8) {
    for (long long i = blockIdx.x * 256ll + threadIdx.x; i < n8; i += (long long)gridDim.x * 256) {
        const uint2 v = in[i];
        const u32 w[2] = {v.x, v.y};
        u32 o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const u32 b = w[e >> 1] >> ((e & 1) * 16);
            o[e] = (u32)f32_to_f16(e4m3_to_f32(b & 0xFFu)) | ((u32)f32_to_f16(e4m3_to_f32((b >> 8) & 0xFFu)) << 16);
        }
        out[i] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}
