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
#define ITEMS_UNION 3  // score_wgmma.cuh only: the union of two rows' selected blocks

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

// max(x, 0) with NaN passing through (one instruction; relu(-0) may come out as +0, which ranks
// the same)
__device__ __forceinline__ float relu(float x) {
    float y;
    asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(y) : "f"(x));
    return y;
}

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

// shared memory: Q [ROWS*H][PITCH], K buffers [buffers][TILE][PITCH], weights [ROWS*H], item
// rows [buffers][TILE], flags [buffers][ROWS][TILE] and key scales [buffers][TILE]
// (cupy_backend._score_smem mirrors this)
template <int ENGINE, int KDT, int H, int D, int ROWS>
__host__ __device__ constexpr int score_smem_bytes() {
    return (ROWS * H + KeyPath<ENGINE, KDT>::buffers * SCORE_TILE) * TileLayout<ENGINE, D>::pitch + ROWS * H * 4 +
           KeyPath<ENGINE, KDT>::buffers * SCORE_TILE * 4 * (2 + ROWS);
}

// key row read by item n of query row t (-1: none) and its flag: 0 not a candidate, 1 scored,
// 2 forced block
template <int ITEMS>
__device__ __forceinline__ int item_row(int n, int nitems, int t, const RowRange& rr, const int* blocks, int S,
                                        const FastDiv& B, int m, int col0, int nb, u32* flag) {
    *flag = 0u;
    if (n >= nitems) return -1;
    if (ITEMS == ITEMS_TOKENS) {
        const int s = col0 + n;
        if (s >= rr.ks && s < rr.ke) { *flag = 1u; return s; }
    } else if (ITEMS == ITEMS_BLOCKS) {
        if (rr.ke > rr.ks) {
            const int b0 = (int)B.div((u32)rr.ks), b1 = (int)B.div((u32)(rr.ke - 1));
            if (n >= b0 && n <= b1) {
                *flag = (n == b0 || n == b1) ? 2u : 1u;
                return *flag == 1u ? n : -1;
            }
        }
    } else {
        const int bi = (int)B.div((u32)n);
        const int b = blocks[(long long)t * m + bi];
        if (b >= 0 && b < nb) {
            const long long s = (long long)b * (int)B.d + (n - bi * (int)B.d);
            if (s >= rr.ks && s < rr.ke) { *flag = 1u; return (int)s; }
        }
    }
    return -1;
}

// Scores of one tile held in shared memory against the q rows staged at sQ (ROWS query rows of
// H heads each, HR = ROWS * H rows): fills part[r][nt][c] in the MMA layout; after the call
// lanes 0..3 of each warp hold the head-reduced scores of query row r for items
// warp*32 + nt*8 + 2*lane + c. Shared-memory addresses are 32-bit and the per-lane offsets are
// computed once by the caller (qa: lane's ldmatrix row of q, kb: lane's ldmatrix row of the
// warp's items). With ROWS > 1, H is a multiple of 64, so each 64-row pass belongs to one row.
template <int ENGINE, int H, int ROWS, int D, int PITCH>
__device__ __forceinline__ void mma_tile_scores(u32 qa, u32 kb, const float (&wr)[(ROWS * H) / 16][2],
                                                float (&part)[ROWS][4][2]) {
    constexpr int HR = ROWS * H;
    constexpr int KSTEPS = D * EngineElem<ENGINE>::bytes / 32;
    constexpr int MT = (HR < 64 ? HR : 64) / 16;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[r][i][0] = part[r][i][1] = 0.0f;
#pragma unroll
    for (int hp = 0; hp < HR; hp += 64) {
        const int r = ROWS == 1 ? 0 : hp / H;
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
                u32 rg[4];
                ldmatrix_x4(rg, kb + np * 16 * PITCH + kk * 32);
                bf[2 * np][0] = rg[0];
                bf[2 * np][1] = rg[1];
                bf[2 * np + 1][0] = rg[2];
                bf[2 * np + 1][1] = rg[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                u32 af[4];
                ldmatrix_x4(af, qa + (hp + mt * 16) * PITCH + kk * 32);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    if (ENGINE == ENGINE_BF16) mma_bf16(acc[mt][nt], af, bf[nt]);
                    else if (ENGINE == ENGINE_F16) mma_f16(acc[mt][nt], af, bf[nt]);
                    else mma_e4m3(acc[mt][nt], af, bf[nt]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float w0 = wr[hp / 16 + mt][0], w1 = wr[hp / 16 + mt][1];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                part[r][nt][0] += w0 * relu(acc[mt][nt][0]) + w1 * relu(acc[mt][nt][2]);
                part[r][nt][1] += w0 * relu(acc[mt][nt][1]) + w1 * relu(acc[mt][nt][3]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float v = part[r][nt][c];
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 4);
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 8);
                v += __shfl_xor_sync(0xFFFFFFFFu, v, 16);
                part[r][nt][c] = v;
            }
}

__device__ __forceinline__ u32 item_key(u32 flag, float score, bool scaled, float scale) {
    if (flag == 2u) return HISA_KEY_FORCED;
    if (flag != 1u) return HISA_KEY_NONE;
    return score_key(scaled ? score * scale : score);
}

// The query rows of a score CTA (both engines): local rows local0 .. local0 + ROWS - 1 of the
// launch's nrows, i.e. rows row0 + local0 + r; live[r] says whether the row exists, rr[r] is its
// clamped key range (empty for a row past the end).
template <int ROWS>
__device__ __forceinline__ void cta_rows(int local0, int nrows, int row0, const int* ks, const int* ke, int T, int S,
                                         int (&trow)[ROWS], bool (&live)[ROWS], RowRange (&rr)[ROWS]) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        live[r] = local0 + r < nrows;
        trow[r] = row0 + local0 + r;
        rr[r] = live[r] ? row_range(ks, ke, trow[r], T, S) : RowRange{0, 0};
    }
}

// One CTA: query rows t = row0 + blockIdx.y * ROWS + r (r < ROWS, local index < nrows), key
// tiles [blockIdx.x * tiles_per_cta, +tiles_per_cta) of SCORE_TILE items each. The q rows and
// weights are staged once; key tiles stream through shared memory (double-buffered with cp.async
// when no conversion is needed) and, with ROWS > 1, each tile serves several query rows (dense
// path and block scores, whose rows share their keys).
template <int ENGINE, int QDT, int KDT, int H, int D, int ITEMS, int ROWS>
__device__ __forceinline__ void score_tile(
    const void* __restrict__ q, const void* __restrict__ keys, const float* __restrict__ weights,
    const float* __restrict__ kscale, const int* __restrict__ ks, const int* __restrict__ ke,
    const int* __restrict__ blocks, int T, int S, int B, int m, int nitems, int col0, int row0, int nrows,
    u32* __restrict__ out, long long ld, int tiles_per_cta) {
    static_assert(H % 16 == 0 && H <= 128, "H must be a multiple of 16, at most 128");
    static_assert(D % 32 == 0 && D <= 256, "D must be a multiple of 32, at most 256");
    static_assert(ROWS == 1 || (H % 64 == 0 && ITEMS != ITEMS_GATHER && KeyPath<ENGINE, KDT>::async),
                  "several rows per CTA need H % 64 == 0, shared keys and the async key path");
    constexpr int HR = ROWS * H;
    constexpr int PITCH = TileLayout<ENGINE, D>::pitch;
    constexpr int NBUF = KeyPath<ENGINE, KDT>::buffers;
    constexpr int QB = DType<QDT>::bytes, KB = DType<KDT>::bytes;
    constexpr int QV = D * QB / 16, KV = D * KB / 16;  // 16-byte vectors per row
    extern __shared__ __align__(16) char smem[];
    char* sQ = smem;                                                      // [HR][PITCH]
    char* sK = sQ + HR * PITCH;                                           // [NBUF][SCORE_TILE][PITCH]
    float* sW = reinterpret_cast<float*>(sK + NBUF * SCORE_TILE * PITCH);  // [HR]
    int* sRow = reinterpret_cast<int*>(sW + HR);                          // [NBUF][SCORE_TILE]
    u32* sFlag = reinterpret_cast<u32*>(sRow + NBUF * SCORE_TILE);        // [NBUF][ROWS][SCORE_TILE]
    float* sScale = reinterpret_cast<float*>(sFlag + NBUF * ROWS * SCORE_TILE);  // [NBUF][SCORE_TILE]

    const int tid = threadIdx.x;
    const int local0 = blockIdx.y * ROWS;
    int trow[ROWS];
    bool live[ROWS];
    RowRange rr[ROWS];
    cta_rows<ROWS>(local0, nrows, row0, ks, ke, T, S, trow, live, rr);
    const int nb = (S + B - 1) / B;
    const FastDiv Bd(B);
    const int ntiles = (nitems + SCORE_TILE - 1) / SCORE_TILE;
    const int j_begin = blockIdx.x * tiles_per_cta;
    const int j_end = min(ntiles, j_begin + tiles_per_cta);
    const char* kbase = reinterpret_cast<const char*>(keys);
    auto orow = [&](int r) { return out + (long long)(local0 + r) * ld; };

    // key row of item n (any row's) and each row's flag for it
    auto map_item = [&](int n, u32 (&f)[ROWS]) {
        int row = -1;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int rw = item_row<ITEMS>(n, nitems, trow[r], rr[r], blocks, S, Bd, m, col0, nb, &f[r]);
            if (rw >= 0) row = rw;
        }
        return row;
    };
    auto write_unscored = [&](int n, const u32 (&f)[ROWS]) {
        if (n >= nitems) return;
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (live[r]) orow(r)[n] = f[r] == 2u ? HISA_KEY_FORCED : HISA_KEY_NONE;
    };

    // does any tile of this CTA hold a candidate? (skips causal-masked work without loading q)
    {
        int any = 0;
        for (int j = j_begin; j < j_end && !any; ++j) {
            u32 f[ROWS];
            const int row = map_item(j * SCORE_TILE + tid, f);
            bool mine = false;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) mine |= f[r] == 1u;
            (void)row;
            any = __syncthreads_or(mine);
            if (!any) write_unscored(j * SCORE_TILE + tid, f);
            else if (tid == 0) sRow[0] = j;
        }
        if (!any) return;
        __syncthreads();
    }
    const int j_first = sRow[0];
    __syncthreads();

    // stage the q rows (converted to the engine's operand type) and the weights
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const char* qrow = reinterpret_cast<const char*>(q) + (long long)(live[r] ? trow[r] : 0) * H * D * QB;
        for (int i = tid; i < H * QV; i += SCORE_THREADS) {
            const uint4 x = live[r] ? reinterpret_cast<const uint4*>(qrow)[i] : make_uint4(0u, 0u, 0u, 0u);
            store_converted<QDT, ENGINE>(sQ + (r * H + i / QV) * PITCH, (i % QV) * (16 / QB), x);
        }
        for (int h = tid; h < H; h += SCORE_THREADS)
            sW[r * H + h] = live[r] ? weights[(long long)trow[r] * H + h] : 0.0f;
    }
    __syncthreads();
    // per-lane constants of the MMA path: the weights of the two heads each lane reduces per
    // m-tile, and the lane's ldmatrix rows in q and in the warp's slice of a key tile
    const int lane = tid & 31, warp = tid >> 5;
    float wr[HR / 16][2];
#pragma unroll
    for (int mt = 0; mt < HR / 16; ++mt) {
        wr[mt][0] = sW[mt * 16 + (lane >> 2)];
        wr[mt][1] = sW[mt * 16 + (lane >> 2) + 8];
    }
    const u32 qa = smem_addr(sQ) + (lane & 15) * PITCH + (lane >> 4) * 16;
    const u32 kb0 = smem_addr(sK) + (warp * 32 + (lane >> 4) * 8 + (lane & 7)) * PITCH + ((lane >> 3) & 1) * 16;
    auto write_scores = [&](int n0, int buf, float (&part)[ROWS][4][2]) {
        if (lane >= 4) return;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int item = warp * 32 + nt * 8 + 2 * lane + c;
                if (n0 + item >= nitems) continue;
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    if (live[r])
                        orow(r)[n0 + item] = item_key(sFlag[(buf * ROWS + r) * SCORE_TILE + item], part[r][nt][c],
                                                      kscale != nullptr, sScale[buf * SCORE_TILE + item]);
            }
    };

    if constexpr (KeyPath<ENGINE, KDT>::async) {
        // each thread fetches its own item's key row: KV cp.async of 16 bytes
        auto stage = [&](int j, int buf) {
            u32 f[ROWS];
            const int row = map_item(j * SCORE_TILE + tid, f);
            sRow[buf * SCORE_TILE + tid] = row;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sFlag[(buf * ROWS + r) * SCORE_TILE + tid] = f[r];
            const char* src = row >= 0 ? kbase + (long long)row * D * KB : kbase;
            const u32 dst = smem_addr(sK + (buf * SCORE_TILE + tid) * PITCH);
#pragma unroll
            for (int v = 0; v < KV; ++v) cp_async16(dst + v * 16, src + v * 16, row >= 0);
            // the item's key scale travels with its key row, so the epilogue never waits on it
            if (kscale) cp_async4(smem_addr(sScale + buf * SCORE_TILE + tid), row >= 0 ? kscale + row : kscale, row >= 0);
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
            bool mine = false;
            u32 f[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                f[r] = sFlag[(buf * ROWS + r) * SCORE_TILE + tid];
                mine |= f[r] == 1u;
            }
            const int n0 = j * SCORE_TILE;
            if (!__syncthreads_or(mine)) {
                write_unscored(n0 + tid, f);
            } else {
                float part[ROWS][4][2];
                mma_tile_scores<ENGINE, H, ROWS, D, PITCH>(qa, kb0 + buf * SCORE_TILE * PITCH, wr, part);
                write_scores(n0, buf, part);
            }
            __syncthreads();  // buffer `buf` is refilled by the next iteration's stage()
        }
    } else {
        for (int j = j_first; j < j_end; ++j) {
            u32 f[ROWS];
            const int row = map_item(j * SCORE_TILE + tid, f);
            sRow[tid] = row;
            sFlag[tid] = f[0];
            sScale[tid] = (kscale && row >= 0) ? kscale[row] : 1.0f;
            __syncthreads();
            for (int i = tid; i < SCORE_TILE * KV; i += SCORE_THREADS) {
                const int r = i / KV, v = i % KV;
                const int rw = sRow[r];
                uint4 x = make_uint4(0u, 0u, 0u, 0u);
                if (rw >= 0) x = reinterpret_cast<const uint4*>(kbase + (long long)rw * D * KB)[v];
                store_converted<KDT, ENGINE>(sK + r * PITCH, v * (16 / KB), x);
            }
            const int n_scored = __syncthreads_count(f[0] == 1u);
            const int n0 = j * SCORE_TILE;
            if (n_scored == 0) {
                write_unscored(n0 + tid, f);
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
                if (n0 + tid < nitems && live[0]) orow(0)[n0 + tid] = item_key(f[0], sc, kscale != nullptr, sScale[tid]);
            } else {
                float part[ROWS][4][2];
                mma_tile_scores<ENGINE, H, ROWS, D, PITCH>(qa, kb0, wr, part);
                write_scores(n0, 0, part);
            }
            __syncthreads();
        }
    }
}
