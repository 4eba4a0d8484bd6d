// refine.cu — stage 2: token scores of every candidate of each row's selected blocks
// (score_tile, ITEMS_GATHER), then the exact top-k with index translation (row_select,
// MAP_GATHER): positions relative or absolute, ascending or by score, -1 padded (SPEC §5.5-§5.6).
#include "common.cuh"
#include "score_tile.cuh"
#include "score_wgmma.cuh"
#include "row_select.cuh"

template <int ENGINE, int QDT, int KDT, int H, int D>
__global__ void __launch_bounds__(SCORE_THREADS) refine_score_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    const int* blocks, int T, int S, int B, int m, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    grid_dependency_sync();
    score_tile<ENGINE, QDT, KDT, H, D, ITEMS_GATHER, 1>(q, k, weights, kscale, ks, ke, blocks, T, S, B, m, m * B,
                                                        0, row0, nrows, out, ld, tiles_per_cta);
}

// the same on Hopper: wgmma engine (score_wgmma.cuh), sm_90a only
template <int ENGINE, int QDT, int KDT, int H, int D>
__global__ void __launch_bounds__(SCORE_THREADS) refine_score_wgmma_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    const int* blocks, int T, int S, int B, int m, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    // score_tile_wgmma waits for the block top-m (grid_dependency_sync) after its q loads
    score_tile_wgmma<ENGINE, QDT, KDT, H, D, ITEMS_GATHER, 1>(q, k, weights, kscale, ks, ke, blocks, T, S, B, m,
                                                              m * B, 0, row0, nrows, out, ld, tiles_per_cta);
}

// Hopper, pairs of rows whose blocks come from select_blocks (strictly ascending, -1 padded): one
// CTA scores the union of the two rows' blocks once for both rows (neighbouring queries share
// most of their blocks, so each key tile is loaded once and the MMA is 64 x 128). `unions`: the
// pairs' unions as the block top-m recorded them (common.cuh, pair_record_ints), or null: each CTA
// merges its pair's two lists itself. The launch's pairs in order, each split into even shares
// (UnionShare), one CTA each: the first head_pairs pairs into head_splits shares, the others into
// tail_splits (more, shorter CTAs at the end of the launch: a shorter tail where the first pairs
// take fewer CTAs, each staging q and its union once).
// ready (or null): each CTA, once its keys are written, stores the call's epoch (*epoch, which
// the block top-m advanced) into ready[blockIdx.x], and the launch triggers the refine top-k
// after its own wait, so that refine_topk_ready_regs_kernel's CTAs start on the SMs this launch
// leaves in its last wave and select each row as soon as its pair's CTAs are done.
// TILE_MAP: score_tile_wgmma's per-tile map, where B = SCORE_TILE (the host's choice,
// _refine_plan), with three CTAs per SM asked of ptxas (left free, it took 234 registers for this
// form: two CTAs per SM).
template <int ENGINE, int QDT, int KDT, int H, int D, bool TILE_MAP = false>
__global__ void __launch_bounds__(SCORE_THREADS, TILE_MAP ? 3 : 0) refine_union_wgmma_kernel(
    const void* q, const void* k, const float* weights, const float* kscale, const int* ks, const int* ke,
    const int* blocks, int T, int S, int B, int m, int row0, int nrows, u32* out, long long ld, int tiles_per_cta,
    const int* unions, int head_pairs, int head_splits, int tail_splits, unsigned* ready, const unsigned* epoch) {
    // score_tile_wgmma waits for the block top-m (grid_dependency_sync) after its q loads
    const int b = blockIdx.x, head = head_pairs * head_splits;
    const bool in_head = b < head;
    const int splits = in_head ? head_splits : tail_splits, i = in_head ? b : b - head;
    const int pair = (in_head ? 0 : head_pairs) + i / splits;
    score_tile_wgmma<ENGINE, QDT, KDT, H, D, ITEMS_UNION, 2, false, false, TILE_MAP>(
        q, k, weights, kscale, ks, ke, blocks, T, S, B, m, m * B, 0, row0, nrows, out, ld, tiles_per_cta, unions,
        AppendOut{nullptr, nullptr, nullptr, nullptr, 0}, 2 * pair, UnionShare{i % splits, splits}, ready != nullptr);
    if (ready != nullptr) {
        __syncthreads();  // every thread's keys are written (score_tile_wgmma returns CTA-wide)
        if (threadIdx.x == 0) st_release_gpu(ready + b, ld_acquire_gpu(epoch));
    }
}

__global__ void __launch_bounds__(SELECT_THREADS) refine_topk_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_U32, MAP_GATHER>(SELECT_ARGS);
}

// short rows in position order: one warp per row (row_select_warp), WARP_SELECT_ROWS rows per CTA
__global__ void __launch_bounds__(32 * WARP_SELECT_ROWS) refine_topk_warp_kernel(SELECT_PARAMS, int rows) {
    grid_dependency_sync();
    row_select_warp<KEYS_U32, MAP_GATHER>(SELECT_ARGS, rows);
}

// the refinement's rows of m * B candidates in register mode, four CTAs per SM (32 registers)
// rather than REG_SELECT_MIN_CTAS' three: at T = 1024 its 1024 rows then take two waves of 528
// CTAs instead of three of 396 (the third 59% full). The threshold's first level covers the four
// binades below the row's largest score (cut_by_window, 2048 bins of 2^14 keys), where the
// refinement's k-th largest lies, and a bin of the k-th of few keys is ranked directly. The keys
// in the STRIDED register layout, each warp-wide load whole sectors (99.9 -> 86.3 us at 128K /
// 4096, H200, bench/NOTES.md, session 49)
#define REFINE_SELECT_MIN_CTAS 4
__global__ void __launch_bounds__(SELECT_THREADS, REFINE_SELECT_MIN_CTAS) refine_topk_regs_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select_regs<KEYS_U32, MAP_GATHER, 0, SORT_BITS, SELECT_THREADS, 0, 14, false, true>(SELECT_ARGS);
}

// The same after a union launch with ready flags (refine_union_wgmma_kernel's `ready`, laid out
// by head_pairs / head_splits / tail_splits as that launch's CTAs): instead of waiting for the
// whole union launch, the CTA of row blockIdx.x (pair blockIdx.x / 2 of the launch) waits until
// each CTA of its pair has stored this call's epoch, then reads the row with coherent loads. It
// waits for the union launch at its end all the same, so that it completes after it (what stream
// order promises the kernels after it). A flag not set within UNION_READY_TIMEOUT_NS traps (a
// launch error) rather than hanging the GPU.
#define UNION_READY_TIMEOUT_NS 30000000000ull  // 30 s: far past any union launch; only a bug gets here
__global__ void __launch_bounds__(SELECT_THREADS, REFINE_SELECT_MIN_CTAS) refine_topk_ready_regs_kernel(
    SELECT_PARAMS, const unsigned* ready, const unsigned* epoch, int head_pairs, int head_splits, int tail_splits) {
    if (threadIdx.x < 32) {
        const int pair = (int)blockIdx.x >> 1, lane = threadIdx.x;
        const bool in_head = pair < head_pairs;
        const int splits = in_head ? head_splits : tail_splits;
        const int c0 = in_head ? pair * head_splits : head_pairs * head_splits + (pair - head_pairs) * tail_splits;
        if (lane < splits) {  // a lane per CTA of the pair (at most 32)
            const unsigned e = ld_acquire_gpu(epoch);
            const unsigned long long t0 = global_timer_ns();
            while (ld_acquire_gpu(ready + c0 + lane) != e) {
                __nanosleep(256);
                if (global_timer_ns() - t0 > UNION_READY_TIMEOUT_NS) __trap();
            }
        }
        __syncwarp();
    }
    __syncthreads();
    row_select_regs<KEYS_U32, MAP_GATHER, 0, SORT_BITS, SELECT_THREADS, 0, 14, true, true>(SELECT_ARGS);
    grid_dependency_sync();
}
