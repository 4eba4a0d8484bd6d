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
