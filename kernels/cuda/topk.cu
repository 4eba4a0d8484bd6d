// topk.cu — the standalone exact row top-k (hisa_cupy.topk): fp32 scores [R, N] with optional
// per-row lengths, SPEC §3 ranking, values and int32 indices in rank order, -1 / -inf padding.
#include "common.cuh"
#include "row_select.cuh"
#include "row_filter.cuh"

__global__ void __launch_bounds__(SELECT_THREADS) topk_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_F32, MAP_IDENTITY>(SELECT_ARGS);
}

// many rows of at most 8192 columns (throughput-bound): the score order's buckets are 2048
// (row_select_regs, DIRECT_BITS), first over the four binades below the row's largest score
// (WINDOW_SH 14: 2^14 keys a bucket, 2^25 in all); the rows' keys in the STRIDED register layout,
// each warp-wide load whole sectors (kernel 92.9 -> 85.7 us on [4096 x 8192] randn rows, H200,
// bench/NOTES.md, session 49)
__global__ void __launch_bounds__(SELECT_THREADS, REG_SELECT_MIN_CTAS) topk_regs_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select_regs<KEYS_F32, MAP_IDENTITY, 0, 11, SELECT_THREADS, 14, 0, false, true>(SELECT_ARGS);
}

// Few long rows, split (cupy_backend._topk_split): each row is m chunks of B columns, one CTA per
// chunk keeps the chunk's top k in position order with their values (MAP_CHUNKS: positions in the
// whole row); then one CTA per row ranks the m * k kept values, whose order by chunk then position
// is the row's position order, so ties still go to the lower column (MAP_GATHER with B = 1 reads
// each kept item's column back). The row's top k are among the chunks' top k: an item that fewer
// than k items of the row outrank has fewer than k outranking it in its chunk.
__global__ void __launch_bounds__(SELECT_THREADS) topk_chunks_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_F32, MAP_CHUNKS>(SELECT_ARGS);
}

__global__ void __launch_bounds__(SELECT_THREADS) topk_merge_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_F32, MAP_GATHER>(SELECT_ARGS);
}

// the merge of at most REG_SELECT_ITEMS kept items per row (P * k; two chunks of k = 2048) in
// register mode
__global__ void __launch_bounds__(SELECT_THREADS, REG_SELECT_MIN_CTAS) topk_merge_regs_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select_regs<KEYS_F32, MAP_GATHER>(SELECT_ARGS);
}

// ----------------------------------------------------------------------------------------------
// Filtered top-k over long rows (row_filter.cuh; cupy_backend._topk_filter): candidates above a
// sampled threshold, their top k, and the rows where that cannot be exact redone whole.

HISA_FILTER_KERNELS(topk, KEYS_F32, MAP_IDENTITY)
