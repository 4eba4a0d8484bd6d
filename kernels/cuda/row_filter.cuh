// row_filter.cuh — exact top-k of long rows through a sampled threshold (hisa_cupy.topk and
// dense_select over rows of tens of thousands of keys with k of a few thousand). Three launches:
//
// 1. row_filter (one kernel per key source): a row is P chunks of FILTER_CHUNK columns, taken by
//    a few CTAs each (grid: CTAs per row x rows; about one wave), which claim the row's chunks in
//    order (an atomic counter per row, next_chunk). Every CTA of a row estimates the same
//    threshold t from FILTER_SAMPLES keys sampled evenly over the row's range (single columns:
//    top keys that cluster in a few places of a row move a sample of contiguous runs a lot; t is
//    about the ks-th largest sample, with ks = expect * 2048 / len so that about `expect`
//    columns lie at or above it). Each chunk's columns with key >= t (never NaN or
//    not-a-candidate: t >= 2) go, word and column, into the row's list of n slots at the chunk's
//    offset, which a single-pass scan over the chunks gives (decoupled look-back: a chunk posts
//    its count, then adds up its predecessors' counts back to one that posted its running total,
//    and posts its own; a chunk waits only on chunks claimed before it, by CTAs that are
//    running). So the list is in column order whatever the spread of the kept columns over the
//    row, and only its total is bounded. states[row, P - 1] ends as the row's total (above n:
//    overflow); the last chunk writes the fill word past the total (fp32 scores: NaN, which
//    ranks below every kept value; ranking keys: HISA_KEY_NONE) and -1. A row whose range is
//    shorter than `min_len` is not filtered: its total says overflow.
// 2. filtered_select: a row whose list holds at least k columns and did not overflow has its top
//    k among them, since every column at or above the k-th largest key is >= t. The list is in
//    column order, so ties still go to the lower column (MAP_GATHER with B = 1 reads each
//    candidate's column). Other rows (sorted, tied or mostly NaN rows, short ranges, a sample
//    far off) are marked in `failed` and left. It also zeroes the row's states and next_chunk,
//    so that they are zero again for the next call (the workspace starts them at zero).
// 3. The rescue kernels (topk.cu, dense.cu): the marked rows over the whole row, the usual way;
//    the CTAs of the other rows return at once.
#pragma once
#include "common.cuh"
#include "row_select.cuh"

#define FILTER_CHUNK 8192     // columns per chunk: 16 per thread (cupy_backend.TOPK_FILTER_CHUNK)
#define FILTER_SAMPLES 2048   // sampled keys per row, 4 per thread (cupy_backend.TOPK_FILTER_SAMPLES)
static_assert(FILTER_CHUNK == SELECT_THREADS * REG_SELECT_R, "a chunk is one column per thread and register");
static_assert(FILTER_SAMPLES % SELECT_THREADS == 0, "samples per thread");

// The register-mode select of step 2 in one wave (no more rows than SMs, one CTA per row: the
// latency-bound case, e.g. hisa_cupy.topk over [64 x 131072], dense_select for up to 132 query
// rows) runs 1024 threads of 8 candidates each instead of 512 of 16 (STEM_filtered_wide_kernel)
#define FILTER_WIDE_THREADS 1024
#define FILTER_STAGE REG_SELECT_BINS  // kept columns of a chunk staged in shared memory (sHist's room)
#define FILTER_STATE_POSTED 0x40000000u  // states: the chunk's own count is posted
#define FILTER_STATE_TOTAL 0x80000000u   // states: the total of chunks 0.. up to this one is posted
#define FILTER_STATE_VALUE 0x3FFFFFFFu

// keys (SRC = KEYS_U32, e.g. dense's ranking keys) or fp32 scores [rows, ld]: CTA (x, y) takes
// chunks of row y, which is row t = row0 + y of T (row_range, and the index of its candidate
// slots [t, n], states [t, P], next_chunk [t] and, in step 2, failed [t], as MAP_GATHER indexes
// its blocks by t); `ranged`: the columns [ks, ke) of row_range, else [0, ncols)
#define FILTER_PARAMS                                                                              \
    const u32 *keys, const float *scores, long long ld, int ncols, int row0, int T, int S,        \
        const int *ks, const int *ke, int ranged, int P, int expect, int n, int min_len,          \
        u32 *cand_word, int *cand_idx, u32 *states, int *next_chunk
#define FILTER_ARGS \
    keys, scores, ld, ncols, row0, T, S, ks, ke, ranged, P, expect, n, min_len, cand_word, cand_idx, states, next_chunk

// score_key(f) >= t for a key threshold t >= 2 as one float comparison: f >= the smallest score
// whose key is >= t (NaN, key 1, fails both). The IEEE comparison, not the -ftz one: subnormal
// scores have keys of their own.
struct ScoreThreshold {
    float v;
    __device__ __forceinline__ explicit ScoreThreshold(u32 t) {
        // a threshold at or below the key of -inf passes every number: v = -inf
        v = __uint_as_float(score_key_bits(max(t, HISA_KEY_NEG_INF)));
    }
    __device__ __forceinline__ u32 passes(float f) const {  // 1 or 0
        u32 r;
        asm("{\n\t.reg .pred p;\n\tsetp.ge.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(f), "f"(v));
        return r;
    }
};

template <int SRC>
__device__ void row_filter(FILTER_PARAMS) {
    constexpr int R = REG_SELECT_R;
    constexpr int PER = FILTER_SAMPLES / SELECT_THREADS;
    __shared__ int sHist[REG_SELECT_BINS];
    __shared__ int sScan[32];
    __shared__ int sMisc[32];
    __shared__ u32 sRed[2 * SELECT_WARPS];
    __shared__ int sChunk, sOffset, sNext[2];
    __shared__ int sStageIdx[2][FILTER_STAGE];
    __shared__ u32 sStageWord1[FILTER_STAGE];
    // the two stages' words: stage 0 in sHist's room, once the threshold is found
    auto stage_words = [&](int stage) { return stage ? sStageWord1 : reinterpret_cast<u32*>(sHist); };
    const int tid = threadIdx.x;
    const long long row = blockIdx.y;
    const int t = row0 + (int)row;
    const u32* words = SRC == KEYS_U32 ? keys + row * ld : reinterpret_cast<const u32*>(scores + row * ld);
    u32* state = states + (long long)t * P;
    int lo_col = 0, hi_col = ncols;
    if (ranged) {
        const RowRange rr = row_range(ks, ke, t, T, S);
        lo_col = rr.ks;
        hi_col = min(rr.ke, ncols);
    }
    const int len = max(0, hi_col - lo_col);
    if (len < max(min_len, 1)) {  // not worth filtering: the row's total says overflow, the row is redone
        if (blockIdx.x == 0 && tid == 0) state[P - 1] = FILTER_STATE_TOTAL | min((u32)n + 1u, FILTER_STATE_VALUE);
        return;
    }
    // The row's chunks in claim order: a CTA alone on its row (gridDim.x == 1, e.g. dense's
    // chunks of many rows) takes 0, 1, ... without claims; otherwise each claim is an atomic on
    // the row's counter, issued two chunks ahead by thread 0 (the chunk after the current one
    // was claimed while the chunk before it ran, so no atomic's round trip is waited for).
    // Claiming ahead keeps the look-back free of deadlock: a CTA holds its current chunk and at
    // most two higher ones, so the lowest chunk not yet posted is some CTA's current chunk, and
    // it waits only on lower chunks, all posted.
    const bool alone = gridDim.x == 1;
    int c = 0;
    int pending = 1;  // (thread 0) the chunk after c
    if (!alone) {
        if (tid == 0) sChunk = atomicAdd(next_chunk + t, 1);
        __syncthreads();
        c = sChunk;
        if (tid == 0) pending = atomicAdd(next_chunk + t, 1);
    }
    if (c >= P) return;  // uniform

    // the first chunk's words, raw (candidates are written as read), issued first so that their
    // loads overlap the threshold search
    u32 w[R];
    load_row_keys<SRC, true>(words, lo_col, hi_col, c * FILTER_CHUNK + tid * R, w);

    // the sample: columns lo_col + floor(i * len / FILTER_SAMPLES); thread tid holds samples
    // tid, tid + 512, ...
    u32 smp[PER];
    u32 mn = 0xFFFFFFFFu, mx = 0u;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
        const int i = tid + u * SELECT_THREADS;
        const long long col = lo_col + (long long)i * len / FILTER_SAMPLES;
        smp[u] = word_key<SRC>(__ldg(words + col));
        mn = min(mn, smp[u] - 1u);  // HISA_KEY_NONE wraps to the largest value
        mx = max(mx, smp[u]);
    }
    warps_min_max(mn, mx, sRed);
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
        // fp32 scores whose samples are all numbers: first one level of bins by value
        // (LinearBins), where randn-like samples land one or two to a bin; t is the lowest
        // sampled key of the bin that holds the remaining-th largest
        bool found = false;
        if (SRC == KEYS_F32 && lo > HISA_KEY_NEG_INF && hi < 0xFF800000u) {
            const LinearBins bins(lo, hi, REG_SELECT_BINS);
            u32* sLow = reinterpret_cast<u32*>(sMisc + MISC_RED_LO);  // the bin's lowest sampled key
#pragma unroll
            for (int u = 0; u < REG_SELECT_BINS / SELECT_THREADS; ++u) sHist[tid + u * SELECT_THREADS] = 0;
            if (tid == 0) *sLow = 0xFFFFFFFFu;
            __syncthreads();
#pragma unroll
            for (int u = 0; u < PER; ++u) atomicAdd(&sHist[bins(smp[u])], 1);
            __syncthreads();
            find_bin(sHist, REG_SELECT_BINS, remaining, sScan, sMisc);  // every sample is counted: total >= remaining
            const int b = sMisc[MISC_BIN];
            found = sHist[b] <= 8;  // uniform
            if (found) {
#pragma unroll
                for (int u = 0; u < PER; ++u)
                    if (bins(smp[u]) == b) atomicMin(sLow, smp[u]);
                __syncthreads();
                thr = *sLow;
            }
            __syncthreads();  // sHist / sMisc are read before the levels or the stage reuse them
        }
        for (int level = 0; level < 3 && !found; ++level) {
            const RangeLevel L = range_level(smp, lo, hi, remaining, sHist, sScan, sMisc);
            if (L.total < remaining) break;  // fewer samples than the rank at all (first level only)
            remaining -= L.above;
            thr = L.blo;
            if (L.in_bin <= 8 || L.sh == 0) break;
            lo = L.blo;
            hi = L.bhi;
        }
    }
    thr = max(thr, HISA_KEY_NAN + 1u);  // NaN and HISA_KEY_NONE are never candidates
    const ScoreThreshold score_thr(thr);
    const u32 fill = never_kept_word<SRC>();  // the slots past the row's total
    // chunk c holds none of the row's columns [lo_col, hi_col): nothing to load or keep
    auto chunk_outside = [&](int c) { return c * FILTER_CHUNK >= hi_col || (c + 1) * FILTER_CHUNK <= lo_col; };

    // Per chunk: its kept words are staged in shared memory in position order (when they fit),
    // which frees w for the next chunk's loads; those are issued at once. The chunk's offset in
    // the row's list (look-back) is found one chunk later, while this CTA ranks its next chunk, so
    // that the chunks before it, taken by other CTAs of the row, have posted their counts by then
    // and the look-back seldom waits; two stages alternate. A chunk that keeps more than a stage
    // holds is written from the registers at once (its look-back cannot wait).
    int prev_c = -1;       // (thread 0) this CTA's last chunk with an offset, and its running total
    u32 prev_total = 0u;
    bool loaded = true;    // w holds chunk c (the first chunk's words were loaded above)
    int pend_c = -1, pend_total = 0;  // the chunk staged last, its offset not found yet (-1: none)
    // thread 0: the offset of chunk x (after those of this CTA's chunks before it), posted with x's
    // running total as sOffset; every thread then reads it past a barrier
    auto find_offset = [&](int x, int x_total) {
        u32 offset = 0u;
        if (x > 0 && x - 1 == prev_c) {
            offset = prev_total;  // the chunk before is this CTA's own: nothing to wait for
        } else if (x > 0) {
            for (int j = x - 1; j >= 0; --j) {
                if (j == prev_c) {  // this CTA's own last chunk: its running total
                    offset += prev_total;
                    break;
                }
                u32 v;
                do v = *reinterpret_cast<volatile u32*>(state + j);
                while (v == 0u);
                offset += v & FILTER_STATE_VALUE;
                if (v & FILTER_STATE_TOTAL) break;
            }
        }
        prev_c = x;
        prev_total = min(offset + (u32)x_total, FILTER_STATE_VALUE);
        __stcg(state + x, FILTER_STATE_TOTAL | prev_total);
        sOffset = (int)min(offset, (u32)n);
    };
    // the row's last chunk: the slots past its total
    auto fill_tail = [&](int x, int offset, int x_total) {
        if (x == P - 1) {
            for (int i = offset + x_total + tid; i < n; i += SELECT_THREADS) {
                cand_word[(long long)t * n + i] = fill;
                cand_idx[(long long)t * n + i] = -1;
            }
        }
    };
    // the pending chunk out of its stage to its offset
    auto flush_pending = [&](int stage) {
        if (tid == 0) find_offset(pend_c, pend_total);
        __syncthreads();  // sOffset is visible
        const int offset = sOffset;
        const long long base = (long long)t * n + offset;
        for (int i = tid; i < pend_total && offset + i < n; i += SELECT_THREADS) {
            cand_word[base + i] = stage_words(stage)[i];
            cand_idx[base + i] = sStageIdx[stage][i];
        }
        fill_tail(pend_c, offset, pend_total);
        pend_c = -1;
    };
    int pend_stage = 0;
    for (int iter = 0; c < P; ++iter) {
        int ahead = 0;  // (thread 0) the chunk after the next one, claimed now
        if (!alone && tid == 0) ahead = atomicAdd(next_chunk + t, 1);
        const int first = c * FILTER_CHUNK + tid * R;
        u32 keep = 0u;  // this thread's words with key >= thr, as bits
        if (!chunk_outside(c)) {  // uniform
            if (!loaded) load_row_keys<SRC, true>(words, lo_col, hi_col, first, w);
#pragma unroll
            for (int j = 0; j < R; ++j) {
                // fp32 scores: compared as floats (no key conversion per word)
                const u32 pass = SRC == KEYS_F32 ? score_thr.passes(__uint_as_float(w[j])) : (u32)(w[j] >= thr);
                keep |= pass << j;
            }
        }
        // the next chunk for every thread, past the scan: sNext[iter & 1] is written again two
        // chunks on, past the next chunk's scan, which every thread reaches only after reading it
        if (tid == 0) sNext[iter & 1] = alone ? c + 1 : pending;
        int total;  // the chunk's kept words; slot: this thread's first among them
        int slot = block_exclusive_scan(__popc(keep), sScan, &total);
        const int c_next = sNext[iter & 1];
        // this chunk's count, for the look-backs of the chunks after it (chunk 0: its total)
        if (tid == 0) __stcg(state + c, (c == 0 ? FILTER_STATE_TOTAL : FILTER_STATE_POSTED) | (u32)total);
        const bool staged = total <= FILTER_STAGE;  // uniform
        loaded = false;
        if (staged) {
            // the stage not holding the pending chunk (a stage is written again only past the
            // scans of the chunk after its copy-out)
            const int stage = pend_c >= 0 ? pend_stage ^ 1 : pend_stage;
            int s = slot;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if ((keep >> j) & 1u) {
                    stage_words(stage)[s] = w[j];
                    sStageIdx[stage][s] = first + j;
                    ++s;
                }
            }
            if (c_next < P && !chunk_outside(c_next)) load_row_keys<SRC, true>(words, lo_col, hi_col, c_next * FILTER_CHUNK + tid * R, w);
            loaded = true;  // (an outside chunk loads nothing)
            if (pend_c >= 0) flush_pending(pend_stage);
            pend_c = c;
            pend_total = total;
            pend_stage = stage;
        } else {  // more than a stage holds: the pending chunk out, then this one from the registers
            if (pend_c >= 0) {
                flush_pending(pend_stage);
                __syncthreads();  // sOffset is read before it is written again
            }
            if (tid == 0) find_offset(c, total);
            __syncthreads();
            const int offset = sOffset;
            const long long base = (long long)t * n + offset;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                const int s = (keep >> j) & 1u;
                if (s && offset + slot < n) {
                    cand_word[base + slot] = w[j];
                    cand_idx[base + slot] = first + j;
                }
                slot += s;
            }
            fill_tail(c, offset, total);
        }
        c = c_next;
        pending = ahead;
    }
    if (pend_c >= 0) {
        __syncthreads();  // the last copy-out's offset is read before it is written again
        flush_pending(pend_stage);
    }
}

// step 2: the top k of the rows whose candidates hold it; `failed` marks the others. The row's
// states and next_chunk go back to zero. `early`: see grid_dependents_launch. THREADS: the CTA
// size of register mode (REGS), SELECT_THREADS or FILTER_WIDE_THREADS
template <int SRC, bool REGS, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void filtered_select(const SelectArgs& a, u32* states, int P, int n, int* next_chunk,
                                                int* failed, int early) {
    // early (a launch of one wave): the rescue is launched now, its CTAs wait for this grid's end
    // on SMs this one leaves free, and start as it ends instead of a launch later
    if (early) grid_dependents_launch();
    const int t = a.row0 + (int)blockIdx.x;
    const u32 v = states[(long long)t * P + P - 1];
    const int kept = (int)(v & FILTER_STATE_VALUE);
    const bool ok = (v & FILTER_STATE_TOTAL) && kept <= n && kept >= a.k;
    __syncthreads();  // every thread has read the row's total
    if (threadIdx.x < P) states[(long long)t * P + threadIdx.x] = 0u;
    if (threadIdx.x == 0) {
        next_chunk[t] = 0;
        failed[t] = ok ? 0 : 1;
    }
    if (!ok) return;
    if (REGS) row_select_regs<SRC, MAP_GATHER, 2048, SORT_BITS, THREADS>(a);  // fp32 scores: one level of 2048 bins by value
    else row_select<SRC, MAP_GATHER>(a);
}

// The five kernels of a filtered top-k over SRC words, whose rescue ranks whole rows with MAP
// (topk.cu: fp32 scores, MAP_IDENTITY; dense.cu: ranking keys, MAP_TOKENS), named as
// cupy_backend._filtered_top_k launches them: STEM_filter_kernel, STEM_filtered_kernel,
// STEM_filtered_regs_kernel (register mode), STEM_filtered_wide_kernel (register mode at
// FILTER_WIDE_THREADS, for a launch of one wave) and STEM_rescue_kernel (its CTAs of unmarked rows
// return at once).
#define HISA_FILTER_KERNELS(STEM, SRC, MAP)                                                              \
    __global__ void __launch_bounds__(SELECT_THREADS) STEM##_filter_kernel(FILTER_PARAMS) {                 \
        grid_dependency_sync();                                                                          \
        row_filter<SRC>(FILTER_ARGS);                                                                    \
    }                                                                                                    \
    __global__ void __launch_bounds__(SELECT_THREADS)                                                    \
        STEM##_filtered_kernel(SELECT_PARAMS, u32* states, int P, int n, int* next_chunk, int* failed,    \
                               int early) {                                                              \
        grid_dependency_sync();                                                                          \
        filtered_select<SRC, false>(SELECT_ARGS, states, P, n, next_chunk, failed, early);               \
    }                                                                                                    \
    __global__ void __launch_bounds__(SELECT_THREADS, REG_SELECT_MIN_CTAS)                               \
        STEM##_filtered_regs_kernel(SELECT_PARAMS, u32* states, int P, int n, int* next_chunk, int* failed, \
                                    int early) {                                                         \
        grid_dependency_sync();                                                                          \
        filtered_select<SRC, true>(SELECT_ARGS, states, P, n, next_chunk, failed, early);                \
    }                                                                                                    \
    __global__ void __launch_bounds__(FILTER_WIDE_THREADS, 1)                                            \
        STEM##_filtered_wide_kernel(SELECT_PARAMS, u32* states, int P, int n, int* next_chunk, int* failed, \
                                    int early) {                                                         \
        grid_dependency_sync();                                                                          \
        filtered_select<SRC, true, FILTER_WIDE_THREADS>(SELECT_ARGS, states, P, n, next_chunk, failed,   \
                                                        early);                                          \
    }                                                                                                    \
    __global__ void __launch_bounds__(SELECT_THREADS) STEM##_rescue_kernel(SELECT_PARAMS, const int* failed) { \
        grid_dependency_sync();                                                                          \
        if (failed[row0 + (int)blockIdx.x] == 0) return;                                                 \
        row_select<SRC, MAP>(SELECT_ARGS);                                                               \
    }
