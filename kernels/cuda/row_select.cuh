// row_select.cuh — exact per-row top-k under the SPEC §3 ranking, one CTA per row.
//
// Input: one ranking key per item (common.cuh: 0 = not a candidate, larger = better), either
// precomputed (KEYS_U32, written by score_tile) or derived from fp32 scores and row lengths
// (KEYS_F32, the standalone hisa_cupy.topk).
// 1. Radix select (4 passes of 8 bits, per-warp shared-memory histograms) finds the k-th largest
//    key `thr`, how many items are strictly above it, and how many items equal to it are needed.
// 2. In-order compaction: items are visited in ascending item order, and an item is kept when its
//    key is above `thr`, or equal to it and among the first `need` such items — ties go to the
//    lower item index, which is the lower position because items are ordered by position.
// 3. Output: positions ascending, or (ORDER by score) a bitonic sort of the kept items by
//    (key desc, item asc); then -1 padding.
#pragma once
#include "common.cuh"

#define KEYS_U32 0
#define KEYS_F32 1

#define MAP_IDENTITY 0  // position = item
#define MAP_TOKENS 1    // position = col0 + item
#define MAP_GATHER 2    // position = blocks[t, item / B] * B + item % B

#define SELECT_THREADS 512
#define SELECT_WARPS (SELECT_THREADS / 32)

struct SelectArgs {
    const u32* keys;      // KEYS_U32: [rows, ld]
    const float* scores;  // KEYS_F32: [rows, ld]
    long long ld;
    int ncols;
    const int* lengths;   // KEYS_F32: valid columns per row (nullable = ncols)
    int k;                // number of items to select
    int cache_cap;        // keys cached in shared memory when ncols <= cache_cap
    int row0, T, S;
    const int* ks;
    const int* ke;
    const int* blocks;
    int m, B, col0;
    int relative;         // subtract ks[t] from positions
    int by_score;         // order by rank instead of by position
    int sort_cap;         // power of two >= k (by_score only)
    int* out_idx;
    long long out_ld;
    float* out_val;       // KEYS_F32 only (nullable)
};

template <int SRC>
__device__ __forceinline__ u32 load_key(const SelectArgs& a, long long row, int n, int len) {
    if (SRC == KEYS_U32) return a.keys[row * a.ld + n];
    return n < len ? score_key(a.scores[row * a.ld + n]) : HISA_KEY_NONE;
}

// exclusive block-wide prefix sum of one int per thread; returns the block total in *total
__device__ __forceinline__ int block_exclusive_scan(int v, int* sScan, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sScan[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < SELECT_WARPS ? sScan[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xFFFFFFFFu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < SELECT_WARPS) sScan[lane] = w;  // inclusive per-warp totals
    }
    __syncthreads();
    const int before = (warp > 0 ? sScan[warp - 1] : 0) + x - v;
    *total = sScan[SELECT_WARPS - 1];
    __syncthreads();
    return before;
}

template <int SRC, int MAP>
__device__ void row_select(const SelectArgs& a) {
    extern __shared__ __align__(16) char smem[];
    int* sHist = reinterpret_cast<int*>(smem);                  // [SELECT_WARPS][256]
    int* sScan = sHist + SELECT_WARPS * 256;                    // [32]
    int* sMisc = sScan + 32;                                    // [8]
    u64* sSort = reinterpret_cast<u64*>(sMisc + 8);             // [sort_cap] (by_score)
    u32* sCache = reinterpret_cast<u32*>(sSort + (a.by_score ? a.sort_cap : 0));  // [ncols] or none

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row = blockIdx.x;
    const int t = a.row0 + (int)row;
    const int len = (SRC == KEYS_F32 && a.lengths) ? max(0, min(a.lengths[t], a.ncols)) : a.ncols;
    const bool cached = a.ncols <= a.cache_cap;
    const int n_items = (SRC == KEYS_F32) ? len : a.ncols;

    // pass 0: cache keys, count candidates
    int cnt = 0;
    for (int n = tid; n < n_items; n += SELECT_THREADS) {
        const u32 key = load_key<SRC>(a, row, n, len);
        if (cached) sCache[n] = key;
        cnt += key != HISA_KEY_NONE;
    }
    int n_valid;
    block_exclusive_scan(cnt, sScan, &n_valid);
    // (the scan ends with a barrier, so sCache is visible)

    const int k = a.k;
    u32 thr = 1u;            // smallest non-empty key: with n_valid <= k every candidate is kept
    int need = 0x7FFFFFFF;   // how many items equal to thr to keep
    if (n_valid > k) {
        u32 prefix = 0u;
        int remaining = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < SELECT_WARPS * 256; i += SELECT_THREADS) sHist[i] = 0;
            __syncthreads();
            int* myHist = sHist + warp * 256;
            for (int n = tid; n < n_items; n += SELECT_THREADS) {
                const u32 key = cached ? sCache[n] : load_key<SRC>(a, row, n, len);
                if (key == HISA_KEY_NONE) continue;
                if (shift == 24 || (key >> (shift + 8)) == (prefix >> (shift + 8)))
                    atomicAdd(&myHist[(key >> shift) & 255u], 1);
            }
            __syncthreads();
            if (tid < 256) {
                int s = 0;
                for (int w = 0; w < SELECT_WARPS; ++w) s += sHist[w * 256 + tid];
                sHist[tid] = s;  // row 0 now holds totals (each thread touches only its own bin)
            }
            __syncthreads();
            if (warp == 0) {
                // lane l owns bins 255-8l .. 248-8l; suffix sums from the top bin down
                int local[8];
                int sum = 0;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    local[j] = sHist[255 - 8 * lane - j];
                    sum += local[j];
                }
                int incl = sum;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
                    if (lane >= o) incl += y;
                }
                int above = incl - sum;  // count in bins above this lane's first bin
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (above < remaining && above + local[j] >= remaining) {
                        sMisc[0] = 255 - 8 * lane - j;
                        sMisc[1] = above;
                    }
                    above += local[j];
                }
            }
            __syncthreads();
            const u32 bin = (u32)sMisc[0];
            remaining -= sMisc[1];
            prefix |= bin << shift;
            __syncthreads();
        }
        thr = prefix;
        need = remaining;
    }

    // in-order compaction
    const int n_out = min(k, n_valid);
    int base_sel = 0, base_eq = 0;
    const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
    int* out = a.out_idx + row * a.out_ld;
    // output slot <- item n: its position (MAP), minus ks[t] when relative, and its value (KEYS_F32)
    auto emit = [&](int slot, int n) {
        int pos;
        if (MAP == MAP_IDENTITY) pos = n;
        else if (MAP == MAP_TOKENS) pos = a.col0 + n;
        else pos = a.blocks[(long long)t * a.m + n / a.B] * a.B + n % a.B;
        out[slot] = pos - rel;
        if (SRC == KEYS_F32 && a.out_val) a.out_val[row * a.out_ld + slot] = a.scores[row * a.ld + n];
    };
    for (int c0 = 0; c0 < n_items && base_sel < n_out; c0 += SELECT_THREADS) {
        const int n = c0 + tid;
        const u32 key = n < n_items ? (cached ? sCache[n] : load_key<SRC>(a, row, n, len)) : HISA_KEY_NONE;
        const int is_eq = (key == thr) && key != HISA_KEY_NONE;
        int n_eq;
        const int eq_rank = base_eq + block_exclusive_scan(is_eq, sScan, &n_eq);
        const int sel = key != HISA_KEY_NONE && (key > thr || (is_eq && eq_rank < need));
        int n_sel;
        const int slot = base_sel + block_exclusive_scan(sel, sScan, &n_sel);
        if (sel && slot < n_out) {
            if (a.by_score) {
                sSort[slot] = ((u64)key << 32) | (u64)(0xFFFFFFFFu - (u32)n);
            } else {
                emit(slot, n);
            }
        }
        base_sel += n_sel;
        base_eq += n_eq;
    }

    if (a.by_score) {
        int P = 1;
        while (P < n_out) P <<= 1;
        for (int i = n_out + tid; i < P; i += SELECT_THREADS) sSort[i] = 0ull;
        __syncthreads();
        // bitonic sort, descending
        for (int size = 2; size <= P; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int i = tid; i < P; i += SELECT_THREADS) {
                    const int j = i ^ stride;
                    if (j > i) {
                        const u64 x = sSort[i], y = sSort[j];
                        const bool desc = (i & size) == 0;
                        if (desc ? (x < y) : (x > y)) {
                            sSort[i] = y;
                            sSort[j] = x;
                        }
                    }
                }
                __syncthreads();
            }
        }
        for (int i = tid; i < n_out; i += SELECT_THREADS) {
            emit(i, (int)(0xFFFFFFFFu - (u32)(sSort[i] & 0xFFFFFFFFull)));
        }
    }
    for (int i = n_out + tid; i < k; i += SELECT_THREADS) {
        out[i] = -1;
        if (SRC == KEYS_F32 && a.out_val) a.out_val[row * a.out_ld + i] = __int_as_float(0xFF800000);
    }
}

// Flat kernel parameter list (CuPy passes scalars and pointers, not structs) and its packing.
#define SELECT_PARAMS                                                                          \
    const u32 *keys, const float *scores, long long ld, int ncols, const int *lengths, int k,  \
        int cache_cap, int row0, int T, int S, const int *ks, const int *ke, const int *blocks, \
        int m, int B, int col0, int relative, int by_score, int sort_cap, int *out_idx,         \
        long long out_ld, float *out_val
#define SELECT_ARGS                                                                             \
    SelectArgs { keys, scores, ld, ncols, lengths, k, cache_cap, row0, T, S, ks, ke, blocks, m, B, \
                 col0, relative, by_score, sort_cap, out_idx, out_ld, out_val }
