"""Measurement skeletons of the union kernel (refine_union_wgmma_kernel): copies of a snapshot
tree whose score_wgmma.cuh has one part of the union path's tile loop taken out, for an A/B that
splits the kernel's time by subtraction (bench/NOTES.md, session 16). Results are wrong by design,
except loop2's (each CTA runs its tile loop twice: loop2 - tree = the loop) and copy2's.

    bash bench/snapshots.sh main                       # -> .snap/main
    python bench/union_skeletons.py .snap/main         # -> .snap/main-skel-{nocopy,nokeys,...}
    # then, on the device, per tree: python bench/profile_run.py --op hisa --kernels --calls 10

The edits match main's source text exactly and fail loudly (an assertion) once it changes. Where the
union kernel's two maps differ (its TILE_MAP instance, the default at B = 128, and the per-item one),
an edit takes both (nocopy: their shared row copy; nokeys and copy2: one edit each).
"""
import os
import shutil
import sys

KERNEL = "kernels/cuda/score_wgmma.cuh"


def make(tree, name, edits):
    dst = f"{tree.rstrip('/')}-skel-{name}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tree, dst)
    path = os.path.join(dst, KERNEL)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for old, new in edits:
        assert text.count(old) == 1, f"{name}: the source no longer holds {old[:60]!r}"
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(dst)


# 1. no key-row copies on the union path (the per-item map still copies its key scales)
nocopy = [("""        for (int i = 0; i < Shape::KCHUNKS / 2; ++i)
            cp_async16((dst ^ ((u32)(i & 3) << 5)) + h * H_ROWS * 128 + (i >> 2) * (SCORE_TILE * 128), src + i * 32, ok);""",
           """        for (int i = 0; i < (UNION ? 0 : Shape::KCHUNKS / 2); ++i)
            cp_async16((dst ^ ((u32)(i & 3) << 5)) + h * H_ROWS * 128 + (i >> 2) * (SCORE_TILE * 128), src + i * 32, ok);""")]
# 2. keys computed, not stored (a store only for an impossible key keeps the sums alive)
nokeys = [("""                store_if(reinterpret_cast<int*>(orow(r)) + (UNION ? max(col, 0) : in ? col : 0), (int)key, live[r] && in);""",
"""                store_if(reinterpret_cast<int*>(orow(r)) + (UNION ? max(col, 0) : in ? col : 0), (int)key,
                         live[r] && in && (!UNION || key == 0xDEADBEEFu));"""),
          ("""            store_if(key_out[r] + (unsigned long long)max(idx[r], 0) * SCORE_TILE, (int)key, live[r] && idx[r] >= 0);""",
           """            store_if(key_out[r] + (unsigned long long)max(idx[r], 0) * SCORE_TILE, (int)key,
                     live[r] && idx[r] >= 0 && key == 0xDEADBEEFu);""")]
# 3. no MMAs on the union path (fence and commit kept)
nomma = [("""            WgmmaRS<N>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4), kk);""",
"""            if (!UNION) WgmmaRS<N>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + (kk & 3) * 32) >> 4), kk);"""),
("""            WgmmaRS<H>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + r * H * 128 + (kk & 3) * 32) >> 4), kk);""",
"""            if (!UNION) WgmmaRS<H>::run(a, af[kk], q_lo + (u32)(((kk >> 2) * (N * 128) + r * H * 128 + (kk & 3) * 32) >> 4), kk);""")]
# 4. the tile loop twice (same keys rewritten: results still right); loop2 - main = the loop
loop2 = [("""        if constexpr (TMAP) __syncthreads();  // q staged by every warp (the tiles have no CTA barrier)
        for (int j = j_first; j < min(j_stop, split_runs[0]); ++j) tile(j, -1);
        for (int j = max(j_first, split_runs[0]); j < min(j_stop, split_runs[1]); ++j) tile(j, 0);
        for (int j = max(j_first, split_runs[1]); j < j_stop; ++j) tile(j, 1);""",
"""        if constexpr (TMAP) __syncthreads();  // q staged by every warp (the tiles have no CTA barrier)
        for (int rep = 0; rep < 2; ++rep) {
            if (rep == 1) {
#pragma unroll
                for (int s = 0; s < NBUF - 1; ++s) stage(j_first + s, slot + s < NBUF ? slot + s : slot + s - NBUF);
            }
            for (int j = j_first; j < min(j_stop, split_runs[0]); ++j) tile(j, -1);
            for (int j = max(j_first, split_runs[0]); j < min(j_stop, split_runs[1]); ++j) tile(j, 0);
            for (int j = max(j_first, split_runs[1]); j < j_stop; ++j) tile(j, 1);
        }""")]
# 5. no per-tile CTA barrier on the union path's per-item map either (the TILE_MAP tiles have none;
# data racy for the per-item map: timing only)
nobar = [("""            if constexpr (TMAP) __syncwarp(); else __syncthreads();""", """            __syncwarp();""")]
# 6. the copies issued but never waited for (data racy: timing only)
nowait = [("""        auto tile = [&](int j, int only) {
            cp_async_wait<NBUF - 2>();  // no proxy fence: register A (see the loop below)""",
           """        auto tile = [&](int j, int only) {""")]
# 7. every key-row copy issued twice (results right: the same bytes land twice)
copy2 = [("""            for (int h = 0; h < 2; ++h) {
                const int rw = __shfl_sync(0xFFFFFFFFu, row, h * 16 + pair);""", """            for (int hh = 0; hh < (UNION ? 4 : 2); ++hh) {
                const int h = hh & 1;
                const int rw = __shfl_sync(0xFFFFFFFFu, row, h * 16 + pair);"""),
         ("""                for (int h = 0; h < 2; ++h) {
                    const int rw = first + h * 64 + warp * 16 + pair;""", """                for (int hh = 0; hh < 4; ++hh) {
                    const int h = hh & 1;
                    const int rw = first + h * 64 + warp * 16 + pair;""")]
# 8. the A fragments not read from the tile buffers (made up in registers; the copies kept)
nofrag = [("""        if constexpr (Shape::FP8A) fp8a_fragments<BULK>(sK + slot * Shape::K_BYTES, half, warp, lane, af);""",
"""        if constexpr (UNION) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
                for (int e = 0; e < 4; ++e) af[kk][e] = 0x3C003C00u ^ (u32)(lane * 4 + kk + e + half + slot);
        } else if constexpr (Shape::FP8A) {
            fp8a_fragments<BULK>(sK + slot * Shape::K_BYTES, half, warp, lane, af);
        }""")]

SKELETONS = {"nocopy": nocopy, "nokeys": nokeys, "nomma": nomma, "loop2": loop2, "nobar": nobar,
             "nowait": nowait, "copy2": copy2, "nofrag": nofrag}

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python {sys.argv[0]} TREE [NAME...]  (names: {' '.join(SKELETONS)})")
    for skel in sys.argv[2:] or SKELETONS:
        make(sys.argv[1], skel, SKELETONS[skel])
