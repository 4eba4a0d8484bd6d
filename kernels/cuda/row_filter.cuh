// row_filter.cuh — exact top-k of long rows through a sampled threshold (hisa_cupy.topk and
// dense_select over rows of tens of thousands of keys with k of a few thousand). Three launches:
//
// 1. row_filter (one kernel per key source): a row is P chunks of FILTER_CHUNK columns, taken by
//    a few CTAs each (grid: CTAs per row x rows; about one wave). Every CTA of a row estimates the
//    same threshold t from FILTER_SAMPLES sampled keys of the row's range (64 segments of 32
//    columns spread over it: t is about the ks-th largest sample, with ks = expect * 2048 / len so
//    that about `expect` columns lie at or above it; the host asks for 2k, more for small k), then keeps the columns of its chunks with
//    key >= t (never NaN or not-a-candidate: t >= 2) in position order, word and column, in each
//    chunk's `cap` slots of the row's candidate list. Slots past a chunk's count get the fill word
//    (fp32 scores: NaN, which ranks below every kept value; ranking keys: HISA_KEY_NONE) and -1,
//    and counts[row, chunk] gets the count (above cap: overflow). A row whose range is shorter
//    than `min_len` is not filtered: its counts say overflow.
// 2. filtered_select: a row whose chunks all fit and that kept at least k columns has its top k
//    among its candidates, since every column at or above the k-th largest key is >= t. The
//    candidates are in chunk order then position order, i.e. column order, so ties still go to
//    the lower column (MAP_GATHER with B = 1 reads each candidate's column). Other rows (sorted,
//    tied or mostly NaN rows, short ranges, a sample far off) are marked in `failed` and left.
// 3. The rescue kernels (topk.cu, dense.cu): the marked rows over the whole row, the usual way;
//    the CTAs of the other rows return at once.
#pragma once
#include "common.cuh"
#include "row_select.cuh"

#define FILTER_CHUNK 8192     // columns per chunk: 16 per thread (cupy_backend.TOPK_FILTER_CHUNK)
#define FILTER_SAMPLES 2048   // sampled keys per row, 4 per thread (cupy_backend.TOPK_FILTER_SAMPLES)
#define FILTER_SEGMENTS (FILTER_SAMPLES / 32)
static_assert(FILTER_CHUNK == SELECT_THREADS * REG_SELECT_R, "a chunk is one column per thread and register");
static_assert(FILTER_SAMPLES % SELECT_THREADS == 0, "samples per thread");

// keys (SRC = KEYS_U32, e.g. dense's ranking keys) or fp32 scores [rows, ld]: CTA (x, y) takes
// row y, which is row t = row0 + y of T (row_range, and the index of its candidate slots
// [t, P * cap], counts [t, P] and, in step 2, failed [t], as MAP_GATHER indexes its blocks by t);
// `ranged`: the columns [ks, ke) of row_range, else [0, ncols)
#define FILTER_PARAMS                                                                              \
    const u32 *keys, const float *scores, long long ld, int ncols, int row0, int T, int S,        \
        const int *ks, const int *ke, int ranged, int P, int expect, int cap, int min_len,        \
        u32 *cand_word, int *cand_idx, int *counts
#define FILTER_ARGS \
    keys, scores, ld, ncols, row0, T, S, ks, ke, ranged, P, expect, cap, min_len, cand_word, cand_idx, counts

template <int SRC>
__device__ void row_filter(FILTER_PARAMS) {
    constexpr int R = REG_SELECT_R;
    constexpr int PER = FILTER_SAMPLES / SELECT_THREADS;
    __shared__ int sHist[REG_SELECT_BINS];
    __shared__ int sScan[32];
    __shared__ int sMisc[32];
    __shared__ u32 sRed[2 * SELECT_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row = blockIdx.y;
    const int t = row0 + (int)row;
    const u32* words = SRC == KEYS_U32 ? keys + row * ld : reinterpret_cast<const u32*>(scores + row * ld);
    int lo_col = 0, hi_col = ncols;
    if (ranged) {
        const RowRange rr = row_range(ks, ke, t, T, S);
        lo_col = rr.ks;
        hi_col = min(rr.ke, ncols);
    }
    const int len = max(0, hi_col - lo_col);
    const u32 fill = SRC == KEYS_F32 ? 0x7FC00000u : HISA_KEY_NONE;  // NaN / not a candidate
    if (len < max(min_len, 1)) {  // not worth filtering: every chunk reports overflow, the row is redone
        for (int c = blockIdx.x; c < P; c += gridDim.x)
            if (tid == 0) counts[(long long)t * P + c] = cap + 1;
        return;
    }

    // the first chunk's keys, issued first so that their loads overlap the threshold search
    u32 key[R];
    load_row_keys<SRC>(words, lo_col, hi_col, blockIdx.x * FILTER_CHUNK + tid * R, key);

    // the sample: segment s covers columns lo_col + [s * (len / 64), + 32); thread i holds samples
    // i, i + 512, ...
    u32 smp[PER];
    u32 mn = 0xFFFFFFFFu, mx = 0u;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
        const int i = tid + u * SELECT_THREADS;
        const long long col = lo_col + (long long)(i >> 5) * (len / FILTER_SEGMENTS) + (i & 31);
        smp[u] = col < hi_col ? word_key<SRC>(__ldg(words + col)) : HISA_KEY_NONE;
        mn = min(mn, smp[u] - 1u);  // HISA_KEY_NONE wraps to the largest value
        mx = max(mx, smp[u]);
    }
    mn = __reduce_min_sync(0xFFFFFFFFu, mn);
    mx = __reduce_max_sync(0xFFFFFFFFu, mx);
    if (lane == 0) {
        sRed[warp] = mn;
        sRed[SELECT_WARPS + warp] = mx;
    }
    __syncthreads();
    u32 lo = 0xFFFFFFFFu, hi = 0u;
#pragma unroll
    for (int w = 0; w < SELECT_WARPS; ++w) {
        lo = min(lo, sRed[w]);
        hi = max(hi, sRed[SELECT_WARPS + w]);
    }
    lo += 1u;  // the smallest sampled key (0 when none)

    // t: the low end of a group of sampled keys that holds the ks-th largest, narrowed by levels of
    // equal bins over the group's range (as row_select_regs) until the group holds at most 8
    // samples or one key value; at least ks samples are >= t
    u32 thr = lo;
    if (hi >= lo && hi > 0u) {
        // the sample rank that puts about `expect` of the row's len columns at or above t
        int remaining = (int)min((long long)FILTER_SAMPLES,
                                 max(1LL, ((long long)expect * FILTER_SAMPLES + len - 1) / len));
        for (int level = 0; level < 3; ++level) {
            const RangeLevel L = range_level(smp, lo, hi, remaining, sHist, sScan, sMisc);
            if (L.total < remaining) break;  // fewer samples than the rank at all (first level only)
            remaining -= L.above;
            thr = L.blo;
            if (L.in_bin <= 8 || L.sh == 0) break;
            lo = L.blo;
            hi = L.bhi;
        }
    }
    thr = max(thr, 2u);  // NaN (key 1) and HISA_KEY_NONE are never candidates

    for (int c = blockIdx.x; c < P; c += gridDim.x) {
        const int first = c * FILTER_CHUNK + tid * R;
        const long long base = ((long long)t * P + c) * cap;  // the chunk's slots in the row's list
        const bool outside = c * FILTER_CHUNK >= hi_col || (c + 1) * FILTER_CHUNK <= lo_col;  // uniform
        int total = 0;
        if (!outside) {
            if (c != (int)blockIdx.x) load_row_keys<SRC>(words, lo_col, hi_col, first, key);
            // keep key >= thr in position order: slots from one block scan of per-thread counts
            u32 keep = 0u;
#pragma unroll
            for (int j = 0; j < R; ++j) keep |= (u32)(key[j] >= thr) << j;
            int slot = block_exclusive_scan(__popc(keep), sScan, &total);
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const int s = (keep >> j) & 1u;
                if (s && slot < cap) {
                    cand_word[base + slot] = words[first + j];
                    cand_idx[base + slot] = first + j;
                }
                slot += s;
            }
        }
        for (int i = total + tid; i < cap; i += SELECT_THREADS) {
            cand_word[base + i] = fill;
            cand_idx[base + i] = -1;
        }
        if (tid == 0) counts[(long long)t * P + c] = total;
    }
}

// step 2: the top k of the rows whose candidates hold it; `failed` marks the others
template <int SRC, bool REGS>
__device__ __forceinline__ void filtered_select(const SelectArgs& a, const int* counts, int P, int cap, int* failed) {
    const int t = a.row0 + (int)blockIdx.x;
    int kept = 0;
    bool over = false;
    for (int i = 0; i < P; ++i) {  // every thread reads the same P counts
        const int n = counts[(long long)t * P + i];
        kept += min(n, cap);
        over |= n > cap;
    }
    if (over || kept < a.k) {
        if (threadIdx.x == 0) failed[t] = 1;
        return;
    }
    if (threadIdx.x == 0) failed[t] = 0;
    if (REGS) row_select_regs<SRC, MAP_GATHER>(a);
    else row_select<SRC, MAP_GATHER>(a);
}
