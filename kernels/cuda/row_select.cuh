// row_select.cuh — exact per-row top-k under the SPEC §3 ranking, one CTA per row.
//
// Input: one ranking key per item (common.cuh: 0 = not a candidate, larger = better), either
// precomputed (KEYS_U32, written by score_tile) or derived from fp32 scores and row lengths
// (KEYS_F32, the standalone hisa_cupy.topk). Keys are cached in shared memory when the row fits.
//
// Two algorithms, chosen by the host (`lists`):
//
// * List mode (row_select_lists; k up to a few thousand). Every selected item is collected into
//   a shared-memory list, then the list is put in output order:
//   1. One pass builds a 2048-bin histogram of the top 11 key bits and finds the bin `tb` holding
//      the k-th largest key. A second pass appends the items of higher bins to the selected list
//      and the items of bin `tb` to a candidate list (when they fit; else step 2 runs over all
//      items instead).
//   2. Radix levels (11 then 10 bits) over the candidates narrow the threshold down; a level
//      stops early once every item of its bin is needed.
//   3. Only when items equal to the k-th key must be split (ties at the threshold) does one
//      in-order pass keep the lowest-index ones — ties go to the lower item index, which is the
//      lower position because items are ordered by position.
//   4. The list is sorted by a bucket sort on a 64-bit sort value (score then index, or index
//      alone for position order): buckets are SORT_BINS equal ranges of its 32-bit primary part
//      (the key, or the index), and each item's slot is its bucket's start plus the number of
//      larger values in its bucket. Rows whose largest bucket is too full for that (heavily
//      skewed values, many equal scores) use a bitonic sort instead.
//   Rows not cached are read from global memory, through a ring of cp.async copies where the
//   host gives shared memory for it (`ring`).
// * In-order mode (row_select_inorder; any k): radix select (4 passes of 8 bits, per-warp
//   histograms) finds the k-th key, then an in-order compaction writes positions ascending or,
//   by score, a bitonic sort of the kept items.
#pragma once
#include "common.cuh"

#define KEYS_U32 0
#define KEYS_F32 1

#define MAP_IDENTITY 0  // position = item
#define MAP_TOKENS 1    // position = col0 + item
#define MAP_GATHER 2    // position = blocks[t, item / B] * B + item % B
#define MAP_CHUNKS 3    // position = (t % m) * B + item: row t is chunk t % m (B items each) of a longer row

#define SELECT_THREADS 512
#define SELECT_WARPS (SELECT_THREADS / 32)
#define LIST_BINS 2048          // radix histogram of list mode (11 bits)
#define SORT_BITS 12
#define SORT_BINS (1 << SORT_BITS)  // buckets of list mode's sort
#define LIST_BUCKET_MAX 128     // largest bucket the bucket sort ranks by counting

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
    int sort_cap;         // power of two >= k (in-order mode: by_score only; list mode: list size)
    int lists;            // 1: list mode, 0: in-order mode
    int cand_cap;         // list mode: candidate-list entries (>= sort_cap)
    int ring;             // list mode: rows not cached stream through a cp.async ring (RING_STAGES)
    int* out_idx;
    long long out_ld;
    float* out_val;       // KEYS_F32 only (nullable)
};

template <int SRC>
__device__ __forceinline__ u32 load_key(const SelectArgs& a, long long row, int n, int len) {
    if (SRC == KEYS_U32) return __ldg(a.keys + row * a.ld + n);
    return n < len ? loaded_score_key(__ldg(a.scores + row * a.ld + n)) : HISA_KEY_NONE;
}

template <int SRC>
__device__ __forceinline__ u32 word_key(u32 w) {
    return SRC == KEYS_U32 ? w : loaded_score_key(__uint_as_float(w));
}

// The bits of the fp32 score whose key (score_key) is `key`; false where the key does not say
// them -- the zeros (-0 and +0 share a key), NaN (one key for all) and HISA_KEY_NONE -- and the
// caller reads the score.
__device__ __forceinline__ bool score_bits_of_key(u32 key, u32& bits) {
    bits = score_key_bits(key);
    return key > HISA_KEY_NAN && key != HISA_KEY_ZERO;
}

// MAP_GATHER's position of item n: blocks[t, n / B] * B + n % B, with a shift and a mask where B
// is a power of two (block sizes; B = 1 for the filtered lists) instead of the run-time integer
// division's ~20 dependent instructions
__device__ __forceinline__ int gather_position(const SelectArgs& a, int t, int n) {
    const int B = a.B;
    int blk, off;
    if ((B & (B - 1)) == 0) {  // uniform
        blk = n >> (__ffs(B) - 1);
        off = n & (B - 1);
    } else {
        blk = n / B;
        off = n - blk * B;
    }
    return a.blocks[(long long)t * a.m + blk] * B + off;
}

// item n's position (MAP)
template <int MAP>
__device__ __forceinline__ int item_position(const SelectArgs& a, int t, int n) {
    if (MAP == MAP_IDENTITY) return n;
    if (MAP == MAP_TOKENS) return a.col0 + n;
    if (MAP == MAP_CHUNKS) return (t % a.m) * a.B + n;
    return gather_position(a, t, n);
}

// Whether items [first, first + R) (first a multiple of R, a power of two) have the positions
// item_position(first) + [0, R): every map but MAP_GATHER, and MAP_GATHER where they lie in one
// block (B a power of two, a multiple of R)
template <int MAP, int R>
__device__ __forceinline__ bool items_are_a_run(const SelectArgs& a) {
    static_assert((R & (R - 1)) == 0, "R a power of two");
    return MAP != MAP_GATHER || ((a.B & (a.B - 1)) == 0 && (a.B & (R - 1)) == 0);
}

// output value slot <- item n's (KEYS_F32 with out_val: read back, or from its ranking key `key`
// where that says it, score_bits_of_key; key 0: not known)
template <int SRC>
__device__ __forceinline__ void write_value(const SelectArgs& a, long long row, int slot, int n, u32 key = 0u) {
    if (SRC == KEYS_F32 && a.out_val) {
        u32 bits;
        if (!score_bits_of_key(key, bits)) bits = __float_as_uint(a.scores[row * a.ld + n]);
        a.out_val[row * a.out_ld + slot] = __uint_as_float(bits);
    }
}

// output slot <- item n: its position (MAP), minus `rel`, and its value (write_value)
template <int SRC, int MAP>
__device__ __forceinline__ void emit_item(const SelectArgs& a, long long row, int t, int rel, int slot, int n,
                                          u32 key = 0u) {
    a.out_idx[row * a.out_ld + slot] = item_position<MAP>(a, t, n) - rel;
    write_value<SRC>(a, row, slot, n, key);
}

// emit_item with one row's output addresses computed once, opaque to the compiler: each slot is
// then one wide multiply-add, not row * out_ld + slot redone in 64 bits (the bucket sorts' emit)
template <int SRC>
struct RowOutputs {
    int* idx;
    float* val;           // where has_val
    const float* scores;  // the row's scores, read back where a key does not say its value
    bool has_val;
    __device__ __forceinline__ RowOutputs(const SelectArgs& a, long long row)
        : idx(a.out_idx + row * a.out_ld),
          val(SRC == KEYS_F32 && a.out_val ? a.out_val + row * a.out_ld : nullptr),
          scores(SRC == KEYS_F32 ? a.scores + row * a.ld : nullptr),
          has_val(SRC == KEYS_F32 && a.out_val != nullptr) {
        asm("mov.b64 %0, %0;" : "+l"(idx));
        asm("mov.b64 %0, %0;" : "+l"(val));
        asm("mov.b64 %0, %0;" : "+l"(scores));
    }
    // where w: slot <- item n (key: its key), as predicated global stores
    template <int MAP>
    __device__ __forceinline__ void emit_if(const SelectArgs& a, int t, int rel, int slot, int n, u32 key,
                                            bool w) const {
        store_if(idx + slot, item_position<MAP>(a, t, n) - rel, w);
        if (SRC == KEYS_F32 && has_val) {
            u32 bits;
            if (!score_bits_of_key(key, bits)) bits = __float_as_uint(__ldg(scores + n));
            store_if(reinterpret_cast<int*>(val) + slot, (int)bits, w);
        }
    }
};

// slots [from, k) of the row past its candidates, `step` apart per thread: index -1, value -inf
template <int SRC>
__device__ __forceinline__ void pad_row(const SelectArgs& a, long long row, int from, int step) {
    for (int i = from; i < a.k; i += step) {
        a.out_idx[row * a.out_ld + i] = -1;
        if (SRC == KEYS_F32 && a.out_val) a.out_val[row * a.out_ld + i] = __int_as_float(0xFF800000);
    }
}

// Bitonic sort of v[0, P) descending (P a power of two); the whole CTA takes part, ends synced.
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ void bitonic_sort_desc(u64* v, int P) {
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < P; i += THREADS) {
                const int j = i ^ stride;
                if (j > i) {
                    const u64 x = v[i], y = v[j];
                    const bool desc = (i & size) == 0;
                    if (desc ? (x < y) : (x > y)) {
                        v[i] = y;
                        v[j] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// inclusive prefix sum over the lanes of a warp
__device__ __forceinline__ int warp_inclusive_scan(int x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

// exclusive block-wide prefix sum of one int per thread (THREADS <= 1024) with one barrier: every
// warp sums the warps' totals itself (two warp reductions) rather than one warp scanning them
// between two more. Returns the block total in *total. The caller syncs before sScan is next
// written (a barrier of its own that follows anyway; block_exclusive_scan adds one).
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ int block_exclusive_scan_one_barrier(int v, int* sScan, int* total) {
    constexpr int WARPS = THREADS / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int x = warp_inclusive_scan(v);
    if (lane == 31) sScan[warp] = x;
    __syncthreads();
    const unsigned w = lane < WARPS ? (unsigned)sScan[lane] : 0u;  // the warps' totals
    *total = (int)__reduce_add_sync(0xFFFFFFFFu, w);
    return (int)__reduce_add_sync(0xFFFFFFFFu, lane < warp ? w : 0u) + x - v;  // warps before this one
}

// exclusive block-wide prefix sum of one int per thread (THREADS <= 1024); returns the block
// total in *total. Ends synced (sScan may be written again).
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* sScan, int* total) {
    const int before = block_exclusive_scan_one_barrier<THREADS>(v, sScan, total);
    __syncthreads();
    return before;
}

// Each warp's smallest mn and largest mx into sRed[warp] and sRed[THREADS / 32 + warp] (sRed:
// [2 * THREADS / 32]); the caller combines the warps' values (all threads, or one warp). Ends synced.
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ void warps_min_max(u32 mn, u32 mx, u32* sRed) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    mn = __reduce_min_sync(0xFFFFFFFFu, mn);
    mx = __reduce_max_sync(0xFFFFFFFFu, mx);
    if (lane == 0) {
        sRed[warp] = mn;
        sRed[THREADS / 32 + warp] = mx;
    }
    __syncthreads();
}

template <int SRC, int MAP>
__device__ void row_select_inorder(const SelectArgs& a) {
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
                int above = warp_inclusive_scan(sum) - sum;  // count in bins above this lane's first bin
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
    auto emit = [&](int slot, int n) { emit_item<SRC, MAP>(a, row, t, rel, slot, n); };
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
        bitonic_sort_desc(sSort, P);
        for (int i = tid; i < n_out; i += SELECT_THREADS) {
            emit(i, (int)(0xFFFFFFFFu - (u32)(sSort[i] & 0xFFFFFFFFull)));
        }
    }
    pad_row<SRC>(a, row, n_out + tid, SELECT_THREADS);
}

// ----------------------------------------------------------------------------------------------
// List mode

// shared-memory misc slots
#define MISC_BIN 0
#define MISC_ABOVE 1
#define MISC_TOTAL 2
#define MISC_SEL 3       // selected-list cursor
#define MISC_CAND 4      // candidate-list cursor
#define MISC_MAXB 5      // largest bucket of the sort
#define MISC_PMIN 6      // [6, 7]: range of the sort's primary values
#define MISC_RED_LO 8    // a block reduction's smallest key (finite_key_range, dense.cu's select)
#define MISC_RED_HI 9    // and its largest

#define SEL_G 8          // items per thread per chunk (held in registers)
#define RING_STAGES 8    // rows read from global memory: copy groups in flight (16 KB each)

// list entry: key in the high word, ~item in the low word (larger entry = better under §3)
__device__ __forceinline__ u64 list_entry(u32 key, int n) {
    return ((u64)key << 32) | (u64)(0xFFFFFFFFu - (u32)n);
}
__device__ __forceinline__ int entry_item(u64 e) { return (int)(0xFFFFFFFFu - (u32)e); }

// hist[(key - lo) >> sh] += 1 where lo <= key <= lo + span: one unsigned compare and one
// predicated shared-memory reduction, no branch (a branch around an atomic, or a select of a
// dummy bin, costs more instructions than the reduction where most keys take part)
__device__ __forceinline__ void hist_inc_in_range(int* hist, u32 key, u32 lo, u32 span, int sh) {
    asm volatile(
        "{\n\t.reg .pred q;\n\t.reg .u32 d, a;\n\t"
        "sub.u32 d, %1, %2;\n\tsetp.le.u32 q, d, %3;\n\tshr.b32 a, d, %4;\n\t"
        "shl.b32 a, a, 2;\n\tadd.u32 a, a, %0;\n\t@q red.shared.add.u32 [a], 1;\n\t}\n" ::"r"(smem_addr(hist)),
        "r"(key), "r"(lo), "r"(span), "r"((u32)sh)
        : "memory");
}

// Finds, counting from the top of hist[0, nbins) (nbins <= 4 * THREADS), the bin b with
// above(b) < r <= above(b) + hist[b], where above(b) is the count in the bins above b. Writes
// sMisc[MISC_BIN] = b, sMisc[MISC_ABOVE] = above(b), sMisc[MISC_TOTAL] = total. Ends synced.
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ void find_bin(const int* hist, int nbins, int r, int* sScan, int* sMisc) {
    const int tid = threadIdx.x;
    int h[4];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int b = nbins - 1 - 4 * tid - j;
        h[j] = b >= 0 ? hist[b] : 0;
        sum += h[j];
    }
    int total;
    int above = block_exclusive_scan_one_barrier<THREADS>(sum, sScan, &total);  // synced below
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (above < r && above + h[j] >= r) {
            sMisc[MISC_BIN] = nbins - 1 - 4 * tid - j;
            sMisc[MISC_ABOVE] = above;
        }
        above += h[j];
    }
    if (tid == 0) sMisc[MISC_TOTAL] = total;
    __syncthreads();
}

// Item chunks: f(key[SEL_G], n[SEL_G]) is called for consecutive chunks of SEL_G items per
// thread; every thread makes the same number of calls, so f may use warp collectives. Slots
// past the row carry HISA_KEY_NONE and an index >= n_items.
typedef u32 ChunkKeys[SEL_G];
typedef int ChunkItems[SEL_G];

// 16-byte vector v of the row (4 items) into chunk slots [at, at + 4); past the row (v >= n_vec):
// HISA_KEY_NONE with indices >= n_items
template <int SRC>
__device__ __forceinline__ void unpack_vector(const uint4& x, int v, int n_vec, int n_items, ChunkKeys& key,
                                              ChunkItems& n, int at) {
    const bool ok = v < n_vec;
    const int base = ok ? 4 * v : n_items;
    const u32 w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        key[at + j] = ok ? word_key<SRC>(w[j]) : HISA_KEY_NONE;
        n[at + j] = base + j;
    }
}

// every item of the row: from the shared-memory cache, or from global memory with 16-byte
// loads (the next chunk's loads issued before the current chunk is processed)
template <int SRC, class F>
__device__ __forceinline__ void row_chunks(const SelectArgs& a, long long row, int n_items, const u32* cache, u32* ring,
                                           F&& f) {
    const int tid = threadIdx.x;
    ChunkKeys key;
    ChunkItems n;
    if (cache) {
        for (int c0 = 0; c0 < n_items; c0 += SEL_G * SELECT_THREADS) {
#pragma unroll
            for (int j = 0; j < SEL_G; ++j) {
                const int i = c0 + j * SELECT_THREADS + tid;
                const bool ok = i < n_items;
                n[j] = ok ? i : n_items;
                key[j] = ok ? cache[i] : HISA_KEY_NONE;
            }
            f(key, n);
        }
        return;
    }
    const u32* words = SRC == KEYS_U32 ? a.keys + row * a.ld : reinterpret_cast<const u32*>(a.scores + row * a.ld);
    int done = 0;
    const bool aligned = (reinterpret_cast<unsigned long long>(words) & 15ull) == 0ull;
    if (aligned && ring) {
        // RING_STAGES groups of cp.async copies in flight; group g brings vectors
        // g * 2T + tid and g * 2T + T + tid (T = SELECT_THREADS) into slot g % RING_STAGES. Each
        // thread reads back only what it copied itself, so no barrier is needed.
        static_assert(SEL_G == 8, "one ring group = two 16-byte vectors per thread");
        constexpr int T = SELECT_THREADS;
        const int n_vec = n_items >> 2;
        const int n_grp = (n_vec + 2 * T - 1) / (2 * T);
        const uint4* vec = reinterpret_cast<const uint4*>(words);
        const u32 rb = smem_addr(ring) + tid * 16;
        auto issue = [&](int g) {
            if (g < n_grp) {
                const u32 dst = rb + (g % RING_STAGES) * (2 * T * 16);
                const int v = g * 2 * T + tid;
                cp_async16(dst, vec + min(v, n_vec - 1), v < n_vec);
                cp_async16(dst + T * 16, vec + min(v + T, n_vec - 1), v + T < n_vec);
            }
            cp_async_commit();  // empty groups too: the count of groups stays uniform
        };
        for (int g = 0; g < RING_STAGES - 1; ++g) issue(g);
        for (int g = 0; g < n_grp; ++g) {
            cp_async_wait<RING_STAGES - 2>();  // group g has landed
            const uint4* slot = reinterpret_cast<const uint4*>(ring) + (g % RING_STAGES) * 2 * T + tid;
            const uint4 x[2] = {slot[0], slot[T]};
            issue(g + RING_STAGES - 1);  // into the slot read in the previous iteration
#pragma unroll
            for (int u = 0; u < 2; ++u)
                unpack_vector<SRC>(x[u], g * 2 * T + u * T + tid, n_vec, n_items, key, n, 4 * u);
            f(key, n);
        }
        cp_async_wait<0>();
        done = n_vec << 2;
    } else if (aligned) {
        constexpr int V = SEL_G / 4;  // 16-byte vectors per thread per chunk
        const int n_vec = n_items >> 2;
        const uint4* vec = reinterpret_cast<const uint4*>(words);
        uint4 x[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
            const int v = u * SELECT_THREADS + tid;
            x[u] = v < n_vec ? __ldg(vec + v) : make_uint4(0u, 0u, 0u, 0u);
        }
        for (int v0 = 0; v0 < n_vec; v0 += V * SELECT_THREADS) {
            uint4 y[V];
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const int v = v0 + (V + u) * SELECT_THREADS + tid;
                y[u] = v < n_vec ? __ldg(vec + v) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < V; ++u)
                unpack_vector<SRC>(x[u], v0 + u * SELECT_THREADS + tid, n_vec, n_items, key, n, 4 * u);
            f(key, n);
#pragma unroll
            for (int u = 0; u < V; ++u) x[u] = y[u];
        }
        done = n_vec << 2;
    }
    for (int c0 = done; c0 < n_items; c0 += SEL_G * SELECT_THREADS) {
#pragma unroll
        for (int j = 0; j < SEL_G; ++j) {
            const int i = c0 + j * SELECT_THREADS + tid;
            const bool ok = i < n_items;
            n[j] = ok ? i : n_items;
            key[j] = ok ? word_key<SRC>(__ldg(words + i)) : HISA_KEY_NONE;
        }
        f(key, n);
    }
}

// Item sources for the radix levels and the appends: src(f) runs f over chunks.
// (Functors, not generic lambdas: NVRTC compiles generic lambdas as host functions.)
template <int SRC>
struct RowItems {  // every item of the row (cache, or global memory through the ring if any)
    const SelectArgs a;
    long long row;
    int n_items;
    const u32* cache;
    u32* ring;
    template <class F>
    __device__ __forceinline__ void operator()(F&& f) const {
        row_chunks<SRC>(a, row, n_items, cache, ring, f);
    }
};

struct ListItems {  // the entries of a shared-memory list
    const u64* list;
    int n_list;
    template <class F>
    __device__ __forceinline__ void operator()(F&& f) const {
        ChunkKeys key;
        ChunkItems n;
        for (int c0 = 0; c0 < n_list; c0 += SEL_G * SELECT_THREADS) {
#pragma unroll
            for (int j = 0; j < SEL_G; ++j) {
                const int i = c0 + j * SELECT_THREADS + threadIdx.x;
                const u64 e = i < n_list ? list[i] : 0ull;
                key[j] = (u32)(e >> 32);
                n[j] = entry_item(e);
            }
            f(key, n);
        }
    }
};

// Appends the chunk items flagged in mask_a to list_a and those in mask_b to list_b (unordered):
// one warp scan of both counts, one atomic per list per warp. Every lane of the warp calls it.
__device__ __forceinline__ void append_chunk(const ChunkKeys& key, const ChunkItems& n, unsigned mask_a, u64* list_a,
                                             int* cursor_a, int cap_a, unsigned mask_b, u64* list_b, int* cursor_b,
                                             int cap_b) {
    const int lane = threadIdx.x & 31;
    const int cnt = __popc(mask_a) | (__popc(mask_b) << 16);  // at most 32 * SEL_G each
    const int incl = warp_inclusive_scan(cnt);
    int base_a = 0, base_b = 0;
    if (lane == 31) {
        if (incl & 0xFFFF) base_a = atomicAdd(cursor_a, incl & 0xFFFF);
        if (incl >> 16) base_b = atomicAdd(cursor_b, incl >> 16);
    }
    const int excl = incl - cnt;
    int ia = __shfl_sync(0xFFFFFFFFu, base_a, 31) + (excl & 0xFFFF);
    int ib = __shfl_sync(0xFFFFFFFFu, base_b, 31) + (excl >> 16);
#pragma unroll
    for (int j = 0; j < SEL_G; ++j) {  // predicated stores, no branches
        const int wa = (mask_a >> j) & 1u, wb = (mask_b >> j) & 1u;
        const u64 e = list_entry(key[j], n[j]);
        if (wa & (ia < cap_a)) list_a[ia] = e;
        if (wb & (ib < cap_b)) list_b[ib] = e;
        ia += wa;
        ib += wb;
    }
}

// Radix state: the threshold's known bits are prefix >> shift; `remaining` items of the group
// sharing them are still to be selected; done: every item of that group is selected.
struct RadixState {
    u32 prefix;
    int shift;
    int remaining;
    bool done;
};

// One radix level: histogram of key bits [s, shift) over the items of the current group,
// then the bin holding the remaining-th largest.
template <class Items>
__device__ __forceinline__ void radix_level(const Items& items, int s, RadixState& st, int* sHist, int* sScan,
                                            int* sMisc) {
    const int nb = 1 << (st.shift - s);
    for (int i = threadIdx.x; i < nb; i += SELECT_THREADS) sHist[i] = 0;
    __syncthreads();
    const int shift = st.shift;
    const u32 group = st.prefix >> shift;
    items([&](const ChunkKeys& key, const ChunkItems&) {
#pragma unroll
        for (int j = 0; j < SEL_G; ++j)
            if (key[j] != HISA_KEY_NONE && (key[j] >> shift) == group)
                atomicAdd(&sHist[(key[j] >> s) & (u32)(nb - 1)], 1);
    });
    __syncthreads();
    find_bin(sHist, nb, st.remaining, sScan, sMisc);
    const int b = sMisc[MISC_BIN];
    st.prefix |= (u32)b << s;
    st.remaining -= sMisc[MISC_ABOVE];
    st.shift = s;
    st.done = sHist[b] == st.remaining;
    __syncthreads();  // everyone has read sHist / sMisc before they are reused
}

// Appends to the selected list the items of `items` that rank above the threshold group of st
// (or in it, when st.done), restricted to the pass-1 bin `top` when restrict_top.
template <class Items>
__device__ __forceinline__ void append_selected(const Items& items, const RadixState& st, bool restrict_top, u32 top,
                                                u64* sSel, int cap, int* sMisc) {
    const int shift = st.shift;
    const u64 lo = (u64)(st.prefix >> shift) + (st.done ? 0u : 1u);  // selected: key >> shift >= lo
    const u32 any_top = restrict_top ? 0u : 0xFFFFFFFFu;
    items([&](const ChunkKeys& key, const ChunkItems& n) {
        unsigned mask = 0u;
#pragma unroll
        for (int j = 0; j < SEL_G; ++j) {
            const unsigned sel = (unsigned)(key[j] != HISA_KEY_NONE) & (unsigned)((u64)(key[j] >> shift) >= lo) &
                                 (unsigned)(((key[j] >> 21) | any_top) == (top | any_top));
            mask |= sel << j;
        }
        if (__any_sync(0xFFFFFFFFu, mask != 0u))
            append_chunk(key, n, mask, sSel, &sMisc[MISC_SEL], cap, 0u, sSel, &sMisc[MISC_SEL], 0);
    });
    __syncthreads();
}

// Appends, in ascending item order, the first `need` items whose key equals thr (thr != 0).
// Each warp owns a contiguous range of items; one count pass, then one selection pass.
template <int SRC>
__device__ void append_ties(const SelectArgs& a, long long row, int len, int n_items, const u32* cache, u32 thr,
                            int need, u64* sSel, int cap, int* sScan, int* sMisc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int R = ((n_items + SELECT_WARPS - 1) / SELECT_WARPS + 31) & ~31;
    const int lo = min(n_items, warp * R), hi = min(n_items, lo + R);
    auto key_at = [&](int n) -> u32 {
        return n < hi ? (cache ? cache[n] : load_key<SRC>(a, row, n, len)) : HISA_KEY_NONE;
    };
    int cnt = 0;
    for (int n0 = lo; n0 < hi; n0 += 32) cnt += __popc(__ballot_sync(0xFFFFFFFFu, key_at(n0 + lane) == thr));
    if (lane == 0) sScan[warp] = cnt;
    __syncthreads();
    int base = 0;
    for (int w = 0; w < warp; ++w) base += sScan[w];
    for (int n0 = lo; n0 < hi && base < need; n0 += 32) {
        const int n = n0 + lane;
        const bool eq = key_at(n) == thr;
        const unsigned m = __ballot_sync(0xFFFFFFFFu, eq);
        const bool pred = eq && base + __popc(m & ((1u << lane) - 1u)) < need;
        const unsigned pm = __ballot_sync(0xFFFFFFFFu, pred);
        int slot = 0;
        if (lane == 0 && pm) slot = atomicAdd(&sMisc[MISC_SEL], __popc(pm));
        slot = __shfl_sync(0xFFFFFFFFu, slot, 0) + __popc(pm & ((1u << lane) - 1u));
        if (pred && slot < cap) sSel[slot] = list_entry(thr, n);
        base += __popc(m);
    }
    __syncthreads();
}

// A thread's PER consecutive bins at p: as 16-byte words where PER is a multiple of 4 (p 16-byte
// aligned), which a warp reads and writes without bank conflicts; one by one (a 4 PER-byte stride:
// PER-way conflicts) otherwise.
template <int PER>
__device__ __forceinline__ void load_bins(const int* p, int (&h)[PER]) {
    if constexpr (PER % 4 == 0) {
#pragma unroll
        for (int v = 0; v < PER / 4; ++v) {
            const int4 x = reinterpret_cast<const int4*>(p)[v];
            h[4 * v] = x.x;
            h[4 * v + 1] = x.y;
            h[4 * v + 2] = x.z;
            h[4 * v + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < PER; ++j) h[j] = p[j];
    }
}
template <int PER>
__device__ __forceinline__ void store_bins(int* p, const int (&h)[PER]) {
    if constexpr (PER % 4 == 0) {
#pragma unroll
        for (int v = 0; v < PER / 4; ++v)
            reinterpret_cast<int4*>(p)[v] = make_int4(h[4 * v], h[4 * v + 1], h[4 * v + 2], h[4 * v + 3]);
    } else {
#pragma unroll
        for (int j = 0; j < PER; ++j) p[j] = h[j];
    }
}

// The bucket sort's counts sHist[0, BINS) become each bucket's first slot, highest bucket
// first; sMisc[MISC_MAXB] gets the largest count where it exceeds LIST_BUCKET_MAX (the caller sets
// it to 0 before). Ends synced.
template <int BINS = SORT_BINS, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void bucket_starts(int* sHist, int* sScan, int* sMisc) {
    constexpr int PER = BINS / THREADS;  // buckets per thread in the scan
    static_assert(PER * THREADS == BINS, "every thread scans as many buckets");
    const int tid = threadIdx.x;
    int* mine = sHist + BINS - PER * (tid + 1);  // this thread's buckets, highest last
    int h[PER];
    load_bins<PER>(mine, h);
    int sum = 0, big = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        sum += h[j];
        big = max(big, h[j]);
    }
    int total;
    int start = block_exclusive_scan_one_barrier<THREADS>(sum, sScan, &total);  // synced below
    // read again rather than kept: in register mode the row's keys are live here
    load_bins<PER>(mine, h);
#pragma unroll
    for (int j = PER - 1; j >= 0; --j) {
        const int c = h[j];
        h[j] = start;
        start += c;
    }
    store_bins<PER>(mine, h);
    if (big > LIST_BUCKET_MAX) atomicMax(&sMisc[MISC_MAXB], big);
    __syncthreads();
}

// Sorts the n_out selected entries by sort value (score order: the entry; position order: its
// low word, i.e. ascending item) descending and writes the output row. Bucket sort over
// SORT_BINS equal ranges of the value; each item's slot is its bucket's start plus the number
// of larger values in its bucket. The sorted entries go back to sSel, and from there out in slot
// order (coalesced stores; by score, the values from the keys). [range_lo, range_hi], when given
// (range_lo <= range_hi), holds every entry's primary part (the caller knows it), which saves a
// pass over the entries.
template <int SRC, int MAP, int THREADS = SELECT_THREADS>
__device__ void sort_and_emit(const SelectArgs& a, long long row, int t, int rel, u64* sSel, u64* sAux, int n_out,
                              int* sHist, int* sScan, int* sMisc, u32 range_lo = 1u, u32 range_hi = 0u) {
    static_assert(SORT_BINS % THREADS == 0, "every thread clears as many buckets");
    const int tid = threadIdx.x, lane = tid & 31;
    const bool by_score = a.by_score != 0;
    auto value = [&](u64 e) -> u64 { return by_score ? e : (e & 0xFFFFFFFFull); };
    // buckets follow the value's primary part (score order: the key; position order: ~item),
    // which orders the values the same way up to ties inside a bucket
    auto primary = [&](u64 e) -> u32 { return by_score ? (u32)(e >> 32) : (u32)e; };
    unsigned* sRange = reinterpret_cast<unsigned*>(sMisc + MISC_PMIN);  // [min, max] of the primary
    if (tid == 0) {
        sRange[0] = 0xFFFFFFFFu;
        sRange[1] = 0u;
        sMisc[MISC_MAXB] = 0;
    }
#pragma unroll
    for (int u = 0; u < SORT_BINS / THREADS; ++u) sHist[tid + u * THREADS] = 0;
    const bool known = range_lo <= range_hi;
    if (!known) {
        __syncthreads();
        u32 lo = 0xFFFFFFFFu, hi = 0u;
        for (int i = tid; i < n_out; i += THREADS) {
            const u32 p = primary(sSel[i]);
            lo = min(lo, p);
            hi = max(hi, p);
        }
        lo = __reduce_min_sync(0xFFFFFFFFu, lo);
        hi = __reduce_max_sync(0xFFFFFFFFu, hi);
        if (lane == 0) {
            atomicMin(&sRange[0], lo);
            atomicMax(&sRange[1], hi);
        }
    }
    __syncthreads();
    const u32 pmin = known ? range_lo : sRange[0], span = (known ? range_hi : sRange[1]) - pmin;
    // bucket = (primary - pmin) >> sh lies in [0, SORT_BINS): sh keeps the top SORT_BITS bits of the span
    const int sh = span == 0u ? 0 : max(0, 32 - __clz((int)span) - SORT_BITS);
    auto bucket = [&](u64 e) -> int { return (int)((primary(e) - pmin) >> sh); };
    for (int i = tid; i < n_out; i += THREADS) atomicAdd(&sHist[bucket(sSel[i])], 1);
    __syncthreads();
    bucket_starts<SORT_BINS, THREADS>(sHist, sScan, sMisc);
    if (sMisc[MISC_MAXB] > LIST_BUCKET_MAX) {
        // skewed values: bitonic sort of the sort values (all > 0, padding 0), descending
        int P = 1;
        while (P < n_out) P <<= 1;
        for (int i = tid; i < P; i += THREADS) sSel[i] = i < n_out ? value(sSel[i]) : 0ull;
        __syncthreads();
        bitonic_sort_desc<THREADS>(sSel, P);
    } else {
        // scatter into buckets; afterwards sHist[b] is the end of bucket b and the start of b - 1
        for (int i = tid; i < n_out; i += THREADS) {
            const u64 e = sSel[i];
            sAux[atomicAdd(&sHist[bucket(e)], 1)] = e;
        }
        __syncthreads();
        // each entry to its slot in sSel: its bucket's start plus its rank in the bucket
        for (int p = tid; p < n_out; p += THREADS) {
            const u64 e = sAux[p];
            const int b = bucket(e);
            const int start = b == SORT_BINS - 1 ? 0 : sHist[b + 1], end = sHist[b];
            // rank in the bucket: most buckets hold one or two entries, so a plain loop (unrolling
            // it costs more in set-up than it saves), one compare per entry
            int rank = 0;
            if (by_score) {
#pragma unroll 1
                for (int j = start; j < end; ++j) rank += sAux[j] > e;
            } else {
                const u32 v = (u32)e;
#pragma unroll 1
                for (int j = start; j < end; ++j) rank += (u32)sAux[j] > v;
            }
            sSel[start + rank] = e;
        }
        __syncthreads();
    }
    // the sorted values, out in slot order (coalesced); by score each holds its key
    for (int i = tid; i < n_out; i += THREADS) {
        const u64 e = sSel[i];
        emit_item<SRC, MAP>(a, row, t, rel, i, entry_item(e), by_score ? (u32)(e >> 32) : 0u);
    }
}

template <int SRC, int MAP>
__device__ void row_select_lists(const SelectArgs& a) {
    extern __shared__ __align__(16) char smem[];
    int* sHist = reinterpret_cast<int*>(smem);               // [SORT_BINS] (LIST_BINS for the radix)
    int* sScan = sHist + SORT_BINS;                          // [32]
    int* sMisc = sScan + 32;                                 // [32]
    u64* sSel = reinterpret_cast<u64*>(sMisc + 32);          // [sort_cap] selected entries
    u64* sAux = sSel + a.sort_cap;                           // [cand_cap] candidates, then sort scratch
    u32* sCacheMem = reinterpret_cast<u32*>(sAux + a.cand_cap);  // [ncols] when the row fits

    const int tid = threadIdx.x;
    const long long row = blockIdx.x;
    const int t = a.row0 + (int)row;
    const int len = (SRC == KEYS_F32 && a.lengths) ? max(0, min(a.lengths[t], a.ncols)) : a.ncols;
    const int n_items = (SRC == KEYS_F32) ? len : a.ncols;
    const int k = a.k, cap = a.sort_cap;
    u32* sCache = a.ncols <= a.cache_cap ? sCacheMem : nullptr;
    u32* sRing = !sCache && a.ring ? sCacheMem : nullptr;  // rows read from global memory

    for (int i = tid; i < LIST_BINS; i += SELECT_THREADS) sHist[i] = 0;
    if (tid == 0) sMisc[MISC_SEL] = sMisc[MISC_CAND] = 0;
    __syncthreads();

    // pass 1 (global memory): histogram of the top 11 bits; the keys go to the cache
    row_chunks<SRC>(a, row, n_items, nullptr, sRing, [&](const ChunkKeys& key, const ChunkItems& n) {
#pragma unroll
        for (int j = 0; j < SEL_G; ++j) {
            if (sCache && n[j] < n_items) sCache[n[j]] = key[j];
            if (key[j] != HISA_KEY_NONE) atomicAdd(&sHist[key[j] >> 21], 1);
        }
    });
    __syncthreads();
    find_bin(sHist, LIST_BINS, k, sScan, sMisc);
    const int n_valid = sMisc[MISC_TOTAL];
    const RowItems<SRC> all_items{a, row, n_items, sCache, sRing};

    // every candidate selected: group = all keys >= 1 (shift 0, prefix 0, taken)
    RadixState st{0u, 0, 0, true};
    int tb_count = 0;
    if (n_valid > k) {
        const int tb = sMisc[MISC_BIN];
        tb_count = sHist[tb];
        st = RadixState{(u32)tb << 21, 21, k - sMisc[MISC_ABOVE], false};
        st.done = tb_count == st.remaining;
    }
    const bool to_cands = !st.done && tb_count <= a.cand_cap;
    __syncthreads();

    // pass 2: keys above bin tb (or in it, when all of it is needed) -> selected list;
    // keys in bin tb -> candidate list (when they fit)
    {
        const int shift = st.shift;
        const u32 group = st.prefix >> shift;
        const u64 lo = (u64)group + (st.done ? 0u : 1u);  // selected: key >> shift >= lo
        const unsigned tc = to_cands;
        all_items([&](const ChunkKeys& key, const ChunkItems& n) {
            unsigned ms = 0u, mc = 0u;
#pragma unroll
            for (int j = 0; j < SEL_G; ++j) {  // bitwise, so no branches
                const u32 g = key[j] >> shift;
                const unsigned valid = key[j] != HISA_KEY_NONE;
                ms |= (valid & (unsigned)((u64)g >= lo)) << j;
                mc |= (valid & tc & (unsigned)(g == group)) << j;
            }
            if (__any_sync(0xFFFFFFFFu, mc != 0u))  // candidates are few: most warps skip their list
                append_chunk(key, n, ms, sSel, &sMisc[MISC_SEL], cap, mc, sAux, &sMisc[MISC_CAND], a.cand_cap);
            else
                append_chunk(key, n, ms, sSel, &sMisc[MISC_SEL], cap, 0u, sAux, &sMisc[MISC_CAND], 0);
        });
        __syncthreads();
    }

    if (!st.done) {
        const u32 top = st.prefix >> 21;  // bin tb of pass 1
        if (to_cands) {
            const ListItems cands{sAux, sMisc[MISC_CAND]};
            radix_level(cands, 10, st, sHist, sScan, sMisc);
            if (!st.done) radix_level(cands, 0, st, sHist, sScan, sMisc);
            append_selected(cands, st, false, top, sSel, cap, sMisc);
        } else {
            radix_level(all_items, 10, st, sHist, sScan, sMisc);
            if (!st.done) radix_level(all_items, 0, st, sHist, sScan, sMisc);
            append_selected(all_items, st, true, top, sSel, cap, sMisc);
        }
        if (!st.done)  // ties at the threshold: the lowest-index `remaining` items equal to it
            append_ties<SRC>(a, row, len, n_items, sCache, st.prefix, st.remaining, sSel, cap, sScan, sMisc);
    }

    const int n_out = min(k, n_valid);
    const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
    sort_and_emit<SRC, MAP>(a, row, t, rel, sSel, sAux, n_out, sHist, sScan, sMisc);
    pad_row<SRC>(a, row, n_out + tid, SELECT_THREADS);
}

template <int SRC, int MAP>
__device__ void row_select(const SelectArgs& a) {
    if (a.lists) row_select_lists<SRC, MAP>(a);
    else row_select_inorder<SRC, MAP>(a);
}

// ----------------------------------------------------------------------------------------------
// Warp mode: short rows in position order (the block top-m: about S / B items per row), one warp
// per row, WARP_SELECT_ROWS rows per CTA. Item n of the row sits in lane n % 32, register n / 32
// (coalesced loads, no shared memory). The k-th key is built bit by bit: the largest threshold
// with at least k keys at or above it (a counting pass over the registers and a warp sum per bit,
// from the highest bit where the row's smallest and largest keys differ, stopping early when
// exactly k keys lie at or above the candidate). Then one in-order pass over the registers keeps
// the keys above the threshold and the lowest-index keys equal to it (ballots give every item its
// slot), so positions come out ascending. Only for precomputed keys (KEYS_U32) and position order; the host falls back to
// row_select elsewhere.

#define WARP_SELECT_ITEMS 1024  // longest row of warp mode
#define WARP_SELECT_ROWS 4      // rows (warps) per CTA

__device__ __forceinline__ int warp_sum(int v) { return (int)__reduce_add_sync(0xFFFFFFFFu, (unsigned)v); }

// Named barrier 1 + pair of a CTA's pair of warps (64 threads): the odd warp arrives, the even one
// waits. The ids are immediates: with the id in a register ptxas reserves all 16 of a CTA's
// barriers, which held block_topm_warp_kernel to 4 CTAs per SM (H200, ncu: 25% theoretical
// occupancy, two waves of CTAs at T = 4096; bench/NOTES.md, session 31).
__device__ __forceinline__ void pair_barrier(int pair, bool arrive) {
    static_assert(WARP_SELECT_ROWS == 4, "two pairs of warps per CTA: barriers 1 and 2");
    if (pair == 0) {
        if (arrive) asm volatile("bar.arrive 1, 64;" ::: "memory");
        else asm volatile("bar.sync 1, 64;" ::: "memory");
    } else {
        if (arrive) asm volatile("bar.arrive 2, 64;" ::: "memory");
        else asm volatile("bar.sync 2, 64;" ::: "memory");
    }
}

// The 32 x 32 bit matrix of a warp's words, transposed: returns to lane j the word whose bit l is
// bit j of lane l's x. Five rounds, each swapping the off-diagonal blocks of side s between lanes
// l and l ^ s.
__device__ __forceinline__ u32 transpose_bits32(u32 x) {
    const int lane = threadIdx.x & 31;
    const u32 lo_masks[5] = {0x0000FFFFu, 0x00FF00FFu, 0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
#pragma unroll
    for (int i = 0; i < 5; ++i) {
        const int s = 16 >> i;
        const u32 lo = lo_masks[i];
        const u32 y = __shfl_xor_sync(0xFFFFFFFFu, x, s);
        x = (lane & s) == 0 ? (x & lo) | ((y & lo) << s) : (x & ~lo) | ((y & ~lo) >> s);
    }
    return x;
}

// The pair record of rows t and t + 1 (t even; the layout of common.cuh, m ints per list) from
// each row's selected set, a 1024-bit mask held as one word per lane (lane l: items 32 l + [0, 32)).
// Called by both rows' warps of a CTA (or by row t's alone when t + 1 is past the launch's rows):
// the odd row's warp leaves its mask in shared memory and returns; the even row's warp writes the
// record. A block's index in a row's list is the number of that row's blocks below it; its place in
// the union is its rank in its group (grouped: in both lists, row 0's only, row 1's only) plus the
// groups before it, or (ascending) its rank in the union.
__device__ __forceinline__ void write_pair_record(int* unions, int t, int r_in, int rows, int m, bool grouped,
                                                  u32 word) {
    __shared__ u32 sPairMask[WARP_SELECT_ROWS][32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const bool both = (r_in | 1) < rows;
    if (both) {
        sPairMask[w][lane] = word;
        // the pair's two warps only (the CTA's other warps may have left)
        pair_barrier(w >> 1, (w & 1) != 0);
        if (w & 1) return;
    }
    const u32 m0 = word, m1 = both ? sPairMask[w + 1][lane] : 0u;
    const u32 c = m0 & m1, a0 = m0 & ~m1, a1 = m1 & ~m0, u = m0 | m1;
    // exclusive prefix counts over the lanes (words) of each set, and the set's total
    auto excl = [&](u32 bits, int& total) {
        const int n = __popc(bits);
        const int inc = warp_inclusive_scan(n);
        total = __shfl_sync(0xFFFFFFFFu, inc, 31);
        return inc - n;
    };
    int len0, len1, common, n_a0, n_a1, n_u;
    const int p0 = excl(m0, len0), p1 = excl(m1, len1);
    // the place in the union of this word's first block of each group (grouped), or of any block
    int pc = 0, pa0 = 0, pa1 = 0, pu = 0;
    if (grouped) {
        pc = excl(c, common);
        pa0 = common + excl(a0, n_a0);
        pa1 = len0 + excl(a1, n_a1);
    } else {
        common = __popc(c);
        common = warp_sum(common);
        pu = excl(u, n_u);
    }
    int* rec = unions + (long long)(t >> 1) * pair_record_ints(m);
    if (lane == 0) {
        rec[0] = len0;
        rec[1] = len1;
        rec[2] = common;
        rec[3] = 0;
    }
    // The blocks by the transposed masks: lane j takes bit j of every word (blocks 32 l + j), so
    // that a run of selected blocks (the recent ones, the sink) spreads over the lanes instead of
    // leaving one lane a loop over its whole word; each round every lane takes one of its blocks
    // and reads word l's masks and prefix counts from lane l (bench/NOTES.md, session 34)
    const u32 t0 = transpose_bits32(m0), t1 = transpose_bits32(m1);
    u32 rest = t0 | t1;
    const int rounds = (int)__reduce_max_sync(0xFFFFFFFFu, (u32)__popc(rest));
    const u32 below = (1u << lane) - 1u;
    for (int i = 0; i < rounds; ++i) {
        const bool has = rest != 0u;
        const int l = has ? __ffs(rest) - 1 : 0;  // the word (lane) of this lane's block 32 l + lane
        rest &= rest - 1u;
        const u32 w0 = __shfl_sync(0xFFFFFFFFu, m0, l), w1 = __shfl_sync(0xFFFFFFFFu, m1, l);
        const int q0 = __shfl_sync(0xFFFFFFFFu, p0, l), q1 = __shfl_sync(0xFFFFFFFFu, p1, l);
        const int qc = __shfl_sync(0xFFFFFFFFu, grouped ? pc : pu, l);
        const int qa0 = __shfl_sync(0xFFFFFFFFu, pa0, l), qa1 = __shfl_sync(0xFFFFFFFFu, pa1, l);
        const bool in0 = (w0 >> lane) & 1u, in1 = (w1 >> lane) & 1u;
        const int pos = !grouped ? qc + __popc((w0 | w1) & below)
                        : in0 && in1 ? qc + __popc(w0 & w1 & below)
                        : in0        ? qa0 + __popc(w0 & ~w1 & below)
                                     : qa1 + __popc(w1 & ~w0 & below);
        if (has) {
            rec[PAIR_RECORD_HEAD + pos] = 32 * l + lane;
            *reinterpret_cast<int2*>(rec + PAIR_RECORD_HEAD + 2 * m + 2 * pos) =
                make_int2(in0 ? q0 + __popc(w0 & below) : -1, in1 ? q1 + __popc(w1 & below) : -1);
        }
    }
}

// How many of a lane's keys are >= cand: each compare is the carry out of key - cand, added in
// (about two instructions per key, four counts in flight). Written as c += key >= cand, nvcc gave
// three or four per key (a compare, an add, a predicated move; predicates saved to registers) in
// one dependent chain, over half of block_topm_warp_kernel's instructions (ncu, bench/NOTES.md,
// session 31); this form made it 10-21% faster at 128K keys (session 32; tests/test_sass.py checks
// the form). Also dense_sample_threshold_kernel's search (dense.cu).
template <int R>
__device__ __forceinline__ int count_at_least(const u32 (&key)[R], u32 cand) {
    u32 c[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < R; ++j)
        asm("{\n\t.reg .u32 d;\n\tsub.cc.u32 d, %1, %2;\n\taddc.u32 %0, %0, 0;\n\t}" : "+r"(c[j & 3]) : "r"(key[j]), "r"(cand));
    return (int)(c[0] + c[1] + c[2] + c[3]);
}

// With `unions` (the block top-m of hisa_select), rows t = 2p and 2p + 1 (a.row0 even) are also
// the union path's pair p: the even row's warp writes the pair's record (common.cuh,
// pair_record_ints(a.k) ints each; write_pair_record). `grouped`: the union kernel's order (its
// SPLIT_ROWS: blocks of both rows, then row 0's own, then row 1's, each ascending), else ascending.
// R: keys per lane (rows of at most 32 R items): the threshold search and the in-order pass take R
// steps per bit and per row, so the block top-m fits R to its rows (block_topm_warp_kernel<R>).
// BOUND (the block top-m, whose rows hold at most two HISA_KEY_FORCED keys: the first and last
// eligible blocks): where 3 <= k <= 64 the search covers only [x, hi], hi the largest key that is
// not forced and x the least over the lanes of each lane's second largest such key. Every lane then
// holds two keys >= x, so at least 64 >= k keys lie at or above x, and only the forced ones, fewer
// than k, lie above hi: the k-th largest key is in [x, hi]. On the segments workload at 128K keys
// (1024 blocks, m = 64) this takes the search from 15.6 steps per row to 9.7 (CPU replay,
// bench/NOTES.md, session 36), the keys of a row's scores spanning both signs (bit 31) otherwise.
template <int SRC, int MAP, int R = WARP_SELECT_ITEMS / 32, bool BOUND = false>
__device__ void row_select_warp(const SelectArgs& a, int rows, int* unions = nullptr, int grouped = 0) {
    static_assert(SRC == KEYS_U32, "warp mode: precomputed ranking keys only");
    static_assert(R >= 1 && 32 * R <= WARP_SELECT_ITEMS, "at most WARP_SELECT_ITEMS keys per row");
    const int lane = threadIdx.x & 31;
    const int r_in = (int)(blockIdx.x * WARP_SELECT_ROWS + (threadIdx.x >> 5));
    if (r_in >= rows) return;  // whole warps leave: the collectives below stay full-warp
    const long long row = r_in;
    const int t = a.row0 + r_in;
    const int ncols = a.ncols, k = a.k;
    u32 key[R];
    int n_valid = 0;
    u32 mn = 0xFFFFFFFFu, mx = 0u;
    u32 top1 = 0u, top2 = 0u;  // BOUND: the lane's two largest keys that are not forced (or NONE)
#pragma unroll
    for (int j = 0; j < R; ++j) {
        const int n = 32 * j + lane;
        key[j] = n < ncols ? __ldg(a.keys + row * a.ld + n) : HISA_KEY_NONE;
        const bool valid = key[j] != HISA_KEY_NONE;
        n_valid += valid;
        mn = valid ? min(mn, key[j]) : mn;
        mx = max(mx, key[j]);
        if constexpr (BOUND) {
            const u32 kf = key[j] != HISA_KEY_FORCED ? key[j] : HISA_KEY_NONE;
            top2 = max(top2, min(top1, kf));
            top1 = max(top1, kf);
        }
    }
    n_valid = warp_sum(n_valid);

    u32 thr = 1u;            // smallest non-empty key: with n_valid <= k every candidate is kept
    int need = 0x7FFFFFFF;   // how many items equal to thr to keep
    if (n_valid > k && k > 0) {
        // bits the smallest and largest valid keys share are the threshold's too: the search
        // starts below them, and stops as soon as exactly k keys lie at or above a candidate
        mn = __reduce_min_sync(0xFFFFFFFFu, mn);
        mx = __reduce_max_sync(0xFFFFFFFFu, mx);
        u32 lo = mn, hi = mx;  // the k-th largest key lies in [lo, hi]
        if constexpr (BOUND) {
            if (k >= 3 && k <= 64) {
                const u32 x = __reduce_min_sync(0xFFFFFFFFu, top2), y = __reduce_max_sync(0xFFFFFFFFu, top1);
                if (x > mn && x < y) lo = x, hi = y;  // x = 0: a lane holds fewer than two such keys
            }
        }
        const u32 diff = mn ^ mx;
        if (diff == 0u) {  // every valid key is equal: the first k of them
            thr = mn;
            need = k;
        } else {
            const int top = 31 - __clz((int)(lo ^ hi));  // lo < hi here (without BOUND: mn and mx)
            u32 prefix = lo & ~((2u << top) - 1u);  // (2u << 31) wraps to 0: no shared bits
            bool exact = false;
            for (int bit = top; bit >= 0; --bit) {
                const u32 cand = prefix | (1u << bit);
                const int c = warp_sum(count_at_least(key, cand));
                if (c >= k) {
                    prefix = cand;
                    if (c == k) {  // the k keys >= cand are the selection: thr = the least of them
                        u32 least = 0xFFFFFFFFu;
#pragma unroll
                        for (int j = 0; j < R; ++j) least = key[j] >= cand ? min(least, key[j]) : least;
                        thr = __reduce_min_sync(0xFFFFFFFFu, least);
                        exact = true;
                        break;
                    }
                }
            }
            if (!exact) {
                int above = 0;
#pragma unroll
                for (int j = 0; j < R; ++j) above += key[j] > prefix;
                thr = prefix;
                need = k - warp_sum(above);
            }
        }
    }

    if (k <= 0) thr = 0xFFFFFFFFu, need = 0;  // nothing is kept (below: pstar = -1)

    // Where only `need` of the keys equal to thr are kept, the last kept one is the need-th of
    // them in position order (32 j + lane): pstar, its position, found once from the ties' masks
    // (each lane's as bits over its steps, transposed to one step per lane) instead of counting
    // the ties before each item in the pass, which chained every step to the one before
    // (bench/NOTES.md, session 35)
    int pstar = 0x7FFFFFFF;
    if (need != 0x7FFFFFFF) {
        pstar = -1;
        if (need > 0) {
            u32 eq_bits = 0u;  // bit j: key[j] == thr
#pragma unroll
            for (int j = 0; j < R; ++j) eq_bits |= (u32)(key[j] == thr) << j;
            const u32 step_ties = transpose_bits32(eq_bits);  // lane j: step j's ties, bit l = lane l
            const int n_ties = __popc(step_ties);
            const int through = warp_inclusive_scan(n_ties);  // ties in steps 0..lane
            const int js = __ffs(__ballot_sync(0xFFFFFFFFu, through >= need)) - 1;  // need <= the ties
            u32 bits = __shfl_sync(0xFFFFFFFFu, step_ties, js);
            const int r = need - __shfl_sync(0xFFFFFFFFu, through - n_ties, js);  // r-th tie of step js
            for (int i = 1; i < r; ++i) bits &= bits - 1u;
            pstar = 32 * js + __ffs(bits) - 1;
        }
    }

    // in-order pass: each item selected by its key and position alone (thr >= 1 excludes
    // HISA_KEY_NONE); slots by ballot. Exactly n_out items are selected, so a lane's word is the
    // step's selection mask
    const int n_out = min(k, n_valid);
    const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
    const u32 lower = (1u << lane) - 1u;
    const int cut = pstar - lane;  // 32 j + lane <= pstar
    int base = 0;
    u32 word = 0u;  // lane l: the row's emitted items 32 l + [0, 32) as bits
#pragma unroll
    for (int j = 0; j < R; ++j) {
        const u32 kj = key[j];
        const bool sel = kj > thr || (kj == thr && 32 * j <= cut);
        const u32 sel_mask = __ballot_sync(0xFFFFFFFFu, sel);
        const int slot = base + __popc(sel_mask & lower);
        if (sel && slot < n_out) emit_item<SRC, MAP>(a, row, t, rel, slot, 32 * j + lane);
        if (lane == j) word = sel_mask;
        base += __popc(sel_mask);
    }
    pad_row<SRC>(a, row, n_out + lane, 32);
    if (unions != nullptr) write_pair_record(unions, t, r_in, rows, a.k, grouped != 0, word);
}

// ----------------------------------------------------------------------------------------------
// Register mode: rows of at most REG_SELECT_ITEMS items (the refinement's m * B candidates, the
// standalone top-k over 8192 columns), one CTA of SELECT_THREADS per row (THREADS, a template
// parameter of row_select_regs and its helpers: 1024 for the filtered top-k's select of one wave,
// with R = 8), every key read once from global memory into registers. Thread i holds items
// [R i, R i + R) (R = 16: four 16-byte loads where the row is aligned), so thread order then
// register order is position order.
//
// The threshold: the group [lo, hi] of keys that holds the k-th largest starts as the row's range
// of keys (one reduction) and narrows by levels over the registers. A level spreads the group's
// range over at most 2048 equal bins ((key - lo) >> sh, so a row whose keys share their top bits
// still fills many bins and its histogram atomics rarely collide), finds the bin holding the
// remaining-th largest, and makes it the group. It ends when the bin is needed whole or is one key
// (sh = 0: ties at the threshold); three levels at most. Then each thread counts its selected
// items, one block scan of the counts gives every thread its first slot, and each thread writes
// its items in order; ties go to the lowest positions. Position order writes the output
// directly, score order fills the selected list for list mode's sort.

#define REG_SELECT_R 16                                     // keys per thread
#define REG_SELECT_ITEMS (SELECT_THREADS * REG_SELECT_R)    // longest row of register mode
#define REG_SELECT_BINS 2048                                // bins of a level (find_bin: <= 4 * the CTA size)
// resident CTAs per SM that register-mode kernels ask of their registers (launch bounds): at 2,
// 56-64 registers and no spills; at 3, 40 registers and a few spilled bytes. The refinement's
// refine_topk_regs_kernel asks four (REFINE_SELECT_MIN_CTAS, refine.cu)
#define REG_SELECT_MIN_CTAS 3

// The word row_filter never keeps (its key is below 2, the lowest threshold): NaN for fp32
// scores, HISA_KEY_NONE for ranking keys.
template <int SRC>
__device__ __forceinline__ constexpr u32 never_kept_word() {
    return SRC == KEYS_F32 ? 0x7FC00000u : HISA_KEY_NONE;
}

// Items [first, first + N) of a row of 32-bit words (ranking keys or fp32 scores, N a multiple of 4):
// their keys, HISA_KEY_NONE outside [lo, hi), or with RAW the words as stored, never_kept_word
// outside. Four 16-byte loads where the row is aligned and the items all lie inside, else one
// load per item. COHERENT: weak loads (ld.global.ca) instead of read-only ones, for rows that a
// kernel running beside this one wrote (common.cuh, st_release_gpu)
template <bool COHERENT, typename V>
__device__ __forceinline__ V load_word(const V* p) {
    if constexpr (COHERENT) return __ldca(p);
    else return __ldg(p);
}
// STRIDED (THREADS: the CTA's threads): the thread's items are first + reg_item_offset(j) (groups
// of four consecutive items, 4 * THREADS apart), each group one 16-byte load where the row is
// aligned and the group lies inside, else one load per item.
template <int N, int THREADS, bool STRIDED>
__device__ __forceinline__ constexpr int reg_item_offset(int j) {
    return STRIDED ? (j >> 2) * (4 * THREADS) + (j & 3) : j;
}
template <int SRC, bool RAW = false, int N = REG_SELECT_R, bool COHERENT = false, bool STRIDED = false,
          int THREADS = SELECT_THREADS>
__device__ __forceinline__ void load_row_keys(const u32* words, int lo, int hi, int first, u32 (&key)[N]) {
    constexpr int R = N;
    static_assert(R % 4 == 0, "16-byte loads of four items");
    constexpr u32 outside = RAW ? never_kept_word<SRC>() : HISA_KEY_NONE;
    auto conv = [](u32 w) { return RAW ? w : word_key<SRC>(w); };
    // the four items from key[4 u] on by one 16-byte load at item n (aligned, inside the row)
    auto load4 = [&](int u, int n) {
        const uint4 x = load_word<COHERENT>(reinterpret_cast<const uint4*>(words + n));
        key[4 * u] = conv(x.x);
        key[4 * u + 1] = conv(x.y);
        key[4 * u + 2] = conv(x.z);
        key[4 * u + 3] = conv(x.w);
    };
    const bool aligned = (reinterpret_cast<unsigned long long>(words) & 15ull) == 0ull;
    if constexpr (STRIDED) {
        constexpr int LAST = (R / 4 - 1) * 4 * THREADS;  // the last group's offset
        if (aligned && first >= lo && first + LAST + 4 <= hi) {  // every group inside: the loads back to back
#pragma unroll
            for (int u = 0; u < R / 4; ++u) load4(u, first + u * 4 * THREADS);
            return;
        }
#pragma unroll
        for (int u = 0; u < R / 4; ++u) {
            const int g = first + u * 4 * THREADS;
            if (aligned && g >= lo && g + 4 <= hi) {
                load4(u, g);
            } else {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int n = g + c;
                    key[4 * u + c] = n >= lo && n < hi ? conv(load_word<COHERENT>(words + n)) : outside;
                }
            }
        }
        return;
    }
    if (aligned && first >= lo && first + R <= hi) {
#pragma unroll
        for (int u = 0; u < R / 4; ++u) load4(u, first + 4 * u);
    } else {
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int n = first + j;
            key[j] = n >= lo && n < hi ? conv(load_word<COHERENT>(words + n)) : outside;
        }
    }
}

// One level of a threshold search over keys held in registers (N per thread): the keys in
// [lo, hi] spread over at most REG_SELECT_BINS equal bins ((key - lo) >> sh, so keys that share
// their top bits still fill many bins), and the bin holding the r-th largest of them. `total`
// counts the keys in [lo, hi]; when r > total there is no such bin and the rest is unset.
struct RangeLevel {
    u32 blo, bhi;  // the bin's first key and its last (hi where the bin runs past it)
    int sh;        // 0: the bin is one key value
    int in_bin, above, total;
};

template <int N, int THREADS = SELECT_THREADS>
__device__ __forceinline__ RangeLevel range_level(const u32 (&key)[N], u32 lo, u32 hi, int r, int* sHist, int* sScan,
                                                  int* sMisc) {
    static_assert(REG_SELECT_BINS % THREADS == 0 && REG_SELECT_BINS <= 4 * THREADS, "the bins' clear and find_bin");
    const int tid = threadIdx.x;
    const u32 span = hi - lo;
    const int sh = span < REG_SELECT_BINS ? 0 : 32 - __clz((int)span) - 11;  // span >> sh < 2048
    const int nb = (int)(span >> sh) + 1;
#pragma unroll
    for (int u = 0; u < REG_SELECT_BINS / THREADS; ++u)
        if (tid + u * THREADS < nb) sHist[tid + u * THREADS] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j) hist_inc_in_range(sHist, key[j], lo, span, sh);
    __syncthreads();
    find_bin<THREADS>(sHist, nb, r, sScan, sMisc);
    RangeLevel L{lo, hi, sh, 0, 0, sMisc[MISC_TOTAL]};
    if (L.total >= r) {
        const int b = sMisc[MISC_BIN];
        L.in_bin = sHist[b];
        L.above = sMisc[MISC_ABOVE];
        L.blo = lo + ((u32)b << sh);
        const u32 top = L.blo + (((u32)1u << sh) - 1u);  // the bin's last key (wrapped: past hi)
        L.bhi = top < L.blo ? hi : min(hi, top);
    }
    __syncthreads();  // sHist / sMisc are read before the next level clears them
    return L;
}

// The threshold of the r-th largest of the keys in [lo, hi] (N per thread), by levels of
// range_level until the bin that holds it is needed whole (cut: its lowest key) or is one key
// value (ties: cut = that key + 1, and `need` of the keys equal to `tie` are still to be taken);
// the keys >= cut are selected. r must not exceed the keys in [lo, hi]. cut, ties, tie and need
// are left as they are until then. (dense.cu's unordered select and row_select_regs.)
template <int N, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void cut_by_levels(const u32 (&key)[N], u32 lo, u32 hi, int r, int* sHist, int* sScan,
                                              int* sMisc, u64& cut, bool& ties, u32& tie, int& need) {
    for (;;) {  // r <= the keys in [lo, hi], so the level finds its bin
        const RangeLevel L = range_level<N, THREADS>(key, lo, hi, r, sHist, sScan, sMisc);
        r -= L.above;
        if (L.in_bin == r) {  // the whole bin is needed: every key >= its lowest
            cut = L.blo;
            break;
        }
        if (L.sh == 0) {  // one key value, more items than needed: ties at it
            cut = (u64)L.blo + 1u;
            ties = true;
            tie = L.blo;
            need = r;
            break;
        }
        lo = L.blo;
        hi = L.bhi;
    }
}

// Keys of the window's bin that cut_by_window ranks directly (more: a level over the bin instead)
#define WINDOW_RANK_MAX 64

// cut_by_levels' threshold (the same cut, ties, tie and need) with the first level over the
// window of keys below the largest, [hi - 2^(11 + WSH) + 1, hi]: 2048 bins of 2^WSH keys. On the
// refinement's rows (scores of one query against its blocks' keys) the r-th largest lies in that
// window and its bin holds a few keys (3-20 on the segments rows at 128K keys, WSH 14), where the
// first level over the row's whole range left 35-1660 in the r-th's bin and needed a second level
// (bench/threshold_levels_sim.py). The window's bin is then ranked directly where it holds at most
// WINDOW_RANK_MAX keys: the bin's keys into a list (a shared-memory counter), each list key's
// thread counts the keys above and at it, and the one whose counts bracket r names the threshold:
// two barriers, where a level takes four and a scan of 2048 bins. Where the window holds fewer
// than r keys, or the bin more than WINDOW_RANK_MAX, the levels as cut_by_levels takes them (over
// the row's range, or over the bin). r must not exceed the keys in [lo, hi].
template <int N, int WSH, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void cut_by_window(const u32 (&key)[N], u32 lo, u32 hi, int r, int* sHist, int* sScan,
                                              int* sMisc, u64& cut, bool& ties, u32& tie, int& need) {
    static_assert(WSH > 0 && 11 + WSH < 32 && REG_SELECT_BINS == 2048 && WINDOW_RANK_MAX <= THREADS,
                  "2048 bins of 2^WSH keys; one thread per ranked key");
    constexpr u32 WIDTH = ((u32)1u << (11 + WSH)) - 1u;
    const int tid = threadIdx.x;
    const u32 wlo = hi - WIDTH;
    // where the row's range fits the window, the window is the first level anyway. No sample
    // first (one key a thread, as regs_sort_direct's CUT takes it): its barrier count made ptxas
    // spill four of the keys at 32 registers; a row whose window holds fewer than r keys pays one
    // level more instead
    if (hi - lo > WIDTH) {
        if (tid == 0) sMisc[MISC_CAND] = 0;  // the bin's list cursor (range_level's barriers publish it)
        const RangeLevel L = range_level<N, THREADS>(key, wlo, hi, r, sHist, sScan, sMisc);
        const int rb = r - L.above;  // the rank in the bin
        if (L.total < r) {
            // the window holds fewer than r keys: the levels over [lo, hi]
        } else if (L.in_bin == rb) {  // the whole bin is needed
            cut = L.blo;
            return;
        } else if (L.in_bin > WINDOW_RANK_MAX) {  // the levels over the bin
            lo = L.blo;
            hi = L.bhi;
            r = rb;
        } else {
            // the bin's keys into sHist[0, in_bin) (free: range_level ends synced after its reads)
            const u32 blo = L.blo, bspan = L.bhi - L.blo;
            const int n = L.in_bin;
#pragma unroll
            for (int j = 0; j < N; ++j)
                if (key[j] - blo <= bspan) sHist[atomicAdd(&sMisc[MISC_CAND], 1)] = (int)key[j];
            __syncthreads();
            if (tid < n) {
                const u32 c = (u32)sHist[tid];
                int gt = 0, ge = 0;  // the bin's keys above c, and at or above it
                for (int i = 0; i < n; ++i) {
                    const u32 v = (u32)sHist[i];
                    gt += v > c;
                    ge += v >= c;
                }
                // c is the rb-th largest: every thread holding it writes the same words
                if (gt < rb && rb <= ge) {
                    sMisc[MISC_RED_LO] = (int)c;
                    sMisc[MISC_RED_HI] = rb == ge ? 0 : rb - gt;  // ties: of the keys equal to c, the first rb - gt
                }
            }
            __syncthreads();  // the next writes of these two words come after the caller's next barrier
            const u32 c = (u32)sMisc[MISC_RED_LO];
            const int nd = sMisc[MISC_RED_HI];
            if (nd == 0) {
                cut = c;
            } else {
                cut = (u64)c + 1u;
                ties = true;
                tie = c;
                need = nd;
            }
            return;
        }
    }
    // the levels where the window does not settle the threshold (one inlined copy of
    // cut_by_levels: with three, the kernel spilled 100 bytes at its 32 registers)
    cut_by_levels<N, THREADS>(key, lo, hi, r, sHist, sScan, sMisc, cut, ties, tie, need);
}

// Window entry (regs_sort_direct with CUT): the key in the high word, and in the low word the
// key's offset d above the sorted range's lowest key shifted over the item's complement within
// 2^POS items: ((d << POS) + 2^POS - 1 - n) mod 2^32. Where the buckets hold 2^sh keys with
// sh + POS <= 31, the low words of one bucket share their bits from sh + POS up and order its
// entries as list entries do (score, then position), and differ by less than 2^31.
template <int POS>
__device__ __forceinline__ u32 window_entry_low(u32 d, int n) {
    return (d << POS) + (u32)(((1 << POS) - 1) - n);
}
// the item of a window entry whose low word is `low` (d << POS leaves the low POS bits alone)
template <int POS>
__device__ __forceinline__ int window_entry_item(u32 low) {
    return ((1 << POS) - 1) - (int)(low & ((1u << POS) - 1u));
}

// The histogram of the window's bucket sort (regs_sort_direct with CUT): as hist_inc_in_range,
// and each counted key's arrival in its bin (the count before it, mod 256) into bits [pos, pos + 8)
// of arr, so that the scatter needs no atomic (scatter_at_arrival). ptxas branches around the
// atomic (it returns a value); the insert is predicated with it.
__device__ __forceinline__ void hist_arrival_in_range(u32 hist, u32 key, u32 lo, u32 span, int sh, u32& arr, u32 pos) {
    asm volatile(
        "{\n\t.reg .pred q;\n\t.reg .u32 d, a, s;\n\t"
        "sub.u32 d, %1, %2;\n\tsetp.le.u32 q, d, %3;\n\tshr.b32 a, d, %4;\n\tshl.b32 a, a, 2;\n\tadd.u32 a, a, %5;\n\t"
        "@q atom.shared.add.u32 s, [a], 1;\n\t@q bfi.b32 %0, s, %0, %6, 8;\n\t}\n"
        : "+r"(arr)
        : "r"(key), "r"(lo), "r"(span), "r"((u32)sh), "r"(hist), "r"(pos)
        : "memory");
}

// The window's scatter: where d <= span, the entry {lo, hi} goes to buf[hist[d >> sh] + arrival]
// (hist: the buckets' first slots, left as they are; arrival: bits [pos, pos + 8) of arr, from
// hist_arrival_in_range; hist, buf: shared-memory addresses). A predicated load and store, no
// atomic and no branch.
__device__ __forceinline__ void scatter_at_arrival(u32 hist, u32 buf, u32 d, u32 span, int sh, u32 arr, u32 pos, u32 lo,
                                                   u32 hi) {
    asm volatile(
        "{\n\t.reg .pred q;\n\t.reg .u32 a, s, r;\n\t"
        "setp.le.u32 q, %2, %3;\n\tshr.b32 a, %2, %4;\n\tshl.b32 a, a, 2;\n\tadd.u32 a, a, %0;\n\t"
        "@q ld.shared.u32 s, [a];\n\tbfe.u32 r, %7, %8, 8;\n\tadd.u32 s, s, r;\n\tshl.b32 s, s, 3;\n\tadd.u32 s, s, %1;\n\t"
        "@q st.shared.v2.u32 [s], {%5, %6};\n\t}\n" ::"r"(hist),
        "r"(buf), "r"(d), "r"(span), "r"((u32)sh), "r"(lo), "r"(hi), "r"(arr), "r"(pos)
        : "memory");
}

// The bucket sort's last step (regs_sort_direct, regs_sort_linear): the count entries of buf lie
// in NB buckets, highest first, and after the scatter sHist[b] is the end of bucket b and the
// start of b - 1 (the top bucket starts at 0); with STARTS (the window's scatter at arrival, which
// leaves the starts as they are) sHist[b] is bucket b's start, and b ends where b - 1 starts
// (bucket 0 at count). Each entry's slot is its bucket's start plus the number of larger entries
// in its bucket (score, then position: exact); the entries with slots below n_out are written out.
// bucket(e): the bucket of entry e. Entries are list entries (list_entry: the whole entry orders a
// bucket) or, with LOW_POS > 0, window entries (window_entry_low with LOW_POS position bits: the
// low words alone order a bucket).
template <int SRC, int MAP, int NB, int THREADS = SELECT_THREADS, int LOW_POS = 0, bool STARTS = false, class Bucket>
__device__ __forceinline__ void rank_in_buckets(const SelectArgs& a, long long row, int t, int rel, const u64* buf,
                                                int count, int n_out, const int* sHist, Bucket bucket) {
    const u32 base = smem_addr(buf);  // entry j's low word at base + 8 j
    RowOutputs<SRC> out(a, row);
    for (int p = threadIdx.x; p < count; p += THREADS) {
        const u64 e = buf[p];
        const int b = bucket(e);
        const int start = STARTS ? sHist[b] : b == NB - 1 ? 0 : sHist[b + 1];
        const int end = STARTS ? (b > 0 ? sHist[b - 1] : count) : sHist[b];
        int rank = 0;
        if constexpr (LOW_POS > 0) {
            // two low words of a bucket differ by less than 2^31 (window_entry): the sign of the
            // difference compares them
            // two words an iteration: half the loop's branch and address work per comparison
            const u32 c = (u32)e, stop = base + 8u * (u32)end;
            u32 q = base + 8u * (u32)start;
#pragma unroll 1
            for (; q + 8u < stop; q += 16u)
                rank += (int)((c - lds_u32(q)) >> 31) + (int)((c - lds_u32(q + 8u)) >> 31);
            if (q < stop) rank += (int)((c - lds_u32(q)) >> 31);
        } else {
#pragma unroll 1
            for (int j = start; j < end; ++j) rank += buf[j] > e;
        }
        const int slot = start + rank;
        const int n = LOW_POS > 0 ? window_entry_item<LOW_POS>((u32)e) : entry_item(e);
        out.template emit_if<MAP>(a, t, rel, slot, n, (u32)(e >> 32), slot < n_out);
    }
}

// A one-level score order's counts sHist[0, NB) (bins that are also the sort's buckets, highest
// first) become each bin's first slot. sMisc[MISC_BIN] gets the bin where the count from the top
// reaches k and sMisc[MISC_ABOVE] the keys from it up (neither is written where the bins hold fewer
// than k keys: the caller sets them first), and sMisc[MISC_MAXB] the largest count above
// LIST_BUCKET_MAX among the bins from it up (the caller zeroes it). Ends synced.
template <int NB, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void cut_bucket_starts(int* sHist, int* sScan, int* sMisc, int k) {
    constexpr int PER = NB / THREADS;
    const int tid = threadIdx.x;
    int* mine = sHist + NB - PER * (tid + 1);  // this thread's bins, highest last
    int h[PER];
    load_bins<PER>(mine, h);
    int sum = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) sum += h[j];
    int total;
    int above = block_exclusive_scan_one_barrier<THREADS>(sum, sScan, &total);  // synced below
    // read again rather than kept: in register mode the row's keys are live here
    load_bins<PER>(mine, h);
    int big = 0;
#pragma unroll
    for (int j = PER - 1; j >= 0; --j) {
        const int c = h[j];
        h[j] = above;
        if (above < k) {  // a bin whose keys may be selected: a bucket of the sort
            big = max(big, c);
            if (above + c >= k) {
                sMisc[MISC_BIN] = NB - PER * (tid + 1) + j;
                sMisc[MISC_ABOVE] = above + c;  // the keys from that bin up
            }
        }
        above += c;
    }
    store_bins<PER>(mine, h);
    if (big > LIST_BUCKET_MAX) atomicMax(&sMisc[MISC_MAXB], big);
    __syncthreads();
}

// Score order straight from the registers (row_select_regs): the items with keys in [floor_key,
// key_hi] (floor_key >= 1, at most 2 a.sort_cap of them, the row's top n_out among them) go by a
// bucket sort over that range into buf, and each one's slot is its bucket's start plus the number
// of larger entries in its bucket (score, then position: SPEC §3); the n_out best are written
// out. Needs no threshold: the rank is exact. Returns false, before writing anything, where a
// bucket holds more than LIST_BUCKET_MAX entries (the caller then takes its general path). Ends
// synced. BITS: log2 of the bucket count (<= SORT_BITS).
// CUT: the keys in [floor_key, key_hi] need not all be wanted, nor fit buf: the bucket where the
// count from the top reaches n_out is the threshold's (cut_bucket_starts), and only the keys from
// it up are sorted; false where [floor_key, key_hi] holds fewer than n_out keys. The buckets are
// then the threshold's level too: one histogram, where without CUT the caller's level found
// floor_key first (row_select_regs' window below the row's largest key). A sample of the keys
// (one a thread) decides first whether the range can hold n_out of them. CUT sorts window entries
// (window_entry_low; false where its buckets are too wide for them), ranked by their low words,
// and its histogram keeps each key's arrival in its bucket, so that its scatter needs no atomic.
template <int SRC, int MAP, int BITS, int N, int THREADS = SELECT_THREADS, bool CUT = false, bool STRIDED = false>
__device__ __forceinline__ bool regs_sort_direct(const SelectArgs& a, long long row, int t, int rel, const u32 (&key)[N],
                                                 int first, u32 floor_key, u32 key_hi, int n_out, int* sHist, int* sScan,
                                                 int* sMisc, u64* buf) {
    static_assert(BITS <= SORT_BITS, "the buckets fit sHist");
    static_assert((1 << BITS) % THREADS == 0, "every thread clears as many buckets");
    constexpr int BINS = 1 << BITS;
    const int tid = threadIdx.x;
    const u32 span = key_hi - floor_key;
    // bucket = (key - floor_key) >> sh lies in [0, BINS): sh keeps the top BITS bits of the span
    const int sh = span == 0u ? 0 : max(0, 32 - __clz((int)span) - BITS);
    // CUT's window entries: POS bits of position (N * THREADS items), sh + POS <= 31
    constexpr int POS = N * THREADS == 8192 ? 13 : N * THREADS == 4096 ? 12 : 0;
    static_assert(!CUT || POS > 0, "window entries: 4096 or 8192 items");
    static_assert(!CUT || (LIST_BUCKET_MAX < 256 && N % 4 == 0), "arrivals: a byte each, four a word");
    if (CUT && sh + POS > 31) return false;  // the row's range (wider than the caller's window)
    if constexpr (CUT) {  // a sample of one key a thread (its first, every N-th item; STRIDED: the first of
                          // group tid % 4, so that the sample spans the row) in the range, per warp
        u32 s = key[0];
        if constexpr (STRIDED && N >= 16) {
            const int g = tid & 3;
            s = g == 1 ? key[4] : g == 2 ? key[8] : g == 3 ? key[12] : s;
        }
        const unsigned in = __ballot_sync(0xFFFFFFFFu, s - floor_key <= span);
        if ((tid & 31) == 0) sScan[tid >> 5] = __popc(in);
    }
#pragma unroll
    for (int u = 0; u < BINS / THREADS; ++u) sHist[tid + u * THREADS] = 0;
    if (tid == 0) {
        sMisc[MISC_MAXB] = 0;
        if (CUT) sMisc[MISC_BIN] = -1;  // stays where the range holds fewer than n_out keys
    }
    __syncthreads();
    if constexpr (CUT) {
        // where the sample puts fewer than 3/4 of n_out keys in the range, the caller's level over
        // the row's whole range at once, without this histogram (rows whose k-th largest lies far
        // below the range: +17% on [4096 x 8192] with the histogram, H200, bench/NOTES.md, session 40)
        const int lane = tid & 31;
        const int hits = (int)__reduce_add_sync(0xFFFFFFFFu, lane < THREADS / 32 ? (unsigned)sScan[lane] : 0u);
        if (4 * N * hits < 3 * n_out) return false;  // sScan is next written after two barriers
    }
    u32 arrival[CUT ? N / 4 : 1] = {};  // CUT: each key's arrival in its bin, a byte each
    if constexpr (CUT) {
        const u32 hist = smem_addr(sHist);
#pragma unroll
        for (int j = 0; j < N; ++j)
            hist_arrival_in_range(hist, key[j], floor_key, span, sh, arrival[j / 4], 8u * (u32)(j % 4));
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) hist_inc_in_range(sHist, key[j], floor_key, span, sh);
    }
    __syncthreads();
    int thr = 0, count = 0;  // the lowest bucket sorted; with CUT, the entries sorted (else sHist[0] after the scatter)
    if constexpr (CUT) {
        cut_bucket_starts<BINS, THREADS>(sHist, sScan, sMisc, n_out);
        thr = sMisc[MISC_BIN];
        count = sMisc[MISC_ABOVE];  // <= n_out - 1 + LIST_BUCKET_MAX where the next test passes
        if (thr < 0 || count > 2 * a.sort_cap || sMisc[MISC_MAXB] > LIST_BUCKET_MAX) {
            __syncthreads();  // every thread has read sMisc before the general path reuses it
            return false;
        }
    } else {
        bucket_starts<BINS, THREADS>(sHist, sScan, sMisc);
        if (sMisc[MISC_MAXB] > LIST_BUCKET_MAX) {
            __syncthreads();  // every thread has read it before the general path reuses it
            return false;
        }
    }
    // scatter the keys from bucket thr up (its lowest key: cut_key); afterwards sHist[b] is the
    // end of bucket b and the start of b - 1, except with CUT, whose scatter at each key's arrival
    // leaves sHist[b] the start of b
    const u32 cut_key = floor_key + ((u32)thr << sh), cut_span = key_hi - cut_key;
    const auto bucket = [&](u64 e) { return (int)(((u32)(e >> 32) - floor_key) >> sh); };
    if constexpr (CUT) {  // window entries, at their buckets' starts plus their arrivals (each bucket from thr up
                          // holds at most LIST_BUCKET_MAX < 256 keys)
        const u32 hist = smem_addr(sHist + thr), base = smem_addr(buf);
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const u32 d = key[j] - cut_key;
            scatter_at_arrival(hist, base, d, cut_span, sh, arrival[j / 4], 8u * (u32)(j % 4),
                               window_entry_low<POS>(d, first + reg_item_offset<N, THREADS, STRIDED>(j)), key[j]);
        }
        __syncthreads();
        rank_in_buckets<SRC, MAP, BINS, THREADS, POS, true>(a, row, t, rel, buf, count, n_out, sHist, bucket);
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const u32 d = key[j] - cut_key;
            if (d <= cut_span)
                buf[atomicAdd(&sHist[thr + (int)(d >> sh)], 1)] =
                    list_entry(key[j], first + reg_item_offset<N, THREADS, STRIDED>(j));
        }
        __syncthreads();
        rank_in_buckets<SRC, MAP, BINS, THREADS>(a, row, t, rel, buf, sHist[0], n_out, sHist, bucket);
    }
    return true;
}

// Bins by score value: a key clamped to [flo, fhi] (keys of finite scores, flo <= fhi) goes to one
// of nb bins spread linearly over the scores [score(flo), score(fhi)]. The bin never decreases as
// the key grows (a rounded subtraction and a rounded multiply-add of the score are monotone), so
// bins can split a threshold search or a bucket sort whose ties are settled by the keys; keys of
// one score share a bin. All keys go to bin 0 where the range is 0, or it or its scale overflows
// (the callers then take their other path): scale 0 and xmin 0, so that each score's product is
// 0 -- with xmin kept, a range past FLT_MAX (scores of both signs near it) would make
// score - xmin infinite, its product NaN and the bin far outside [0, nb).
struct LinearBins {
    u32 flo, fhi;
    float xmin, scale;
    __device__ __forceinline__ LinearBins(u32 lo, u32 hi, int nb) : flo(lo), fhi(hi) {
        xmin = __uint_as_float(score_key_bits(lo));
        const float range = __fsub_rn(__uint_as_float(score_key_bits(hi)), xmin);
        scale = (float)(nb - 1) * (1.f - 1.f / 1024.f) / range;  // (xmax - xmin) * scale < nb - 1/2
        if (!(scale > 0.f && scale <= 3.0e38f)) {  // range 0, subnormal or infinite
            scale = 0.f;
            xmin = 0.f;
        }
    }
    // 2^23 + (score - xmin) * scale rounds to an integer, whose bits less 2^23's are the bin
    __device__ __forceinline__ int operator()(u32 key) const {
        const float x = __uint_as_float(score_key_bits(min(max(key, flo), fhi)));
        return __float_as_int(__fmaf_rn(__fsub_rn(x, xmin), scale, 8388608.f)) - 0x4B000000;
    }
};

// Score order in one level (row_select_regs, fp32 scores): each key goes to one of NB
// (<= SORT_BINS) bins by score value (LinearBins over [flo, fhi], the keys of the row's smallest and largest
// finite scores), which serve both as the threshold level and as the bucket sort's buckets: one
// histogram and one scan give the bin of the k-th largest key and every bin's first slot, and the
// keys from that bin up are scattered and ranked in their bucket exactly (score, then position:
// SPEC §3; NaN, -inf and +inf rank by their keys inside the end bins). Spread by value rather than
// by key bits, the keys of a row of scores that fill their range (e.g. randn) land a few to a
// bucket. Returns false, before writing anything, where the keys from that bin up exceed
// 2 a.sort_cap or a bucket among them holds more than LIST_BUCKET_MAX (skewed scores); the caller
// then takes another path. Ends synced.
template <int SRC, int MAP, int NB, int N, int THREADS = SELECT_THREADS>
__device__ __forceinline__ bool regs_sort_linear(const SelectArgs& a, long long row, int t, int rel, const u32 (&key)[N],
                                                 int first, u32 flo, u32 fhi, int n_valid, int* sHist, int* sScan,
                                                 int* sMisc, u64* buf) {
    static_assert(NB % THREADS == 0 && NB <= SORT_BINS, "every thread scans as many bins; they fit sHist");
    const int tid = threadIdx.x;
    const int k = a.k, n_out = min(k, n_valid);
    const LinearBins bin(flo, fhi, NB);
#pragma unroll
    for (int u = 0; u < NB / THREADS; ++u) sHist[tid + u * THREADS] = 0;
    if (tid == 0) {  // where fewer than k keys: every bin
        sMisc[MISC_BIN] = 0;
        sMisc[MISC_ABOVE] = n_valid;
        sMisc[MISC_MAXB] = 0;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; ++j)
        if (key[j] != HISA_KEY_NONE) atomicAdd(&sHist[bin(key[j])], 1);
    __syncthreads();
    cut_bucket_starts<NB, THREADS>(sHist, sScan, sMisc, k);  // sHist[b]: bucket b's first slot
    const int thr = sMisc[MISC_BIN], count = sMisc[MISC_ABOVE];
    if (count > 2 * a.sort_cap || sMisc[MISC_MAXB] > LIST_BUCKET_MAX) {
        __syncthreads();  // every thread has read sMisc before the next path reuses it
        return false;
    }
    // scatter; afterwards sHist[b] is the end of bucket b and the start of b - 1
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const int b = bin(key[j]);
        if (key[j] != HISA_KEY_NONE && b >= thr) buf[atomicAdd(&sHist[b], 1)] = list_entry(key[j], first + j);
    }
    __syncthreads();
    rank_in_buckets<SRC, MAP, NB, THREADS>(a, row, t, rel, buf, count, n_out, sHist,
                                           [&](u64 e) { return bin((u32)(e >> 32)); });
    return true;
}

// Exclusive prefix sums in position order of the STRIDED register layout, whose order is (group,
// thread, item): bit j of `bits` marks this thread's item j (group j / 4), before[u] gets the
// marked items of all threads in groups < u plus those of the threads before this one in group u.
// Two groups a block scan (16-bit halves: a group holds 4 * THREADS <= 4096 items). Ends synced.
template <int G, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void group_exclusive_scan(u32 bits, int (&before)[G], int* sScan) {
    int c[G];
#pragma unroll
    for (int u = 0; u < G; ++u) c[u] = __popc((bits >> (4 * u)) & 0xFu);
    int base = 0;
#pragma unroll
    for (int u = 0; u < G; u += 2) {
        const int hi = u + 1 < G ? c[u + 1] : 0;
        int total;
        const int b = block_exclusive_scan<THREADS>(c[u] | (hi << 16), sScan, &total);
        before[u] = base + (b & 0xFFFF);
        base += total & 0xFFFF;
        if (u + 1 < G) {
            before[u + 1] = base + (b >> 16);
            base += total >> 16;
        }
    }
}

// warps_min_max's per-warp values combined by warp 0 into sMisc[MISC_RED_LO] (the smallest) and
// sMisc[MISC_RED_HI] (the largest), for every thread past the caller's next barrier
template <int THREADS = SELECT_THREADS>
__device__ __forceinline__ void combine_warps_min_max(const u32* sRed, int* sMisc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp == 0) {
        constexpr int WARPS = THREADS / 32;
        const bool has = lane < WARPS;
        const u32 wmn = __reduce_min_sync(0xFFFFFFFFu, has ? sRed[lane] : 0xFFFFFFFFu);
        const u32 wmx = __reduce_max_sync(0xFFFFFFFFu, has ? sRed[WARPS + lane] : 0u);
        if (lane == 0) {
            sMisc[MISC_RED_LO] = (int)wmn;
            sMisc[MISC_RED_HI] = (int)wmx;
        }
    }
}

// The keys of the smallest and the largest finite scores among a thread block's keys in registers
// (flo > fhi: none). Ends synced.
template <int N, int THREADS = SELECT_THREADS>
__device__ __forceinline__ void finite_key_range(const u32 (&key)[N], u32* sRed, int* sMisc, u32& flo, u32& fhi) {
    // key - (-inf's key + 1) wraps the non-numbers and -inf to the top; key + 2^23 wraps +inf's
    // key to the bottom, below every finite key's
    constexpr u32 LO = HISA_KEY_NEG_INF + 1u, HI = 0x00800000u;
    u32 mn = 0xFFFFFFFFu, mx = 0u;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        mn = min(mn, key[j] - LO);
        mx = max(mx, key[j] + HI);
    }
    warps_min_max<THREADS>(mn, mx, sRed);
    combine_warps_min_max<THREADS>(sRed, sMisc);  // one warp, for every thread through sMisc
    __syncthreads();
    const u32 wmn = (u32)sMisc[MISC_RED_LO], wmx = (u32)sMisc[MISC_RED_HI];
    // no finite key: wmx below the smallest finite key's image
    const bool any = wmx >= 0x00800000u + HI;  // score_key(-FLT_MAX) = 0x00800000
    flo = any ? wmn + LO : 1u;
    fhi = any ? wmx - HI : 0u;
    __syncthreads();
}

// LINEAR: bins of the one-level score order (regs_sort_linear) for fp32 scores by score, 0 for
// none. It pays where a row's keys fill little more than the top k's range (the filtered top-k's
// candidates: 2048 bins); over whole rows of randn scores most bins lie below the k-th key and
// the buckets above it fill up (4096 bins: [4096 x 8192] 9% slower than the levels over key bits).
// DIRECT_BITS: log2 of the bucket count of the score order straight from the registers
// (regs_sort_direct): 12 by default; 11 for topk_regs_kernel, whose launches are mostly of many rows
// (throughput-bound: fewer buckets to clear and scan), while the filtered select runs one
// latency-bound CTA per row (2048 buckets were 1.1 us slower there on an H200, session 19).
// WINDOW_SH: where > 0 and the row holds more than k keys, first the score order over the
// window of keys below the row's largest that its 2^DIRECT_BITS buckets hold at 2^WINDOW_SH keys
// each (regs_sort_direct with CUT: its buckets are the threshold's level), before the level over
// the row's whole range; 0 for none
// CUT_WINDOW_SH: where > 0, the threshold of the levels' path (every row that the score order
// above does not take) by cut_by_window, its first level over 2048 bins of 2^CUT_WINDOW_SH keys
// below the row's largest (the refinement's top-k: 14); 0: cut_by_levels over the row's range
// COHERENT: the row's keys by weak loads (load_row_keys), for rows a kernel running beside this
// one wrote (the refine top-k after the union kernel's ready flags, refine.cu)
// STRIDED: thread i holds four consecutive items of each of R / 4 groups, items 4 i + 4 THREADS u
// + [0, 4) (load_row_keys), so that each warp-wide 16-byte load covers 512 consecutive bytes
// (whole sectors) where the contiguous layout's loads lie 64 bytes apart; position order is then
// (group, thread, item), and the emit's slots come from scans by group (group_exclusive_scan)
template <int SRC, int MAP, int LINEAR = 0, int DIRECT_BITS = SORT_BITS, int THREADS = SELECT_THREADS,
          int WINDOW_SH = 0, int CUT_WINDOW_SH = 0, bool COHERENT = false, bool STRIDED = false>
__device__ void row_select_regs(const SelectArgs& a) {
    constexpr int R = REG_SELECT_ITEMS / THREADS;  // keys per thread (REG_SELECT_R at SELECT_THREADS)
    constexpr int WARPS = THREADS / 32;
    static_assert(R * THREADS == REG_SELECT_ITEMS && R % 4 == 0 && THREADS <= 1024, "the register layout");
    static_assert(!STRIDED || LINEAR == 0, "regs_sort_linear takes the contiguous layout");
    extern __shared__ __align__(16) char smem[];
    int* sHist = reinterpret_cast<int*>(smem);           // [SORT_BINS] (REG_SELECT_BINS for the levels)
    int* sScan = sHist + SORT_BINS;                      // [32]
    int* sMisc = sScan + 32;                             // [32]
    u64* sSel = reinterpret_cast<u64*>(sMisc + 32);      // [sort_cap] selected entries (by_score)
    u64* sAux = sSel + a.sort_cap;                       // [sort_cap] the sort's scratch (by_score)
    // [3][WARPS] the first reduction, past the bins that a level or sort clears first (at most
    // REG_SELECT_BINS; a sort of more buckets without a level before it syncs first), so that no
    // barrier need separate its reads from that clear
    u32* sRed = reinterpret_cast<u32*>(sHist + REG_SELECT_BINS);
    static_assert(REG_SELECT_BINS + 3 * WARPS <= SORT_BINS && LINEAR <= REG_SELECT_BINS &&
                      (WINDOW_SH == 0 || (1 << DIRECT_BITS) <= REG_SELECT_BINS),
                  "sRed lies past every first clear");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row = blockIdx.x;
    const int t = a.row0 + (int)row;
    const int len = (SRC == KEYS_F32 && a.lengths) ? max(0, min(a.lengths[t], a.ncols)) : a.ncols;
    const int n_items = (SRC == KEYS_F32) ? len : a.ncols;
    const int k = a.k;
    // this thread's items: first + reg_item_offset(j), [first, first + R) where not STRIDED
    const int first = STRIDED ? 4 * tid : tid * R;
    auto item = [&](int j) { return first + reg_item_offset<R, THREADS, STRIDED>(j); };

    u32 key[R];
    const u32* words = SRC == KEYS_U32 ? a.keys + row * a.ld : reinterpret_cast<const u32*>(a.scores + row * a.ld);
    load_row_keys<SRC, false, R, COHERENT, STRIDED, THREADS>(words, 0, n_items, first, key);
    // mn: the smallest key minus one, so that HISA_KEY_NONE (0) wraps to the largest value and
    // never wins; every fp32 score has a key >= 1, so the float path counts its valid items
    // from the row length alone
    u32 mn = 0xFFFFFFFFu, mx = 0u;
    int cnt = 0;
    if constexpr (SRC == KEYS_F32) {
        if constexpr (STRIDED) {
#pragma unroll
            for (int u = 0; u < R / 4; ++u) cnt += max(0, min(4, n_items - item(4 * u)));
        } else {
            cnt = max(0, min(R, n_items - first));
        }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
        mn = min(mn, key[j] - 1u);
        mx = max(mx, key[j]);
        if (SRC == KEYS_U32) cnt += key[j] != HISA_KEY_NONE;
    }
    mn = __reduce_min_sync(0xFFFFFFFFu, mn);
    mx = __reduce_max_sync(0xFFFFFFFFu, mx);
    cnt = (int)__reduce_add_sync(0xFFFFFFFFu, (unsigned)cnt);
    if (lane == 0) {
        sRed[warp] = mn;
        sRed[WARPS + warp] = mx;
        sRed[2 * WARPS + warp] = (u32)cnt;
    }
    __syncthreads();
    // every warp combines the warps' values itself (WARPS <= 32): no second barrier. sRed is next
    // written past a barrier (it lies past the bins a level or the window clears first)
    u32 lo, hi;  // lo: 0 when no candidates
    int n_valid;
    {
        const bool has = lane < WARPS;
        lo = __reduce_min_sync(0xFFFFFFFFu, has ? sRed[lane] : 0xFFFFFFFFu) + 1u;
        hi = __reduce_max_sync(0xFFFFFFFFu, has ? sRed[WARPS + lane] : 0u);
        n_valid = (int)__reduce_add_sync(0xFFFFFFFFu, has ? sRed[2 * WARPS + lane] : 0u);
    }
    const u32 key_lo = lo, key_hi = hi;  // the row's range of candidate keys

    if (SRC == KEYS_F32 && a.by_score && k > 0 && n_valid > 0) {
        // score order (hisa_cupy.topk; the ranking-key selects keep the general path, whose
        // registers this code would spill): with LINEAR, one level of bins by value
        // (regs_sort_linear); with WINDOW_SH, the buckets of the keys below the largest as the
        // level (regs_sort_direct with CUT); else, or where that gives way, the keys from the lowest of the
        // first level's bin (the bin that holds the k-th largest; every key when all are
        // selected) up are sorted straight from the registers where they fit the selected list
        // and its scratch (regs_sort_direct)
        const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
        if constexpr (LINEAR > 0) {
            // the finite scores' range: the row's own where its ends are numbers
            u32 flo = key_lo, fhi = key_hi;
            if (key_lo <= HISA_KEY_NEG_INF || key_hi >= 0xFF800000u)  // -inf or NaN; +inf's key
                finite_key_range<R, THREADS>(key, reinterpret_cast<u32*>(sHist), sMisc, flo, fhi);
            if (flo <= fhi && regs_sort_linear<SRC, MAP, LINEAR, R, THREADS>(a, row, t, rel, key, first, flo, fhi,
                                                                             n_valid, sHist, sScan, sMisc, sSel)) {
                pad_row<SRC>(a, row, min(k, n_valid) + tid, THREADS);
                return;
            }
        }
        if (WINDOW_SH > 0 && n_valid > k) {
            // for fp32 scores 2^23 keys are one binade: at WINDOW_SH 14 and 2048 buckets, the
            // four binades below the row's largest score (or the row's whole range, if smaller)
            constexpr u32 WIDTH = ((u32)1u << (DIRECT_BITS + WINDOW_SH)) - 1u;
            const u32 wlo = key_hi - key_lo > WIDTH ? key_hi - WIDTH : key_lo;
            if (regs_sort_direct<SRC, MAP, DIRECT_BITS, R, THREADS, true, STRIDED>(a, row, t, rel, key, first, wlo,
                                                                                   key_hi, k, sHist, sScan, sMisc,
                                                                                   sSel))
                return;  // k of more than k keys: no padding
        }
        u32 floor_key = key_lo;
        int count = n_valid;
        if (n_valid > k) {
            const RangeLevel L = range_level<R, THREADS>(key, lo, hi, k, sHist, sScan, sMisc);
            floor_key = L.blo;
            count = L.above + L.in_bin;
        }
        const int n_out = min(k, n_valid);
        if ((1 << DIRECT_BITS) > REG_SELECT_BINS && n_valid <= k) __syncthreads();  // sRed read before the clear
        if (count <= 2 * a.sort_cap &&
            regs_sort_direct<SRC, MAP, DIRECT_BITS, R, THREADS, false, STRIDED>(a, row, t, rel, key, first, floor_key,
                                                                                key_hi, n_out, sHist, sScan, sMisc,
                                                                                sSel)) {
            pad_row<SRC>(a, row, n_out + tid, THREADS);
            return;
        }
    }

    // selected: key >= cut (cut >= 1 excludes HISA_KEY_NONE), plus, when ties, the first `need`
    // keys equal to `tie` in position order
    u64 cut = 1u;
    bool ties = false;
    u32 tie = 0u;
    int need = 0;
    if (n_valid > k && k > 0) {
        if constexpr (CUT_WINDOW_SH > 0)
            cut_by_window<R, CUT_WINDOW_SH, THREADS>(key, lo, hi, k, sHist, sScan, sMisc, cut, ties, tie, need);
        else
            cut_by_levels<R, THREADS>(key, lo, hi, k, sHist, sScan, sMisc, cut, ties, tie, need);
    }

    // this thread's selected items as bits (item first + j), then the tied ones it keeps
    const u32 above = (u32)(cut - 1u);  // cut in [1, 2^32]: key >= cut is key > above
    u32 sel = 0u, eq = 0u;
#pragma unroll
    for (int j = 0; j < R; ++j) {
        sel |= (u32)(key[j] > above) << j;
        eq |= (u32)(ties && key[j] == tie) << j;  // tie >= 1 when ties
    }
    int slot = 0;
    // STRIDED, position order: each group's first slot. Scanned beside the ties' scan where the
    // emit looks up MAP_GATHER's blocks (the refinement's top-k), in the emit's own branch otherwise:
    // either place gives the same slots, and each kernel keeps the code it was measured in
    // (topk_regs_kernel with the scan here and its emit by groups of four: 40 instructions and
    // 56 / 32 bytes of spill stores / loads more, 0.8% slower on wide rows: bench/NOTES.md, session 50)
    constexpr bool GATHER_RUNS = STRIDED && MAP == MAP_GATHER;
    int gslot[STRIDED ? R / 4 : 1];
    if constexpr (STRIDED) {
        // position order is (group, thread, item): the ties kept by scans over the groups' counts
        // (group_exclusive_scan); the selected list's slots in any order (sorted after), the
        // emit's in position order (below)
        constexpr int G = R / 4;
        if (ties) {  // the same for every thread
            int b[G];
            group_exclusive_scan<G, THREADS>(eq, b, sScan);
#pragma unroll
            for (int u = 0; u < G; ++u) {
                int r = b[u];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = 4 * u + i;
                    if ((eq >> j) & 1u) {
                        sel |= (u32)(r < need) << j;
                        ++r;
                    }
                }
            }
        }
        if (a.by_score) {
            int total;
            slot = block_exclusive_scan<THREADS>(__popc(sel), sScan, &total);
        } else if constexpr (GATHER_RUNS) {
            group_exclusive_scan<G, THREADS>(sel, gslot, sScan);
        }
    } else {
        int total;  // selected above the threshold | tied (16-bit halves: each at most 8192)
        const int before = block_exclusive_scan<THREADS>(__popc(sel) | (__popc(eq) << 16), sScan, &total);
        const int eq_before = before >> 16;
        slot = (before & 0xFFFF) + min(need, eq_before);  // ties kept by the threads before this one
        if (ties) {
            int r = eq_before;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if ((eq >> j) & 1u) {
                    sel |= (u32)(r < need) << j;
                    ++r;
                }
            }
        }
    }

    const int n_out = min(k, n_valid);
    const int rel = a.relative ? row_range(a.ks, a.ke, t, a.T, a.S).ks : 0;
    if (a.by_score) {  // straight-line: a predicated store per item
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int s = (sel >> j) & 1u;
            if (s && slot < n_out) sSel[slot] = list_entry(key[j], item(j));
            slot += s;
        }
        __syncthreads();
        // every selected key lies in [lowest, key_hi]: the threshold's key (or the row's lowest
        // key when all are selected) up to the row's largest
        const u32 lowest = n_valid > k ? (ties ? tie : above + 1u) : key_lo;
        sort_and_emit<SRC, MAP, THREADS>(a, row, t, rel, sSel, sAux, n_out, sHist, sScan, sMisc, lowest, key_hi);
    } else if ((!STRIDED || GATHER_RUNS) && items_are_a_run<MAP, STRIDED ? 4 : R>(a)) {
        // the thread's items are a run of positions (STRIDED: each group's four): one lookup
        // (MAP_GATHER: of their block, only where one is selected: past the row's blocks there is
        // none), then base + j. Per item (a shift, a mask, a 64-bit index and a load each) the emit
        // was ~45% of refine_topk_regs_kernel's instructions (ncu, hisa 128K/4096: bench/NOTES.md,
        // session 32).
        int base = !STRIDED && sel != 0u ? item_position<MAP>(a, t, first) - rel : 0;
        int* out = a.out_idx + row * a.out_ld;
        asm("mov.b64 %0, %0;" : "+l"(out));  // opaque: out + slot is one wide multiply-add per item, not
                                             // row * out_ld + slot redone in 64 bits for each
#pragma unroll
        for (int j = 0; j < R; ++j) {
            if (STRIDED && (j & 3) == 0) {
                slot = gslot[j >> 2];
                base = ((sel >> j) & 0xFu) != 0u ? item_position<MAP>(a, t, item(j)) - rel - j : 0;
            }
            const int s = (sel >> j) & 1u;
            const bool w = s && slot < n_out;
            store_if(out + slot, base + j, w);  // a predicated store: no branch per item
            if (w) write_value<SRC>(a, row, slot, item(j));
            slot += s;
        }
    } else {
        if constexpr (STRIDED && !GATHER_RUNS) group_exclusive_scan<R / 4, THREADS>(sel, gslot, sScan);
#pragma unroll
        for (int j = 0; j < R; ++j) {
            if (STRIDED && (j & 3) == 0) slot = gslot[j >> 2];
            const int s = (sel >> j) & 1u;
            if (s && slot < n_out) emit_item<SRC, MAP>(a, row, t, rel, slot, item(j));
            slot += s;
        }
    }
    pad_row<SRC>(a, row, n_out + tid, THREADS);
}

// Flat kernel parameter list (CuPy passes scalars and pointers, not structs) and its packing.
#define SELECT_PARAMS                                                                          \
    const u32 *keys, const float *scores, long long ld, int ncols, const int *lengths, int k,  \
        int cache_cap, int row0, int T, int S, const int *ks, const int *ke, const int *blocks, \
        int m, int B, int col0, int relative, int by_score, int sort_cap, int lists,            \
        int cand_cap, int ring, int *out_idx, long long out_ld, float *out_val
#define SELECT_ARGS                                                                             \
    SelectArgs { keys, scores, ld, ncols, lengths, k, cache_cap, row0, T, S, ks, ke, blocks, m, B, \
                 col0, relative, by_score, sort_cap, lists, cand_cap, ring, out_idx, out_ld, out_val }
