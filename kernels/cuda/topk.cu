// topk.cu — the standalone exact row top-k (hisa_cupy.topk): fp32 scores [R, N] with optional
// per-row lengths, SPEC §3 ranking, values and int32 indices in rank order, -1 / -inf padding.
#include "common.cuh"
#include "row_select.cuh"

__global__ void __launch_bounds__(SELECT_THREADS) topk_kernel(SELECT_PARAMS) {
    row_select<KEYS_F32, MAP_IDENTITY>(SELECT_ARGS);
}

__global__ void __launch_bounds__(SELECT_THREADS, 2) topk_regs_kernel(SELECT_PARAMS) {
    row_select_regs<KEYS_F32, MAP_IDENTITY>(SELECT_ARGS);
}

// Few long rows, split (cupy_backend._topk_split): each row is m chunks of B columns, one CTA per
// chunk keeps the chunk's top k in position order with their values (MAP_CHUNKS: positions in the
// whole row); then one CTA per row ranks the m * k kept values, whose order by chunk then position
// is the row's position order, so ties still go to the lower column (MAP_GATHER with B = 1 reads
// each kept item's column back). The row's top k are among the chunks' top k: an item that fewer
// than k items of the row outrank has fewer than k outranking it in its chunk.
__global__ void __launch_bounds__(SELECT_THREADS) topk_chunks_kernel(SELECT_PARAMS) {
    row_select<KEYS_F32, MAP_CHUNKS>(SELECT_ARGS);
}

__global__ void __launch_bounds__(SELECT_THREADS) topk_merge_kernel(SELECT_PARAMS) {
    row_select<KEYS_F32, MAP_GATHER>(SELECT_ARGS);
}

// the merge of at most REG_SELECT_ITEMS kept items per row (P * k; two chunks of k = 2048) in
// register mode
__global__ void __launch_bounds__(SELECT_THREADS, 2) topk_merge_regs_kernel(SELECT_PARAMS) {
    row_select_regs<KEYS_F32, MAP_GATHER>(SELECT_ARGS);
}

// ----------------------------------------------------------------------------------------------
// Filtered top-k over long rows (cupy_backend._topk_filter; k small against N, e.g. 2048 of 131072).
// Exact, in three launches:
// 1. topk_filter_kernel: a row is P chunks of FILTER_CHUNK columns, taken by a few CTAs each
//    (grid: CTAs per row x rows; about one wave). Every CTA of a row estimates the same threshold
//    t from FILTER_SAMPLES sampled keys of the row (64 segments of 32 columns spread over it: t is
//    about the ks-th largest sample, the host picks ks so that about 2k columns of the row lie at
//    or above it, more for small k), then keeps the columns of its chunks with key >= t (NaN never: t >= 2) in
//    position order, value and column, in each chunk's `cap` slots of the row's candidate list;
//    the slots past a chunk's count get NaN (which ranks below every kept value) and -1, and
//    counts[row, chunk] gets the count (above cap: overflow).
// 2. topk_filtered_kernel: a row whose chunks all fit and that kept at least k columns has its top k
//    among its candidates: every column with key >= the k-th largest is kept, because at least k
//    columns are >= t. The candidates are in chunk order then position order, i.e. column order,
//    so ties still go to the lower column (MAP_GATHER with B = 1 reads each candidate's column).
//    Other rows (skewed or tied data, or a sample far off) are marked in `failed` and left.
// 3. topk_rescue_kernel: the marked rows, from scratch over the whole row (topk_kernel's path);
//    the other CTAs return at once.

#define FILTER_CHUNK 8192     // columns per chunk: 16 per thread (cupy_backend.TOPK_FILTER_CHUNK)
#define FILTER_SAMPLES 2048   // sampled keys per row, 4 per thread (cupy_backend.TOPK_FILTER_SAMPLES)
#define FILTER_SEGMENTS (FILTER_SAMPLES / 32)
static_assert(FILTER_CHUNK == SELECT_THREADS * REG_SELECT_R, "a chunk is one column per thread and register");
static_assert(FILTER_SAMPLES % SELECT_THREADS == 0, "samples per thread");

// the keys of columns [first, first + R) of a row (HISA_KEY_NONE past N)
__device__ __forceinline__ void filter_load(const float* src, int N, int first, u32 (&key)[REG_SELECT_R]) {
    constexpr int R = REG_SELECT_R;
    if ((reinterpret_cast<unsigned long long>(src) & 15ull) == 0ull && first + R <= N) {
        const uint4* vec = reinterpret_cast<const uint4*>(src + first);
#pragma unroll
        for (int u = 0; u < R / 4; ++u) {
            const uint4 x = __ldg(vec + u);
            key[4 * u] = score_key(__uint_as_float(x.x));
            key[4 * u + 1] = score_key(__uint_as_float(x.y));
            key[4 * u + 2] = score_key(__uint_as_float(x.z));
            key[4 * u + 3] = score_key(__uint_as_float(x.w));
        }
    } else {
#pragma unroll
        for (int j = 0; j < R; ++j) key[j] = first + j < N ? score_key(__ldg(src + first + j)) : HISA_KEY_NONE;
    }
}

// grid (CTAs per row, rows); CTA x of a row takes chunks x, x + gridDim.x, ... of the row's P
__global__ void __launch_bounds__(SELECT_THREADS) topk_filter_kernel(const float* scores, long long ld, int N, int P,
                                                                    int ks, int cap, float* cand_val, int* cand_idx,
                                                                    int* counts) {
    constexpr int R = REG_SELECT_R;
    constexpr int PER = FILTER_SAMPLES / SELECT_THREADS;
    __shared__ int sHist[REG_SELECT_BINS];
    __shared__ int sScan[32];
    __shared__ int sMisc[32];
    __shared__ u32 sRed[2 * SELECT_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row = blockIdx.y;
    const float* src = scores + row * ld;

    // the first chunk's keys, issued first so that their loads overlap the threshold search
    u32 key[R];
    filter_load(src, N, blockIdx.x * FILTER_CHUNK + tid * R, key);

    // the sample: segment s covers columns [s * (N / 64), + 32); thread i holds samples i, i + 512, ...
    u32 smp[PER];
    u32 mn = 0xFFFFFFFFu, mx = 0u;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
        const int i = tid + u * SELECT_THREADS;
        const long long col = (long long)(i >> 5) * (N / FILTER_SEGMENTS) + (i & 31);
        smp[u] = col < N ? score_key(__ldg(src + col)) : HISA_KEY_NONE;
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
    u32 t = lo;
    if (hi >= lo && hi > 0u) {
        int remaining = ks;
        for (int level = 0; level < 3; ++level) {
            const u32 span = hi - lo;
            const int sh = span < REG_SELECT_BINS ? 0 : 32 - __clz((int)span) - 11;
            const int nb = (int)(span >> sh) + 1;
#pragma unroll
            for (int u = 0; u < REG_SELECT_BINS / SELECT_THREADS; ++u)
                if (tid + u * SELECT_THREADS < nb) sHist[tid + u * SELECT_THREADS] = 0;
            __syncthreads();
#pragma unroll
            for (int u = 0; u < PER; ++u) hist_inc_in_range(sHist, smp[u], lo, span, sh);
            __syncthreads();
            find_bin(sHist, nb, remaining, sScan, sMisc);
            if (sMisc[MISC_TOTAL] < remaining) break;  // fewer than ks samples at all (first level
                                                        // only): t = lo; uniform, so no barrier is skipped
            const int b = sMisc[MISC_BIN];
            const int in_bin = sHist[b];
            remaining -= sMisc[MISC_ABOVE];
            __syncthreads();  // sHist / sMisc are read before the next level clears them
            const u32 blo = lo + ((u32)b << sh);
            const u32 top = blo + (((u32)1u << sh) - 1u);
            t = blo;
            if (in_bin <= 8 || sh == 0) break;
            lo = blo;
            hi = top < blo ? hi : min(hi, top);
        }
    }
    t = max(t, 2u);  // NaN (key 1) is never a candidate

    for (int c = blockIdx.x; c < P; c += gridDim.x) {
        const int first = c * FILTER_CHUNK + tid * R;
        if (c != (int)blockIdx.x) filter_load(src, N, first, key);
        // keep key >= t in position order: slots from one block scan of per-thread counts
        u32 keep = 0u;
#pragma unroll
        for (int j = 0; j < R; ++j) keep |= (u32)(key[j] >= t) << j;
        int total;
        int slot = block_exclusive_scan(__popc(keep), sScan, &total);
        const long long base = (row * P + c) * (long long)cap;  // the chunk's slots in the row's list
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int s = (keep >> j) & 1u;
            if (s && slot < cap) {
                cand_val[base + slot] = src[first + j];
                cand_idx[base + slot] = first + j;
            }
            slot += s;
        }
        for (int i = total + tid; i < cap; i += SELECT_THREADS) {
            cand_val[base + i] = __int_as_float(0x7FC00000);  // NaN: ranks below every kept value
            cand_idx[base + i] = -1;
        }
        if (tid == 0) counts[row * P + c] = total;
    }
}

// the top k of the rows whose candidates hold them (step 2 above); `failed` marks the others
template <bool REGS>
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
    if (REGS) row_select_regs<KEYS_F32, MAP_GATHER>(a);
    else row_select<KEYS_F32, MAP_GATHER>(a);
}

__global__ void __launch_bounds__(SELECT_THREADS) topk_filtered_kernel(SELECT_PARAMS, const int* counts, int P,
                                                                      int cap, int* failed) {
    filtered_select<false>(SELECT_ARGS, counts, P, cap, failed);
}

__global__ void __launch_bounds__(SELECT_THREADS, 2) topk_filtered_regs_kernel(SELECT_PARAMS, const int* counts, int P,
                                                                              int cap, int* failed) {
    filtered_select<true>(SELECT_ARGS, counts, P, cap, failed);
}

// step 3: the rows step 2 marked, over the whole row
__global__ void __launch_bounds__(SELECT_THREADS) topk_rescue_kernel(SELECT_PARAMS, const int* failed) {
    if (failed[row0 + (int)blockIdx.x] == 0) return;
    row_select<KEYS_F32, MAP_IDENTITY>(SELECT_ARGS);
}
