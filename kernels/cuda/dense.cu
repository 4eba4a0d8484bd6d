// dense.cu — the flat DSA baseline (SPEC §4): token scores of every key in [ks, ke) for a chunk of
// query rows (score_tile, ITEMS_TOKENS; tiles past the causal edge are skipped), then the exact
// top-k (row_select, MAP_TOKENS; long rows through row_filter.cuh's sampled threshold). The host
// processes row chunks so the workspace stays bounded.
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
