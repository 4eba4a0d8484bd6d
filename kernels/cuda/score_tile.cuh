// score_tile.cuh — the scoring engine shared by block scoring, refinement and the dense path.
//
// One CTA (128 threads, 4 warps) scores one query row t against a tile of 128 "items":
//   score(item) = kscale[row] * sum_h weights[t, h] * relu(q[t, h, :] . key[row, :])
// where the key row of an item depends on ITEMS:
//   ITEMS_TOKENS  item n -> token col0 + n          (dense path: a contiguous slice of keys)
//   ITEMS_BLOCKS  item n -> pooled block n          (stage 1: block scores, eligibility, forced blocks)
//   ITEMS_GATHER  item n -> token blocks[t, n / B] * B + n % B   (stage 2: candidates of the selected blocks)
// and writes one ranking key per item (common.cuh): 0 when the item is not a candidate,
// 0xFFFFFFFF for a forced block, else score_key(score).
//
// Engines: tensor cores through mma.sync (bf16 m16n8k16, f16 m16n8k16, e4m3 m16n8k32) with the
// relu * weight head reduction in registers, or plain fp32 FMA (SIMT) for fp32 operands and for
// operand pairs no tensor-core type holds exactly. Accumulation is fp32 everywhere.
#pragma once
#include "common.cuh"

// logical dtype codes (host side: kernels/cupy_backend.py)
#define DT_E4M3 0
#define DT_BF16 1
#define DT_F16 2
#define DT_F32 3

#define ENGINE_SIMT 0
#define ENGINE_BF16 1
#define ENGINE_F16 2
#define ENGINE_E4M3 3

#define ITEMS_TOKENS 0
#define ITEMS_BLOCKS 1
#define ITEMS_GATHER 2

#define SCORE_TILE 128
#define SCORE_THREADS 128

template <int DT> struct DType;
template <> struct DType<DT_E4M3> { static constexpr int bytes = 1; };
template <> struct DType<DT_BF16> { static constexpr int bytes = 2; };
template <> struct DType<DT_F16> { static constexpr int bytes = 2; };
template <> struct DType<DT_F32> { static constexpr int bytes = 4; };

template <int ENGINE> struct EngineElem { static constexpr int bytes = 2; };
template <> struct EngineElem<ENGINE_SIMT> { static constexpr int bytes = 4; };
template <> struct EngineElem<ENGINE_E4M3> { static constexpr int bytes = 1; };

// i-th element (of a 16-byte vector) decoded to fp32
template <int DT>
__device__ __forceinline__ float decode_elem(const uint4& v, int i) {
    if (DT == DT_E4M3) return e4m3_to_f32(reinterpret_cast<const u8*>(&v)[i]);
    if (DT == DT_BF16) return bf16_to_f32(reinterpret_cast<const u16*>(&v)[i]);
    if (DT == DT_F16) return f16_to_f32(reinterpret_cast<const u16*>(&v)[i]);
    return reinterpret_cast<const float*>(&v)[i];
}

// Store one 16-byte source vector (element offset e0 of a row) into a shared-memory row of engine
// operands. Same type: one 16-byte store. Otherwise: exact conversions only (the engine choice
// on the host guarantees that the source values are representable in the engine type).
template <int SDT, int ENGINE>
__device__ __forceinline__ void store_converted(char* dst_row, int e0, const uint4& v) {
    constexpr int SB = DType<SDT>::bytes;
    constexpr int EB = EngineElem<ENGINE>::bytes;
    constexpr bool same = (ENGINE == ENGINE_E4M3 && SDT == DT_E4M3) ||
                          (ENGINE == ENGINE_BF16 && SDT == DT_BF16) ||
                          (ENGINE == ENGINE_F16 && SDT == DT_F16);  // SIMT rows (pitch D+1 words) are not 16-byte aligned
    if constexpr (same) {
        *reinterpret_cast<uint4*>(dst_row + e0 * EB) = v;
    } else {
#pragma unroll
    for (int i = 0; i < 16 / SB; ++i) {
        const float f = decode_elem<SDT>(v, i);
        if (ENGINE == ENGINE_SIMT) {
            reinterpret_cast<float*>(dst_row)[e0 + i] = f;
        } else if (ENGINE == ENGINE_BF16) {
            reinterpret_cast<u16*>(dst_row)[e0 + i] = (u16)(__float_as_uint(f) >> 16);  // exact here
        } else if (ENGINE == ENGINE_F16) {
            reinterpret_cast<u16*>(dst_row)[e0 + i] = f32_to_f16(f);  // exact here
        } else {
            reinterpret_cast<u8*>(dst_row)[e0 + i] = f32_to_e4m3_satfinite(f);  // exact here
        }
    }
    }
}

__device__ __forceinline__ float relu(float x) { return x < 0.0f ? 0.0f : x; }  // NaN passes

template <int ENGINE, int D>
struct TileLayout {
    static constexpr int EB = EngineElem<ENGINE>::bytes;
    // SIMT: fp32 rows padded by one word; MMA: rows padded by 16 bytes (conflict-free ldmatrix)
    static constexpr int pitch = (ENGINE == ENGINE_SIMT) ? (D + 1) * 4 : D * EB + 16;
};

// K tiles are double-buffered with cp.async when the keys need no conversion on the way in.
template <int ENGINE, int KDT>
struct KeyPath {
    static constexpr bool async = (ENGINE == ENGINE_E4M3 && KDT == DT_E4M3) ||
                                  (ENGINE == ENGINE_BF16 && KDT == DT_BF16) ||
                                  (ENGINE == ENGINE_F16 && KDT == DT_F16);
    static constexpr int buffers = async ? 2 : 1;
};

// shared memory: Q [H][PITCH], K buffers [buffers][TILE][PITCH], weights [H], item rows and flags
template <int ENGINE, int KDT, int H, int D>
__host__ __device__ constexpr int score_smem_bytes() {
    return (H + KeyPath<ENGINE, KDT>::buffers * SCORE_TILE) * TileLayout<ENGINE, D>::pitch + H * 4 +
           KeyPath<ENGINE, KDT>::buffers * SCORE_TILE * 8;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// key row read by item n of query row t (-1: none) and its flag: 0 not a candidate, 1 scored,
// 2 forced block
template <int ITEMS>
__device__ __forceinline__ int item_row(int n, int nitems, int t, const RowRange& rr, const int* blocks, int S,
                                        int B, int m, int col0, int nb, u32* flag) {
    *flag = 0u;
    if (n >= nitems) return -1;
    if (ITEMS == ITEMS_TOKENS) {
        const int s = col0 + n;
        if (s >= rr.ks && s < rr.ke) { *flag = 1u; return s; }
    } else if (ITEMS == ITEMS_BLOCKS) {
        if (rr.ke > rr.ks) {
            const int b0 = rr.ks / B, b1 = (rr.ke - 1) / B;
            if (n >= b0 && n <= b1) {
                *flag = (n == b0 || n == b1) ? 2u : 1u;
                return *flag == 1u ? n : -1;
            }
        }
    } else {
        const int b = blocks[(long long)t * m + n / B];
        if (b >= 0 && b < nb) {
            const long long s = (long long)b * B + n % B;
            if (s >= rr.ks && s < rr.ke) { *flag = 1u; return (int)s; }
        }
    }
    return -1;
}

// Scores of one tile held in sK (items' rows) against sQ: fills part[nt][c] of the MMA layout
// (lanes 0..3 of each warp end with the head-reduced scores of columns 2*lane + c of n-tile nt).
template <int ENGINE, int H, int D, int PITCH>
__device__ __forceinline__ void mma_tile_scores(const char* sQ, const char* sK, const float* sW, float part[4][2]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int KSTEPS = D * EngineElem<ENGINE>::bytes / 32;
    constexpr int MT = (H < 64 ? H : 64) / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) part[i][0] = part[i][1] = 0.0f;
    for (int hp = 0; hp < H; hp += 64) {
        float acc[MT][4][4];
#pragma unroll
        for (int a = 0; a < MT; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            u32 bf[4][2];
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 r[4];
                ldmatrix_x4(r, smem_addr(sK + (warp * 32 + np * 16 + (lane >> 4) * 8 + (lane & 7)) * PITCH + kk * 32 +
                                         ((lane >> 3) & 1) * 16));
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                u32 af[4];
                ldmatrix_x4(af, smem_addr(sQ + (hp + mt * 16 + (lane & 15)) * PITCH + kk * 32 + (lane >> 4) * 16));
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    if (ENGINE == ENGINE_BF16) mma_bf16(acc[mt][nt], af, bf[nt]);
                    else if (ENGINE == ENGINE_F16) mma_f16(acc[mt][nt], af, bf[nt]);
                    else mma_e4m3(acc[mt][nt], af, bf[nt]);
                }
            }
        }
        const int g = lane >> 2;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float w0 = sW[hp + mt * 16 + g], w1 = sW[hp + mt * 16 + g + 8];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                part[nt][0] += w0 * relu(acc[mt][nt][0]) + w1 * relu(acc[mt][nt][2]);
                part[nt][1] += w0 * relu(acc[mt][nt][1]) + w1 * relu(acc[mt][nt][3]);
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            float v = part[nt][c];
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 4);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 8);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 16);
            part[nt][c] = v;
        }
}

__device__ __forceinline__ u32 item_key(u32 flag, float score, const float* kscale, int row) {
    if (flag == 2u) return HISA_KEY_FORCED;
    if (flag != 1u) return HISA_KEY_NONE;
    return score_key(kscale ? score * kscale[row] : score);
}

// One CTA: query row t = row0 + blockIdx.y, tiles [blockIdx.x * tiles_per_cta, +tiles_per_cta)
// of SCORE_TILE items each. q[t] and weights[t] are staged once; key tiles stream through shared
// memory (double-buffered with cp.async when no conversion is needed).
template <int ENGINE, int QDT, int KDT, int H, int D, int ITEMS>
__device__ __forceinline__ void score_tile(
    const void* __restrict__ q, const void* __restrict__ keys, const float* __restrict__ weights,
    const float* __restrict__ kscale, const int* __restrict__ ks, const int* __restrict__ ke,
    const int* __restrict__ blocks, int T, int S, int B, int m, int nitems, int col0, int row0,
    u32* __restrict__ out, long long ld, int tiles_per_cta) {
    static_assert(H % 16 == 0 && H <= 128, "H must be a multiple of 16, at most 128");
    static_assert(D % 32 == 0 && D <= 256, "D must be a multiple of 32, at most 256");
    constexpr int PITCH = TileLayout<ENGINE, D>::pitch;
    constexpr int NBUF = KeyPath<ENGINE, KDT>::buffers;
    constexpr int QB = DType<QDT>::bytes, KB = DType<KDT>::bytes;
    constexpr int QV = D * QB / 16, KV = D * KB / 16;  // 16-byte vectors per row
    extern __shared__ __align__(16) char smem[];
    char* sQ = smem;                                                      // [H][PITCH]
    char* sK = sQ + H * PITCH;                                            // [NBUF][SCORE_TILE][PITCH]
    float* sW = reinterpret_cast<float*>(sK + NBUF * SCORE_TILE * PITCH);  // [H]
    int* sRow = reinterpret_cast<int*>(sW + H);                           // [NBUF][SCORE_TILE]
    u32* sFlag = reinterpret_cast<u32*>(sRow + NBUF * SCORE_TILE);        // [NBUF][SCORE_TILE]

    const int tid = threadIdx.x;
    const int t = row0 + blockIdx.y;
    const RowRange rr = row_range(ks, ke, t, T, S);
    const int nb = (S + B - 1) / B;
    const int ntiles = (nitems + SCORE_TILE - 1) / SCORE_TILE;
    const int j_begin = blockIdx.x * tiles_per_cta;
    const int j_end = min(ntiles, j_begin + tiles_per_cta);
    u32* orow = out + (long long)blockIdx.y * ld;
    const char* kbase = reinterpret_cast<const char*>(keys);

    // does any tile of this CTA hold a candidate? (skips causal-masked work without loading q)
    {
        int any = 0;
        for (int j = j_begin; j < j_end && !any; ++j) {
            u32 f;
            item_row<ITEMS>(j * SCORE_TILE + tid, nitems, t, rr, blocks, S, B, m, col0, nb, &f);
            any = __syncthreads_or(f == 1u);
            if (!any) {
                // nothing to score in tile j: write its keys now
                const int n = j * SCORE_TILE + tid;
                if (n < nitems) orow[n] = f == 2u ? HISA_KEY_FORCED : HISA_KEY_NONE;
            }
            if (any) {
                // tiles before j are done; start at j
                if (tid == 0) sRow[0] = j;
            }
        }
        if (!any) return;
        __syncthreads();
    }
    const int j_first = sRow[0];
    __syncthreads();

    // stage q[t] (converted to the engine's operand type) and weights[t]
    {
        const char* qrow = reinterpret_cast<const char*>(q) + (long long)t * H * D * QB;
        for (int i = tid; i < H * QV; i += SCORE_THREADS) {
            const uint4 x = reinterpret_cast<const uint4*>(qrow)[i];
            store_converted<QDT, ENGINE>(sQ + (i / QV) * PITCH, (i % QV) * (16 / QB), x);
        }
        for (int h = tid; h < H; h += SCORE_THREADS) sW[h] = weights[(long long)t * H + h];
    }

    if constexpr (KeyPath<ENGINE, KDT>::async) {
        // each thread fetches its own item's key row: KV cp.async of 16 bytes
        auto stage = [&](int j, int buf) {
            u32 f;
            const int row = item_row<ITEMS>(j * SCORE_TILE + tid, nitems, t, rr, blocks, S, B, m, col0, nb, &f);
            sRow[buf * SCORE_TILE + tid] = row;
            sFlag[buf * SCORE_TILE + tid] = f;
            const char* src = row >= 0 ? kbase + (long long)row * D * KB : kbase;
            const u32 dst = smem_addr(sK + (buf * SCORE_TILE + tid) * PITCH);
#pragma unroll
            for (int v = 0; v < KV; ++v) cp_async16(dst + v * 16, src + v * 16, row >= 0);
            cp_async_commit();
        };
        stage(j_first, 0);
        int buf = 0;
        for (int j = j_first; j < j_end; ++j, buf ^= 1) {
            if (j + 1 < j_end) {
                stage(j + 1, buf ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            const int n_scored = __syncthreads_count(sFlag[buf * SCORE_TILE + tid] == 1u);
            const int n0 = j * SCORE_TILE;
            if (n_scored == 0) {
                if (n0 + tid < nitems) orow[n0 + tid] = sFlag[buf * SCORE_TILE + tid] == 2u ? HISA_KEY_FORCED : HISA_KEY_NONE;
            } else {
                float part[4][2];
                mma_tile_scores<ENGINE, H, D, PITCH>(sQ, sK + buf * SCORE_TILE * PITCH, sW, part);
                const int lane = tid & 31, warp = tid >> 5;
                if (lane < 4) {
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int item = warp * 32 + nt * 8 + 2 * lane + c;
                            if (n0 + item < nitems)
                                orow[n0 + item] = item_key(sFlag[buf * SCORE_TILE + item], part[nt][c], kscale,
                                                           sRow[buf * SCORE_TILE + item]);
                        }
                }
            }
            __syncthreads();  // buffer `buf` is refilled by the next iteration's stage()
        }
    } else {
        for (int j = j_first; j < j_end; ++j) {
            u32 f;
            const int row = item_row<ITEMS>(j * SCORE_TILE + tid, nitems, t, rr, blocks, S, B, m, col0, nb, &f);
            sRow[tid] = row;
            sFlag[tid] = f;
            __syncthreads();
            for (int i = tid; i < SCORE_TILE * KV; i += SCORE_THREADS) {
                const int r = i / KV, v = i % KV;
                const int rw = sRow[r];
                uint4 x = make_uint4(0u, 0u, 0u, 0u);
                if (rw >= 0) x = reinterpret_cast<const uint4*>(kbase + (long long)rw * D * KB)[v];
                store_converted<KDT, ENGINE>(sK + r * PITCH, v * (16 / KB), x);
            }
            const int n_scored = __syncthreads_count(f == 1u);
            const int n0 = j * SCORE_TILE;
            if (n_scored == 0) {
                if (n0 + tid < nitems) orow[n0 + tid] = f == 2u ? HISA_KEY_FORCED : HISA_KEY_NONE;
            } else if (ENGINE == ENGINE_SIMT) {
                const float* qf = reinterpret_cast<const float*>(sQ);
                const float* kf = reinterpret_cast<const float*>(sK + tid * PITCH);
                float sc = 0.0f;
                for (int h = 0; h < H; ++h) {
                    const float* qh = qf + h * (PITCH / 4);
                    float d = 0.0f;
#pragma unroll 16
                    for (int jd = 0; jd < D; ++jd) d = fmaf(qh[jd], kf[jd], d);
                    sc += sW[h] * relu(d);
                }
                if (n0 + tid < nitems) orow[n0 + tid] = item_key(f, sc, kscale, row);
            } else {
                float part[4][2];
                mma_tile_scores<ENGINE, H, D, PITCH>(sQ, sK, sW, part);
                const int lane = tid & 31, warp = tid >> 5;
                if (lane < 4) {
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int item = warp * 32 + nt * 8 + 2 * lane + c;
                            if (n0 + item < nitems)
                                orow[n0 + item] = item_key(sFlag[item], part[nt][c], kscale, sRow[item]);
                        }
                }
            }
            __syncthreads();
        }
    }
}
