// block_select.cu — stage 1b: block scores fused with causal eligibility and the forced first/last
// eligible blocks (score_tile, ITEMS_BLOCKS), then the block top-m (row_select) writing int32
// [T, m] block ids ascending, -1 padded (SPEC §5.3-§5.4).
#include "common.cuh"
#include "score_tile.cuh"
#include "score_wgmma.cuh"
#include "row_select.cuh"

template <int ENGINE, int QDT, int PDT, int H, int D, int ROWS>
__global__ void __launch_bounds__(SCORE_THREADS) block_score_kernel(
    const void* q, const void* pooled, const float* weights, const float* pscale, const int* ks,
    const int* ke, int T, int S, int B, int nb, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    grid_dependency_sync();
    score_tile<ENGINE, QDT, PDT, H, D, ITEMS_BLOCKS, ROWS>(q, pooled, weights, pscale, ks, ke, nullptr, T, S, B, 0,
                                                           nb, 0, row0, nrows, out, ld, tiles_per_cta);
}

// the same on Hopper: wgmma engine (score_wgmma.cuh), sm_90a only. HALF (16-bit pooled keys,
// ROWS * H = 128; cupy_backend.BLOCK_SCORE_HALF): half-tile key buffers and one accumulator set,
// three CTAs per SM (score_tile_wgmma's HALF). The other instances ask no minimum (0): asked for
// one, ptxas allocated their registers differently (nvdisasm)
template <int ENGINE, int QDT, int PDT, int H, int D, int ROWS, int HALF = 0>
__global__ void __launch_bounds__(SCORE_THREADS, HALF ? 3 : 0) block_score_wgmma_kernel(
    const void* q, const void* pooled, const float* weights, const float* pscale, const int* ks,
    const int* ke, int T, int S, int B, int nb, int row0, int nrows, u32* out, long long ld, int tiles_per_cta) {
    // score_tile_wgmma waits for the pool (grid_dependency_sync) after its q loads
    score_tile_wgmma<ENGINE, QDT, PDT, H, D, ITEMS_BLOCKS, ROWS, false, HALF != 0>(
        q, pooled, weights, pscale, ks, ke, nullptr, T, S, B, 0, nb, 0, row0, nrows, out, ld, tiles_per_cta);
}

__global__ void __launch_bounds__(SELECT_THREADS) block_topm_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select<KEYS_U32, MAP_IDENTITY>(SELECT_ARGS);
}

// short rows in position order: one warp per row (row_select_warp), WARP_SELECT_ROWS rows per CTA,
// R keys per lane (rows of at most 32 R blocks: 8, 16 or 32, cupy_backend._warp_keys_per_lane);
// with `unions` (not null) also the pairs' records of the union path (grouped: its block order);
// the threshold search bounded by the lanes' second largest keys (row_select_warp's BOUND);
// `early`: triggers the launch after it, the union kernel, at its start (cupy_backend._refine_plan);
// `epoch` (or null): advanced by one per launch, after the wait, for the union kernel's ready
// flags (refine.cu: every flag of an earlier call holds an earlier epoch)
template <int R>
__global__ void __launch_bounds__(32 * WARP_SELECT_ROWS) block_topm_warp_kernel(SELECT_PARAMS, int rows, int* unions,
                                                                                int grouped, int early,
                                                                                unsigned* epoch) {
    grid_dependency_sync();
    if (early) grid_dependents_launch();  // the union CTAs read the epoch after their own wait
    if (epoch != nullptr && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(epoch, 1u);
    row_select_warp<KEYS_U32, MAP_IDENTITY, R, true>(SELECT_ARGS, rows, unions, grouped);
}

__global__ void __launch_bounds__(SELECT_THREADS, REG_SELECT_MIN_CTAS) block_topm_regs_kernel(SELECT_PARAMS) {
    grid_dependency_sync();
    row_select_regs<KEYS_U32, MAP_IDENTITY>(SELECT_ARGS);
}
