// dense.cu — the flat DSA baseline (SPEC §4): token scores of every key in [ks, ke) for a chunk of
// query rows (score_tile, ITEMS_TOKENS; tiles past the causal edge are skipped), then the exact
// top-k (row_select, MAP_TOKENS; long rows through row_filter.cuh's sampled threshold). The host
// processes row chunks so the workspace stays bounded. For long rows of fp8 keys on Hopper the
// host takes threshold mode instead (the end of this file): the keys are never all written.
#include "common.cuh"
#include "score_tile.cuh"
#include "score_wgmma.cuh"
#include "row_select.cuh"
#include "row_filter.cuh"

template <int ENGINE, int QDT, int KDT, int H, int D, int ROWS>
__global__ void __launch_bounds__(SCORE_THREADS) dense_score_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    int T, int S, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    grid_dependency_sync();
    score_tile<ENGINE, QDT, KDT, H, D, ITEMS_TOKENS, ROWS>(q, k, weights, kscale, ks, ke, nullptr, T, S, 1, 0, S, 0,
                                                           row0, nrows, out, ld, tiles_per_cta);
}

// the same on Hopper: wgmma engine (score_wgmma.cuh), sm_90a only
template <int ENGINE, int QDT, int KDT, int H, int D, int ROWS>
__global__ void __launch_bounds__(SCORE_THREADS) dense_score_wgmma_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    int T, int S, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    grid_dependency_sync();
    score_tile_wgmma<ENGINE, QDT, KDT, H, D, ITEMS_TOKENS, ROWS>(q, k, weights, kscale, ks, ke, nullptr, T, S, 1, 0,
                                                                 S, 0, row0, nrows, out, ld, tiles_per_cta);
}

// threshold mode: the scores as dense_score_wgmma_kernel, but of each row (of the launch) only the
// keys >= thr[row] go out, unordered, with their columns (score_wgmma.cuh, AppendOut); smem: the
// score kernel's + APPEND_SMEM. Three CTAs per SM as the score kernel (ptxas would take 234 registers)
template <int ENGINE, int QDT, int KDT, int H, int D, int ROWS>
__global__ void __launch_bounds__(SCORE_THREADS, 3) dense_score_append_wgmma_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    int T, int S, int row0, int nrows, const u32* thr, u32* cand_key, int* cand_col, int* count, int cap,
    int tiles_per_cta) {
    grid_dependency_sync();
    score_tile_wgmma<ENGINE, QDT, KDT, H, D, ITEMS_TOKENS, ROWS, true>(
        q, k, weights, kscale, ks, ke, nullptr, T, S, 1, 0, S, 0, row0, nrows, nullptr, 0, tiles_per_cta, nullptr,
        AppendOut{thr, cand_key, cand_col, count, cap});
}

__global__ void __launch_bounds__(SELECT_THREADS) dense_topk_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_U32, MAP_TOKENS>(SELECT_ARGS);
}

// short rows in position order: one warp per row (row_select_warp), WARP_SELECT_ROWS rows per CTA
__global__ void __launch_bounds__(32 * WARP_SELECT_ROWS) dense_topk_warp_kernel(SELECT_PARAMS, int rows) {
    grid_dependency_sync();
    row_select_warp<KEYS_U32, MAP_TOKENS>(SELECT_ARGS, rows);
}

__global__ void __launch_bounds__(SELECT_THREADS, REG_SELECT_MIN_CTAS) dense_topk_regs_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select_regs<KEYS_U32, MAP_TOKENS>(SELECT_ARGS);
}

// Long rows (cupy_backend._dense, DENSE_FILTER): the filtered top-k of row_filter.cuh over the
// chunk's ranking keys; the launches take row 0 of the chunk as their row 0 (ks / ke offset).
HISA_FILTER_KERNELS(dense, KEYS_U32, MAP_TOKENS)

// ----------------------------------------------------------------------------------------------
// Threshold mode (cupy_backend._dense_threshold, knob DENSE_THRESHOLD): the filtered top-k above
// reads every ranking key the score kernel wrote a second time (2.1 GB at 128K / 4096); here a
// sample of the keys is scored first, gives each row a threshold well below its k-th largest key,
// and the score kernel keeps only the keys at or above it (dense_score_append_wgmma_kernel,
// unordered, with their columns: a few thousand per row), which one select ranks exactly. Rows
// where that cannot be exact (fewer than k kept while keys were dropped, or more than a list
// holds) are scored again whole and take the usual top-k. Launches: dense_sample_kernel, the
// dense score kernel over the sample, dense_sample_threshold_kernel, then per pass of rows the
// appending score kernel and dense_select_unordered_kernel, then per chunk of the key workspace
// dense_score_rescue_wgmma_kernel and dense_rescue_kernel (both return at once without failed rows).

// The sample: key row j * stride + off(j) of each group of `stride` rows (j < ns = S / stride; off a
// hash of j, so that the sample does not alias with runs or periods in the keys: over 48 rows of
// the segments workload at 128K, every 128th key at a fixed offset put 4-37 samples among a row's
// top 2048, hashed offsets 12-28, for an expected 16) copied to k_s (fp8 rows of 128 bytes: 32
// words) with their scales, and each row's range of sample indices [ks_s, ke_s): the samples with
// ks <= their position < ke. Thread 0 also zeroes the call's count of failed pairs.
__device__ __forceinline__ int dense_sample_offset(int j, int stride) {
    u32 x = (u32)j * 0x9E3779B1u;
    x ^= x >> 15;
    return (int)(x % (u32)stride);
}

__global__ void __launch_bounds__(256) dense_sample_kernel(const u32* k, const float* kscale, const int* ks,
                                                           const int* ke, int T, int S, int stride, int ns, u32* k_s,
                                                           float* kscale_s, int* ks_s, int* ke_s, int* fail_count) {
    grid_dependency_sync();  // the call before may still read fail_count (its rescue)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i == 0) *fail_count = 0;
    if (i < (long long)ns * 32) {
        const int j = (int)(i >> 5);
        const long long pos = (long long)j * stride + dense_sample_offset(j, stride);
        k_s[i] = k[pos * 32 + (i & 31)];
        if ((i & 31) == 0) kscale_s[j] = kscale ? kscale[pos] : 1.0f;
    }
    if (i < T) {
        const RowRange rr = row_range(ks, ke, (int)i, T, S);
        // the first sample at or past position x (positions ascend with j): j0 = x / stride, or the
        // next one where j0's offset lies below x
        auto first_at = [&](int x) {
            const int j0 = x / stride;
            if (j0 >= ns) return ns;
            return j0 + (j0 * stride + dense_sample_offset(j0, stride) < x ? 1 : 0);
        };
        const int a = first_at(rr.ks);
        ks_s[i] = a;
        ke_s[i] = max(a, first_at(rr.ke));
    }
}

// Each row's threshold: the rank-th largest of its sampled keys ([T, ld], ns <= 32 PER columns),
// built bit by bit from warp sums (one warp per row, WARP_SELECT_ROWS rows per CTA); 1 (every
// candidate is kept, NaN included) where the row has fewer sampled candidates than `rank`.
template <int PER>
__global__ void __launch_bounds__(32 * WARP_SELECT_ROWS) dense_sample_threshold_kernel(const u32* keys_s, long long ld,
                                                                                      int ns, int T, int rank,
                                                                                      u32* thr) {
    grid_dependency_sync();
    const int lane = threadIdx.x & 31;
    const int t = blockIdx.x * WARP_SELECT_ROWS + (threadIdx.x >> 5);
    if (t >= T) return;
    u32 key[PER];
    int valid = 0;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int n = lane + 32 * i;
        key[i] = n < ns ? keys_s[(long long)t * ld + n] : 0u;
        valid += key[i] >= 1u;
    }
    valid = warp_sum(valid);
    u32 prefix = 0u;
    if (valid >= rank) {
        for (int b = 31; b >= 0; --b) {
            const u32 cand = prefix | (1u << b);
            if (warp_sum(count_at_least(key, cand)) >= rank) prefix = cand;
        }
    }
    if (lane == 0) thr[t] = max(prefix, 1u);
}

// The top k of each row's unordered candidate list (cand_key / cand_col [rows, cap], count
// [rows]; cap <= REG_SELECT_ITEMS) in register mode: entries (key, column) are unique, so the
// threshold levels over the keys, then, for ties at the threshold key, levels over the tied
// columns, select exactly the top k under SPEC §3; the selected entries go out through list
// mode's sort (by score, or by position). A row is marked in `failed` (and left) where its list
// overflowed or holds fewer than k keys while its threshold (above 1: NaN's key) dropped some, and
// its row pair (rows 2p, 2p + 1) is added to fail_pairs. count[row] goes back to 0.
__global__ void __launch_bounds__(SELECT_THREADS, 2) dense_select_unordered_kernel(
    SELECT_PARAMS, const u32* cand_key, const int* cand_col, int* count, int cap, const u32* thr, int* failed,
    int* fail_count, int* fail_pairs) {
    grid_dependency_sync();
    const SelectArgs a = SELECT_ARGS;
    constexpr int R = REG_SELECT_R, THREADS = SELECT_THREADS;
    extern __shared__ __align__(16) char smem[];
    int* sHist = reinterpret_cast<int*>(smem);
    int* sScan = sHist + SORT_BINS;
    int* sMisc = sScan + 32;
    u64* sSel = reinterpret_cast<u64*>(sMisc + 32);
    u64* sAux = sSel + a.sort_cap;
    u32* sRed = reinterpret_cast<u32*>(sHist);
    const int tid = threadIdx.x;
    const long long row = blockIdx.x;
    const int t = a.row0 + (int)row;
    const int n = count[row];
    const int kk = a.k;
    const bool ok = n <= cap && n <= REG_SELECT_ITEMS && (n >= kk || thr[row] <= 1u);
    __syncthreads();  // every thread has read count
    if (tid == 0) {
        count[row] = 0;
        failed[t] = ok ? 0 : 1;
        if (!ok) fail_pairs[atomicAdd(fail_count, 1)] = t >> 1;  // the rescue's list (a pair may come twice)
    }
    if (!ok) return;
    u32 key[R];
    int col[R];
    const int first = tid * R;
#pragma unroll
    for (int j = 0; j < R; ++j) {
        const int i = first + j;
        key[j] = i < n ? cand_key[row * cap + i] : HISA_KEY_NONE;
        col[j] = i < n ? cand_col[row * cap + i] : 0;
    }
    u32 mn = 0xFFFFFFFFu, mx = 0u;
#pragma unroll
    for (int j = 0; j < R; ++j) {
        mn = min(mn, key[j] - 1u);
        mx = max(mx, key[j]);
    }
    warps_min_max<THREADS>(mn, mx, sRed);
    combine_warps_min_max<THREADS>(sRed, sMisc);
    __syncthreads();
    const u32 lo = (u32)sMisc[MISC_RED_LO] + 1u, key_hi = (u32)sMisc[MISC_RED_HI];
    __syncthreads();
    // every list entry is a candidate (key >= thr >= 1)
    const int n_out = min(kk, n);
    u64 cut = 1u, ccut = 0u;  // cut 1: every candidate
    bool ties = false, col_ties = false;
    u32 tie = 0u, col_tie = 0u;
    int need = 0, col_need = 0;
    if (n > kk && kk > 0) {
        cut_by_levels<R, THREADS>(key, lo, key_hi, kk, sHist, sScan, sMisc, cut, ties, tie, need);
        if (ties) {  // the `need` tied entries with the lowest columns: levels over ~column (unique, so
                     // no ties among them)
            u32 tk[R];
#pragma unroll
            for (int j = 0; j < R; ++j) tk[j] = key[j] == tie ? ~(u32)col[j] : 0u;
            cut_by_levels<R, THREADS>(tk, 1u, 0xFFFFFFFFu, need, sHist, sScan, sMisc, ccut, col_ties, col_tie, col_need);
        }
    }
    const u32 above = (u32)(cut - 1u);
    u32 sel = 0u;
#pragma unroll
    for (int j = 0; j < R; ++j) {
        const bool s = key[j] > above || (ties && key[j] == tie && (u64)~(u32)col[j] >= ccut);
        sel |= (u32)(s && key[j] != HISA_KEY_NONE) << j;
    }
    int total;
    int slot = block_exclusive_scan<THREADS>(__popc(sel), sScan, &total);
#pragma unroll
    for (int j = 0; j < R; ++j) {
        const int s = (sel >> j) & 1u;
        if (s && slot < n_out) sSel[slot] = list_entry(key[j], col[j]);
        slot += s;
    }
    __syncthreads();
    const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
    if (a.by_score) {
        const u32 lowest = n > kk ? (ties ? tie : above + 1u) : lo;
        sort_and_emit<KEYS_U32, MAP_TOKENS, THREADS>(a, row, t, rel, sSel, sAux, n_out, sHist, sScan, sMisc, lowest,
                                                     key_hi);
    } else {
        sort_and_emit<KEYS_U32, MAP_TOKENS, THREADS>(a, row, t, rel, sSel, sAux, n_out, sHist, sScan, sMisc);
    }
    pad_row<KEYS_U32>(a, row, n_out + tid, THREADS);
}

// The rows the select marked, scored whole again into the chunk's key workspace for
// dense_rescue_kernel: the call's failed pairs (fail_pairs, fail_count entries; rows 2p, 2p + 1)
// whose rows lie in the chunk [row0, row0 + nrows) (row0 even), CTA (x, y) taking tile group x of
// entries y, y + gridDim.y, ...; with no failed pair every CTA returns at once.
template <int ENGINE, int QDT, int KDT, int H, int D, int ROWS>
__global__ void __launch_bounds__(SCORE_THREADS) dense_score_rescue_wgmma_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    int T, int S, int row0, int nrows, u32* out, long long ld, int tiles_per_cta, const int* fail_count,
    const int* fail_pairs) {
    grid_dependency_sync();
    static_assert(ROWS == 2, "row pairs");
    const int nf = *fail_count;
    for (int i = blockIdx.y; i < nf; i += gridDim.y) {
        const int local0 = 2 * fail_pairs[i] - row0;
        if (local0 < 0 || local0 >= nrows) continue;  // uniform
        score_tile_wgmma<ENGINE, QDT, KDT, H, D, ITEMS_TOKENS, ROWS>(
            q, k, weights, kscale, ks, ke, nullptr, T, S, 1, 0, S, 0, row0, nrows, out, ld, tiles_per_cta, nullptr,
            AppendOut{nullptr, nullptr, nullptr, nullptr, 0}, local0);
        __syncthreads();  // the next pair reuses the shared memory
    }
}
