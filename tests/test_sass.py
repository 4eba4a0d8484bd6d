"""Machine-code properties of kernels that the GPU tests cannot see (no GPU needed): the wgmma score
kernels keep every relu of their head sums, and the selects' hot loops keep the form they were
measured in.

nvcc compiles each kernel for sm_90a twice, to PTX and to a cubin, and nvdisasm (the
``nvidia-cuda-nvdisasm`` wheel of the test extras) disassembles the cubin: the SASS must hold as
many FMNMX instructions as the PTX has ``max.NaN.f32`` relus. A dense-kernel variant of session 24
(bench/NOTES.md) had right PTX and wrong keys: ptxas merged the relus of row 0's two MMA halves,
which read the same PTX accumulator registers with a ``wgmma.mma_async`` redefining them in
between (96 FMNMX against 128). The GPU tests caught that one by its keys; this catches the same
miscompile in any of these kernels without a GPU.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from hisa_cupy.kernels import cupy_backend

from test_cuda_compile import _nvcc

KERNELS = [
    ("dense.cu", "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("dense.cu", "dense_score_append_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("dense.cu", "dense_score_rescue_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("refine.cu", "refine_union_wgmma_kernel<2, 0, 0, 64, 128>"),
    ("refine.cu", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>"),
    ("block_select.cu", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>"),
]
#: the union kernel's two instances: per-item map, per-tile map (TILE_MAP, UNION_TILE_MAP's default)
UNION_KERNELS = ["refine_union_wgmma_kernel<2, 0, 0, 64, 128>", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>"]


def _nvdisasm():
    found = shutil.which("nvdisasm")
    for site in sys.path:
        found = found or next(iter(glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "nvdisasm"))), None)
    if found is None:
        pytest.fail("nvdisasm not found: install the test extras (nvidia-cuda-nvdisasm)")
    return found


def _function(text, splitter, stem):
    """The part of a PTX or SASS listing that belongs to the one kernel whose name contains stem."""
    parts = [p for p in re.split(splitter, text) if stem in p.split("(")[0].split(" ")[0]]
    assert len(parts) == 1, f"{stem}: {len(parts)} functions found"
    return parts[0]


def _compile(tmp_path, filename, expr, kinds=("ptx", "cubin")):
    """(PTX, SASS) of one kernel instance, nvcc for sm_90a (None for a kind not asked for). Fails
    where ptxas reports that it serialised a kernel's wgmma (its C75xx performance messages, e.g.
    C7514 for accumulators read while their MMA may still be in flight, as across a loop's back
    edge: a software-pipelined block-score loop of session 33 got it, bench/NOTES.md)."""
    src = cupy_backend.load_source(filename) + f"\nvoid* hisa_instances[] = {{ (void*)&{expr} }};\n"
    (tmp_path / "unit.cu").write_text(src)
    options = list(cupy_backend._COMPILE_OPTIONS) + ["-arch=sm_90a"]
    for kind in kinds:
        verbose = ["-Xptxas", "-v"] if kind == "cubin" else []
        proc = subprocess.run([_nvcc(), *options, *verbose, f"-{kind}", "unit.cu", "-o", f"unit.{kind}"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (tmp_path / f"ptxas-{kind}.txt").write_text(proc.stderr)  # -v's register and spill lines (cubin)
        serialised = re.findall(r"\(C75\d\d\)[^\n]*", proc.stderr)
        assert not serialised, f"{expr}: ptxas serialised wgmma: {serialised[0]}"
    stem = expr.split("<")[0]
    ptx = _function((tmp_path / "unit.ptx").read_text(), r"\.visible \.entry ", stem) if "ptx" in kinds else None
    proc = subprocess.run([_nvdisasm(), "-c", "unit.cubin"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ptx, _function(proc.stdout, r"//-+ \.text\.", stem)


@pytest.mark.parametrize("filename, expr", KERNELS)
def test_relus_survive_ptxas(tmp_path, filename, expr):
    ptx, sass = _compile(tmp_path, filename, expr)
    relus = ptx.count("max.NaN.f32")
    assert relus >= 128, f"{expr}: {relus} relus in the PTX (the head sums' count changed?)"
    assert len(re.findall(r"\bFMNMX\b", sass)) == relus, f"{expr}: ptxas dropped relus of the head sums"


# count_at_least (row_select.cuh): each key's compare is the carry out of key - cand, a subtract
# whose only result is its carry (IADD3 RZ, P, ...), added in by IADD3.X. Written as
# c += key >= cand, nvcc emitted a compare, an add and a predicated move per key in one chain and
# saved predicates to registers: twice the instructions of the block top-m's threshold search
# (bench/NOTES.md, session 32; that form has no carry-only subtract). At least one per key of a step.
CARRY_COUNTS = [
    ("block_select.cu", "block_topm_warp_kernel<8>", 8),
    ("block_select.cu", "block_topm_warp_kernel<32>", 32),
    ("dense.cu", "dense_sample_threshold_kernel<32>", 32),
]


@pytest.mark.parametrize("filename, expr, keys", CARRY_COUNTS)
def test_threshold_search_counts_by_carries(tmp_path, filename, expr, keys):
    _, sass = _compile(tmp_path, filename, expr, kinds=("cubin",))
    carries = re.findall(r"IADD3 RZ, !?P\d, -?U?R\w+(?:\.reuse)?, -?U?R\w+", sass)
    assert len(carries) >= keys, f"{expr}: {len(carries)} carry-only subtracts (count_at_least's form lost?)"


def test_register_select_emits_by_predicated_stores(tmp_path):
    # row_select_regs's in-order emit of a run of positions: one predicated store per item (store_if),
    # 16 per thread, where nvcc had branched around each store (bench/NOTES.md, session 32)
    _, sass = _compile(tmp_path, "refine.cu", "refine_topk_regs_kernel", kinds=("cubin",))
    stores = re.findall(r"@!?P\d STG", sass)
    assert len(stores) >= 16, f"{len(stores)} predicated stores in refine_topk_regs_kernel (the emit by runs lost?)"


@pytest.mark.parametrize("expr", UNION_KERNELS)
def test_union_kernel_stores_keys_by_predicated_stores(tmp_path, expr):
    # write_keys (write_keys_tmap) on the union path: each row's key of an item by selects and one
    # predicated store (store_if), where nvcc had branched on the flag and around the store
    # (bench/NOTES.md, session 32); the fill loops' predicated stores write zeros (RZ) and do not count
    _, sass = _compile(tmp_path, "refine.cu", expr, kinds=("cubin",))
    stores = re.findall(r"@!?P\d STG\.E [^;]*, R\d+ ;", sass)
    assert len(stores) >= 2, f"{len(stores)} predicated key stores in the union kernel (write_keys' form lost?)"


def test_block_scores_descriptors_are_constants(tmp_path):
    # the block scores' tile loop takes two tiles per iteration, tile j_first + i in buffer i % 2 as a
    # constant, so each wgmma descriptor is the tile base plus an immediate: with the buffer in a
    # register every k-step's descriptor was an add and an R2UR move into a uniform register (41
    # R2UR in the kernel; the MMA issue window 18% of its stall samples, bench/NOTES.md, session 33)
    _, sass = _compile(tmp_path, "block_select.cu", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>", kinds=("cubin",))
    moves = re.findall(r"\bR2UR\b", sass)
    assert len(moves) <= 24, f"{len(moves)} R2UR in block_score_wgmma_kernel (the descriptors' constant form lost?)"


# The wgmma score tiles of the block scores and the refinement wait for the kernel before them
# (griddepcontrol.wait, ACQBULK in SASS) only after their q and head-weight loads, so that a CTA
# launched early (the pool and the block top-m trigger their dependents at their start) has them
# in flight while that kernel runs. ptxas moves read-only loads (ld.global.nc) past the wait: the
# loads go through early_loads (common.cuh), without which none of them stayed before it. Counts:
# 64 two-byte q pieces (union: fp8 q, fp8 keys) or 16 eight-byte ones (block scores: fp8 q, bf16
# pooled keys) per thread, and 32 head weights.
EARLY_LOADS = [
    ("refine.cu", "refine_union_wgmma_kernel<2, 0, 0, 64, 128>", 64 + 32),
    ("refine.cu", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>", 64 + 32),
    ("block_select.cu", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>", 16 + 32),
]


@pytest.mark.parametrize("filename, expr, loads", EARLY_LOADS)
def test_score_tiles_load_q_before_they_wait(tmp_path, filename, expr, loads):
    _, sass = _compile(tmp_path, filename, expr, kinds=("cubin",))
    waits = [m.start() for m in re.finditer(r"\bACQBULK\b", sass)]
    assert len(waits) == 1, f"{expr}: {len(waits)} griddepcontrol.wait"
    before = re.findall(r"\bLDG?\.E\b", sass[:waits[0]])
    assert len(before) >= loads, f"{expr}: {len(before)} global loads before the wait, {loads} expected"


# The pool's early trigger (griddepcontrol.launch_dependents, PREEXIT in SASS) follows its own
# wait: the block scores' CTAs may then load the call's inputs at once (the score tiles above),
# since every kernel before the pool on the stream has completed.
def test_pool_triggers_after_its_wait(tmp_path):
    filename, expr = "pool.cu", "pool_vec_kernel<0, 1, 128>"
    _, sass = _compile(tmp_path, filename, expr, kinds=("cubin",))
    wait, trigger = sass.find("ACQBULK"), sass.find("PREEXIT")
    assert 0 <= wait < trigger, f"{expr}: wait at {wait}, trigger at {trigger}"


def _loops(sass):
    """The instruction lists of the loops in a SASS listing: from a label to a branch back to it."""
    labels, insns, loops = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(insns)
            continue
        insn = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if not insn:
            continue
        insns.append(insn.group(1))
        target = re.search(r"BRA `\((\.L_x_\d+)\)", insn.group(1))
        if target and target.group(1) in labels:
            loops.append(insns[labels[target.group(1)]:])
    return loops


def test_union_tile_map_loops(tmp_path):
    # The union kernel's TILE_MAP instance (score_wgmma.cuh, TMAP): its three tile loops (two-row
    # tiles, then each row's own) stage no per-item flags or columns in shared memory (the per-item
    # instance stores 4 words per thread and tile), touch no local memory, reduce their head sums
    # over each quad of lanes by a reduce-scatter (3 shuffles per row and tile: quad_reduce_scatter;
    # the all-reduce took 8), wait at no CTA barrier (each warp copies the key rows its own A
    # fragments read; the per-item instance's tiles wait at one), and run at most 86% of the
    # per-item instance's instructions (524 / 360 / 360 against 627 / 476 / 474 with nvcc 13,
    # sm_90a; session 53's form ran 545 / 377 / 378, its per-tile addresses rebuilt each tile; on
    # an H200 the kernel ran 9% faster with the map, 1.8% faster again since, bench/NOTES.md,
    # sessions 53-54). It keeps three CTAs per SM: at most 168 registers (its launch bounds; left
    # free, ptxas took 234)
    sizes = {}
    for expr in UNION_KERNELS:
        _, sass = _compile(tmp_path, "refine.cu", expr, kinds=("cubin",))
        tiles = [loop for loop in _loops(sass) if any(i.startswith("HGMMA") for i in loop)]
        assert len(tiles) == 3, f"{expr}: {len(tiles)} loops with wgmma"
        sizes[expr] = [len(loop) for loop in tiles]
        if expr.endswith("true>"):
            for loop in tiles:
                assert not [i for i in loop if re.search(r"\b(STS|STL|LDL)\b", i)], f"{expr}: shared or local stores"
            shuffles = [sum(1 for i in loop if i.startswith("SHFL")) for loop in tiles]
            assert shuffles[0] <= 6 and max(shuffles[1:]) <= 3, f"{expr}: shuffles per tile loop {shuffles}"
            assert not [i for loop in tiles for i in loop if i.startswith("BAR.SYNC")], f"{expr}: a CTA barrier per tile"
            usage = re.search(r"Used (\d+) registers", (tmp_path / "ptxas-cubin.txt").read_text())
            assert usage and int(usage.group(1)) <= 168, f"{expr}: {usage and usage.group(0)} (three CTAs per SM need <= 168)"
        else:
            assert all(any(i.startswith("BAR.SYNC") for i in loop) for loop in tiles), f"{expr}: tiles without a barrier"
    item, tile = sizes.values()
    assert all(t < 0.86 * i for t, i in zip(tile, item)), f"tile loops {tile} against the per-item map's {item}"


@pytest.mark.parametrize("expr", ["block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>",
                                  "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2, 1>"])
def test_block_scores_map_items_without_divisions(tmp_path, expr):
    # the block scores' items: each row's key range becomes a block range once per CTA, so a tile's
    # flags are compares; item_row's form divided both ends of the range by B for every row and
    # item (FastDiv's IMAD.HI: 8-12 per tile loop; those loops 10-21% longer, bench/NOTES.md,
    # session 53)
    _, sass = _compile(tmp_path, "block_select.cu", expr, kinds=("cubin",))
    tiles = [loop for loop in _loops(sass) if any(i.startswith("HGMMA") for i in loop)]
    assert tiles, f"{expr}: no tile loop found"
    divisions = [sum(1 for i in loop if i.startswith("IMAD.HI")) for loop in tiles]
    assert not any(divisions), f"{expr}: IMAD.HI per tile loop {divisions}"


@pytest.fixture(scope="module")
def topk_regs_sass(tmp_path_factory):
    """topk_regs_kernel's SASS (nvcc), compiled once for the tests of its window."""
    return _compile(tmp_path_factory.mktemp("topk_regs"), "topk.cu", "topk_regs_kernel", kinds=("cubin",))[1]


def test_topk_window_ranks_by_32_bit_words(topk_regs_sass):
    # topk_regs_kernel's window ranks an entry within its bucket by the sign of 32-bit differences
    # of low words (window_entry_low, rank_in_buckets) over 32-bit shared addresses (lds_u32), two
    # words an iteration: at most six instructions per word loaded, each sign added by one LEA.HI.
    # The 64-bit entries' compare took ten for one word (bench/NOTES.md, session 41); with that
    # compare back, this test fails. It compiles with nvcc: the device's NVRTC once stepped a
    # pointer in 64 bits where nvcc did not, which it cannot see.
    sass = topk_regs_sass
    rank = [body for body in _loops(sass)
            if any(re.match(r"LEA\.HI R\d+, R\d+, R\d+, R\w+, 0x1$", i) for i in body) and any("LDS" in i for i in body)]
    assert rank, "topk_regs_kernel has no loop adding sign bits of shared words (the window's entries lost?)"
    body = min(rank, key=len)
    loads = sum(bool(re.match(r"LDS\b", i)) for i in body)
    assert loads >= 2, f"the window's rank loop loads {loads} word(s) an iteration, two expected: {body}"
    assert len(body) <= 6 * loads, f"the window's rank loop takes {len(body)} instructions for {loads} words: {body}"
    assert not any(re.match(r"\S+\.X\b", i) or ".64" in i for i in body), f"64-bit steps in the rank loop: {body}"


_ADD_OF_ZERO = r"\bFADD R\d+, RZ, R\d+\b"  # f + 0: loaded_score_key's -0 -> +0
_COMPARE_WITH_MINUS_ZERO = r"ISETP\.NE\.AND P\d, PT, R\d+, -0x80000000\b"  # score_key's -0 -> +0


def test_topk_keys_zero_minus_zero_by_an_add(topk_regs_sass):
    # loaded_score_key (common.cuh) turns -0 into +0 by an add of +0 (FADD Rd, RZ, Rx), five
    # instructions a key, where score_key's compare-and-select of the bit pattern takes six (an
    # ISETP against 0x80000000 per key: 31 in topk_regs_kernel; bench/NOTES.md, sessions 43-44).
    # Register mode converts 16 loaded words per thread (row_select_regs), so at least 16 adds; with
    # the compare form in the selects, this fails.
    adds = re.findall(_ADD_OF_ZERO, topk_regs_sass)
    compares = re.findall(_COMPARE_WITH_MINUS_ZERO, topk_regs_sass)
    assert len(adds) >= 16, f"{len(adds)} adds of +0 in topk_regs_kernel (loaded_score_key's add form lost?)"
    assert len(compares) < 16, f"{len(compares)} compares with -0's bits in topk_regs_kernel (score_key there?)"


def test_score_kernels_key_zero_minus_zero_by_a_compare(tmp_path):
    # The other way round in the score kernels' epilogues: score_key's compare and select. The add
    # form there made dense_select at 128K / 4096 2.0-2.5% slower (v50, bench/NOTES.md, session 44),
    # whose dense_score_wgmma_kernel held 4 adds of +0 and no compare.
    sass = _compile(tmp_path, "dense.cu", "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>", kinds=("cubin",))[1]
    adds = re.findall(_ADD_OF_ZERO, sass)
    compares = re.findall(_COMPARE_WITH_MINUS_ZERO, sass)
    assert not adds and compares, f"{len(adds)} adds of +0, {len(compares)} compares with -0's bits (score_key's form?)"


def test_topk_window_scatters_without_atomics(topk_regs_sass):
    # The window's histogram keeps each key's arrival in its bucket, so its scatter stores each of a
    # thread's 16 keys at the bucket's start plus that arrival: a predicated load of the start and a
    # predicated 8-byte store per key, in one straight run (scatter_at_arrival). The scatter by
    # atomics that it replaced branched around an ATOMS per key (95.9 -> 94.5 us on [4096 x 8192],
    # H200, bench/NOTES.md, session 42); with it back, this test fails. (The general path's 16
    # predicated stores of list entries load nothing.)
    runs, loads, stores = [], 0, 0
    for line in topk_regs_sass.splitlines():
        insn = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if insn and re.search(r"\b(BRA|ATOMS|BSSY|BSYNC|BAR)\b", insn.group(1)):
            runs.append(min(loads, stores))  # a branch, an atomic or a barrier ends a run (ptxas may put
            loads = stores = 0                # labels inside it: spill code jumps in)
        elif insn and re.match(r"@!?P\d LDS ", insn.group(1)):
            loads += 1
        elif insn and re.match(r"@!?P\d STS\.64 ", insn.group(1)):
            stores += 1
    runs.append(min(loads, stores))
    assert max(runs) >= 16, (f"topk_regs_kernel's straight runs hold at most {max(runs)} predicated shared loads and "
                             "8-byte stores each, not 16 (the window's scatter by atomics back?)")


def _assert_strided_loads(kernel, sass):
    """kernel's 16-byte row loads lie 4 * 512 items (8 KB) apart, as row_select_regs' STRIDED layout
    puts them (each warp-wide load 512 consecutive bytes, whole sectors), and none 16 bytes apart, as
    the contiguous layout's (16 consecutive items a thread: each warp-wide load uses half of every
    sector it touches). Any load form: __ldg's LDG.E.128.CONSTANT, ld.global.ca's LDG.E.128.STRONG.SM."""
    offsets = set(re.findall(r"LDG\.E\.128(?:\.[A-Z]+)* R\d+, desc\[UR\d+\]\[R\d+\.64\+(0x[0-9a-f]+)\]", sass))
    assert {"0x2000", "0x4000", "0x6000"} <= offsets, f"{kernel}'s 16-byte loads at offsets {sorted(offsets)}"
    assert not {"0x10", "0x20", "0x30"} & offsets, f"contiguous 16-byte loads in {kernel}: {sorted(offsets)}"


def test_topk_loads_whole_sectors(topk_regs_sass):
    # topk_regs_kernel in the STRIDED layout (92.9 against 85.7 us on [4096 x 8192], H200,
    # bench/NOTES.md, session 49); with the contiguous layout back, this test fails.
    _assert_strided_loads("topk_regs_kernel", topk_regs_sass)


@pytest.mark.parametrize("kernel", ["refine_topk_regs_kernel", "refine_topk_ready_regs_kernel"])
def test_refine_topk_loads_whole_sectors(tmp_path, kernel):
    # The refinement's register-mode top-k and its twin after the ready flags (coherent loads) in
    # the STRIDED layout (99.9 against 86.3 us at 128K / 4096, H200, bench/NOTES.md, sessions 49-50);
    # with the contiguous layout back, both cases fail.
    _assert_strided_loads(kernel, _compile(tmp_path, "refine.cu", kernel, kinds=("cubin",))[1])
