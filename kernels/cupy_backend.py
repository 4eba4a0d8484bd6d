"""CuPy backend: the CUDA C++ stages of kernels/cuda/ compiled at run time with NVRTC.

Implements the device backend contract of docs/internals.md. Every function takes CuPy arrays in
*physical* dtypes (uint8 = float8_e4m3fn bits, uint16 = bfloat16 bits, float16, float32, int32),
launches on the CUDA stream ``stream`` (an integer handle, 0 = legacy default stream) and never
synchronises the host, so a call can be captured in a CUDA graph.

Compilation: each kernel template instance is compiled once per process by NVRTC (a name
expression picks the template arguments) for the device's own architecture -- ``sm_90a`` on
Hopper, whose wgmma engine (score_wgmma.cuh) is architecture-specific -- and loaded as a CUDA
module through CuPy. Binaries are cached on disk (``cache_dir()``) under a hash of the source,
the instance, the options, the target and the NVRTC version, so later processes skip NVRTC.
``#include "x.cuh"`` lines are expanded here before compilation, so the hash covers the headers
too.

Workspace: intermediate buffers (pooled keys, block ranking keys, candidate ranking keys, block
ids) come from a per-(device, stream) workspace that only grows. Calls on one stream reuse it and
allocate nothing after the first call of a given size, which is what CUDA-graph capture needs.

Bound plans (``bind_hisa_select``, ``bind_dense_select``; "emitters and bound plans" below): the
launches of one call, recorded once per shape, device and stream as cuLaunchKernel parameter
buffers, so that a repeated call only writes its array addresses and launches through the driver.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import struct
import sys
import threading

import numpy as np

CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# logical dtype codes of score_tile.cuh
DT_E4M3, DT_BF16, DT_F16, DT_F32 = 0, 1, 2, 3
ENGINE_SIMT, ENGINE_BF16, ENGINE_F16, ENGINE_E4M3 = 0, 1, 2, 3
POOL_CODES = {"float32": 0, "bfloat16": 1, "float8_e4m3fn": 2}

SCORE_TILE = 128
SCORE_THREADS = 128
SELECT_THREADS = 512
#: shared memory of row_select.cuh: in-order mode (histograms, scan, misc) and list mode
#: (SORT_BINS histogram, scan, misc; plus 16 bytes per list entry), smallest list
SELECT_FIXED_SMEM = (16 * 256 + 32 + 8) * 4
SELECT_LIST_FIXED_SMEM = (4096 + 32 + 32) * 4
SELECT_LIST_MIN = 512
#: list mode, rows read from global memory: RING_STAGES (8) groups of 2 x SELECT_THREADS x 16 bytes
SELECT_RING_BYTES = 8 * 2 * SELECT_THREADS * 16
#: stream uncached rows through that ring of cp.async copies where shared memory allows (a knob
#: for bench/ and the GPU tests; False reads them with plain 16-byte loads)
SELECT_RING = True
#: cache a row's keys in shared memory where they fit (list / in-order mode). False reads every
#: row from global memory (through the ring where it fits): fewer bytes of shared memory per CTA,
#: so more CTAs per SM, e.g. the split top-k's chunk CTAs (180 KB cached at P = 4: one per SM).
#: A knob for bench/ (--sweep SELECT_CACHE_ROWS=1,0) and the GPU tests
SELECT_CACHE_ROWS = True
#: dense path: bytes of ranking keys kept per row chunk (the [rows, S] workspace never exceeds this).
#: 512 MB: 1024 rows of 128K keys, a quarter of [4096, 131072] fp32; half as many chunks as 256 MB,
#: so at 128K / 4096 on an H200 the score kernel 12.98 -> 12.70 ms, the filter 0.95 -> 0.88 and the
#: candidate select 0.25 -> 0.19 per call, dense_select 1.1-1.6% faster (bench/NOTES.md, sessions 26
#: and 28)
DENSE_WORKSPACE_BYTES = 512 << 20
#: query rows per score CTA where rows share their keys (1 or 2; a tuning knob for bench/)
MAX_ROWS_PER_CTA = 2
#: score with the Hopper wgmma engine (score_wgmma.cuh) wherever it applies (see _wgmma_rows);
#: False forces the mma.sync engine of score_tile.cuh (a knob for bench/ and the GPU tests)
USE_WGMMA = True
#: fp8 q and keys on Hopper: False (default) scores them on the f16 tensor cores (fp8 -> f16 is
#: exact, accumulation is fp32); True uses the fp8 tensor cores, about twice the peak rate but
#: with a ~22-bit accumulator (score errors up to ~4e-4 of sum_h |w_h relu(q_h . k)|, measured
#: by bench/precision.py), which breaks the tolerance-aware checks of SPEC §9
FP8_TENSOR_ACCUMULATE = False
#: refinement processes row chunks whose candidate keys stay within this many bytes (128 MB: all
#: 4096 rows of m = 64 blocks of 128 in one launch, one tail instead of two)
REFINE_WORKSPACE_BYTES = 128 << 20
#: pooling: tokens whose key loads each thread issues before summing them (pool.cu's BATCH; one
#: of POOL_BATCHES). More means fewer round trips per block (B = 128: 8 batches of 16) and more
#: registers. A knob for bench/ (--sweep POOL_BATCH=16,32,64) and the GPU tests
POOL_BATCH = 16
POOL_BATCHES = (16, 32, 64)
#: pooling with pool_vec_kernel (16-byte loads, the block's loads all in flight, partial sums per
#: token group; rows of D * itemsize bytes a multiple of 16, 16-byte aligned, D <= 128) where the
#: keys allow it; False: pool_kernel (one thread per dimension, POOL_BATCH) always
POOL_VEC = True
#: pool_vec_kernel with its row width fixed at compile time where D is POOL_FIXED_SIZE (its vector
#: and group indices, row addresses and groups' sum constants or unrolled; the same sums in the
#: same order); False: the generic instance
POOL_FIXED = True
POOL_FIXED_SIZE = 128
#: CTAs per SM that a score launch's tile split aims for (_tiles_per_cta): more means shorter CTAs
#: and more q staging. Whole pairs per CTA at T = 1024 measured best on an H200 (1 and 2 give them
#: there): hisa at T = 1024 0.531 -> 0.497 ms (128K), 0.493 -> 0.442 (64K), 0.445 -> 0.420 (32K)
#: against 8, the same at T = 4096 (bench/NOTES.md, v9). 2 rather than 1: the same launches on
#: that grid, and two CTAs per SM (what the score kernels fit) for mid-sized T. A knob for bench/
SCORE_CTAS_PER_SM = 2
#: the block scores of 16-bit pooled keys on the wgmma engine with ROWS * H = 128 in block_select.cu's
#: HALF form: key tiles in two half-tile buffers and one accumulator set, three CTAs per SM (68 KB, 168
#: registers) instead of two (102 KB, 224 registers). Three CTAs hide more of each one's set-up (q's
#: staging) but keep only half a tile in flight: on an H200 (bench/NOTES.md, session 39) the kernel
#: took 56.6 -> 50.3 us at 32K / 4096 (2 tiles per CTA) and 84.5 -> 81.9 at 64K / 4096 (4 tiles), but
#: 140.5 -> 144.9 at 128K / 4096 (8 tiles) and 39.3 -> 46 at 128K / 1024 (8 tiles, 1.3 waves). 0:
#: never, 1: wherever the form applies, 2: where a CTA has at most BLOCK_SCORE_HALF_MAX_TILES tiles and
#: the launch at least two waves (_block_score_half)
BLOCK_SCORE_HALF = 2
BLOCK_SCORE_HALF_MAX_TILES = 4
#: hisa_select's refinement scores pairs of neighbouring rows over the union of their blocks
#: (wgmma engine only; a knob for bench/ and the GPU tests)
USE_UNION_PAIRS = True
#: on the union path, the block top-m (warp mode) records each pair's union of blocks for the union
#: kernel, which otherwise merges the pair's two lists in each of its CTAs; a knob for bench/ and
#: the GPU tests
PAIR_RECORDS = True
#: the union kernel's per-tile map (refine.cu TILE_MAP): where block_size is the score tile and the
#: kernel splits its tiles by row (fp8 keys on the f16 engine, H = 64), each tile's key rows, columns
#: and flags follow from its block and the block's index in each row's list, instead of a per-item
#: map staged through shared memory (and each lane's key scale loaded before the tile's MMAs, the head
#: sums reduced by a reduce-scatter, the tiles free of CTA barriers). H200 (bench/NOTES.md, sessions
#: 53-54): the union kernel 912 -> 816 us at 128K / 4096, 887 -> 799 at 32K / 4096, 258 -> 229 at
#: 128K / 1024 (v57-v60). A knob for bench/ and the GPU tests
UNION_TILE_MAP = True
#: hisa_select's refine top-k waits for each row's pair rather than for the whole union launch:
#: each union CTA stores the call's epoch into a ready flag when its keys are written, the union
#: launch triggers the top-k after its own wait, and refine_topk_ready_regs_kernel's CTAs start on
#: the SMs the union's last wave leaves (refine.cu). Where the union path, the block top-m's warp
#: mode (which advances the epoch) and the register-mode top-k all apply (_union_ready). A knob for
#: bench/ and the GPU tests
UNION_READY = True
#: ... where the union launch has fewer than this many waves of CTAs. H200 (bench/NOTES.md, session
#: 47): a call's span -3.4 to -4.8 us at T = 1024 (3.4 waves: the top-k's CTAs fill the SMs the
#: last wave leaves), but +12 to +13 us at T = 4096 (7.3 waves: they share the last wave's SMs with
#: union CTAs, and the union kernel ran longer by more than the overlap) and +1.3 us at 128K / 2048
#: (3.9 waves)
UNION_READY_MAX_WAVES = 3.7
#: short rows in position order (the block top-m) take one warp per row (row_select.cuh, warp
#: mode) instead of a 512-thread CTA; a knob for bench/ and the GPU tests
WARP_SELECT = True
#: rows of at most REG_SELECT_ITEMS items (REG_SELECT_ITEMS in row_select.cuh) that warp mode does
#: not take get one CTA each with the keys in registers (register mode, row_select_regs): the
#: refinement top-k and hisa_cupy.topk over 8192 columns. False: list / in-order mode (row_select)
REG_SELECT = True
REG_SELECT_ITEMS = 8192
#: hisa_cupy.topk over few long rows: chunks per row, each scored by its own CTA and merged after
#: (_topk_split). 0: chosen per call, 1: never split, P > 1: P chunks where the shape allows
TOPK_SPLIT = 0
#: hisa_cupy.topk over long rows with k small against N (_topk_filter): a sampled threshold keeps
#: about 2.5k candidates per row, whose top k is exact (rows where it is not are redone whole)
TOPK_FILTER = True
#: dense_select's top-k of long rows through the same filter (row_filter.cuh); False: list mode
DENSE_FILTER = True
#: dense_select's threshold mode (dense.cu; docs/internals.md): where S >= DENSE_THRESHOLD_MIN_S keys
#: and the dense score kernel is the fp8 register-A wgmma one of two rows per CTA, each row's threshold
#: is the r-th largest of its keys at every DENSE_SAMPLE_STRIDE-th position (a first, small score
#: launch; r = DENSE_SAMPLE_RANK, or where 0, the top k's expected share e of the sample plus 5 sqrt(e),
#: at least 16), the score kernel appends the keys at or above it (up to DENSE_APPEND_CAP per row) instead
#: of writing every key, and one select ranks those lists; rows where that is not exact are scored
#: again whole and ranked the usual way. It replaces the filtered top-k's second pass over 2.1 GB
#: of written keys at 128K / 4096 (H200: dense_select 3-6% faster; bench/NOTES.md, session 29).
DENSE_THRESHOLD = True
DENSE_THRESHOLD_MIN_S = 65536
DENSE_SAMPLE_STRIDE = 128
DENSE_SAMPLE_RANK = 0
DENSE_APPEND_CAP = 8192     # REG_SELECT_ITEMS: the select holds a row's list in registers
DENSE_SAMPLE_MAX = 2048     # sampled keys per row: dense_sample_threshold_kernel<64>
DENSE_RESCUE_SLOTS = 12     # failed row pairs scored at once by the rescue (a tile group per CTA: about a wave)
APPEND_CAP = 416                # score_wgmma.cuh: a CTA's shared-memory list entries per row
APPEND_SMEM = 2 * APPEND_CAP * 8  # the appending kernel's shared memory past the score kernel's
#: the filtered top-k's select (hisa_cupy.topk, dense_select) of a launch of at most one row per SM
#: (one wave of one CTA per row: latency-bound) takes register mode at FILTER_WIDE_THREADS threads
#: of 8 candidates each (<stem>_filtered_wide_kernel) instead of SELECT_THREADS of 16; a knob for
#: bench/ and the GPU tests
FILTER_WIDE_SELECT = True
#: that kernel's CTA size (FILTER_WIDE_THREADS in row_filter.cuh)
FILTER_WIDE_THREADS = 1024
#: longest row of warp mode (WARP_SELECT_ITEMS in row_select.cuh) and rows per CTA (WARP_SELECT_ROWS)
WARP_SELECT_ITEMS = 1024
WARP_SELECT_ROWS = 4
#: keys per lane of the block top-m's warp-mode instances (block_topm_warp_kernel<R>), ascending
WARP_KEYS_PER_LANE = (8, 16, 32)
#: ints ahead of the lists in a pair's record (PAIR_RECORD_HEAD in common.cuh)
PAIR_RECORD_HEAD = 4
#: CTAs per pair of rows on the union path, each scoring an even share of the union's key tiles
#: (more, shorter CTAs: a shorter tail when few pairs fill the GPU). 0: chosen per launch
#: (_union_splits); a knob for bench/
UNION_SPLITS = 0
#: how a union launch lays out its pairs' CTAs (_union_layout): "model", whole pairs first and the
#: last pairs in shorter shares, as the fine tail's rule or else a model of the launch's waves
#: picks; "uniform", UNION_SPLITS (or _union_splits) CTAs for every pair. UNION_TAIL_SPLITS > 0
#: sets the layout instead: that many shares for the last pairs, as many as fill UNION_TAIL_WAVES
#: waves, and UNION_SPLITS (or _union_splits) for the others. Knobs for bench/
UNION_LAYOUT = "model"
UNION_TAIL_SPLITS = 0
UNION_TAIL_WAVES = 1.0
#: the union layout's fine tail (_union_fine_tail): where a launch has at least a wave of pairs,
#: its last UNION_FINE_TAIL_PAIRS waves of pairs (0.3: 119 pairs at 396 slots) go in this many
#: shares each and the others whole, provided the whole pairs fill their last wave at least 3/4
#: (else the model's layout). 0: the model's layout everywhere. H200, session 38: a call 13 us
#: shorter at 128K / 1024, 8-10 us at T = 4096. A knob for bench/
UNION_FINE_TAIL_SPLITS = 8
UNION_FINE_TAIL_PAIRS = 0.3
#: the block top-m triggers the union launch after it at its start (block_topm_warp_kernel's
#: `early`: the union CTAs that fit beside it load q meanwhile) where that launch has at least
#: this many waves; 0: never. H200 (bench/NOTES.md, sessions 37-38, with the model's layouts): a
#: call's span -2.1 / -3.2 us at 128K / 4096 and 32K / 4096 (5.9 waves), but +4.9 us at 128K /
#: 2048 (3.9 waves) and +1 to +3.5 us at 128K / 1024 (2 waves), so 5.0: T = 4096 at 32K-128K keys
#: (7.3 waves with the fine tail; T = 1024 3.4)
TOPM_TRIGGER_WAVES = 5.0
#: largest grid.y of one launch (CUDA limit 65535)
MAX_ROWS_PER_LAUNCH = 65535
#: launch with programmatic dependent launch where the GPU has it (compute capability 9.0 and
#: later): each kernel's launch is taken in while the one before it on the stream runs, and its
#: CTAs start as soon as that kernel's have exited (every kernel waits for its predecessor before
#: it reads its output: common.cuh, grid_dependency_sync), which takes out most of the ~1.5 us gap between a
#: call's kernels. False: plain launches (a knob for bench/ and the GPU tests)
USE_PDL = True
#: Bound calls (the call cache's repeated calls) replay their launches as one CUDA graph (_CallGraph):
#: one cuGraphLaunch per call instead of one launch per kernel, with programmatic edges where the
#: launches would take PDL; a node's parameters are set again only where the call's array addresses
#: for it changed. False: the bound launches one by one (a knob for bench/ and the tests)
CALL_GRAPHS = True

SUPPORTED_HEADS = "a multiple of 16, at most 128"
SUPPORTED_DIMS = "a multiple of 32, at most 128"


def _cupy():
    import cupy

    return cupy


# ----------------------------------------------------------------------------------------------
# sources and compilation

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)


def load_source(filename: str) -> str:
    """Source of ``kernels/cuda/<filename>`` with its local ``#include "..."`` lines expanded."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(CUDA_DIR, name), encoding="utf-8") as f:
            text = f.read()
        text = _PRAGMA_ONCE.sub("", text)  # once-ness is handled here
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(filename)


#: NVRTC options besides the target (-ftz=true is what CuPy's RawModule used before this path)
_COMPILE_OPTIONS = ("-std=c++17", "-ftz=true")
_lock = threading.Lock()


def target_arch(cc: int, supported=None) -> str:
    """NVRTC target for a device of compute capability ``cc`` (e.g. 90 -> ``"sm_90a"``).

    Hopper gets the architecture-specific ``sm_90a`` (wgmma, score_wgmma.cuh); other devices get
    ``sm_<cc>``, or PTX for the newest architecture NVRTC knows when the device is newer still.
    """
    if supported and cc > max(supported):
        return f"compute_{max(supported)}"
    return "sm_90a" if cc == 90 else f"sm_{cc}"


def cache_dir() -> str:
    """Directory of compiled kernels: ``$HISA_CUPY_CACHE_DIR``, else ``~/.cache/hisa_cupy``."""
    return os.environ.get("HISA_CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hisa_cupy")


def _keep_source(source: str, key: str, program: str) -> str:
    """Absolute path of a copy of ``source`` under the cache (``lineinfo/<key>/<program>``), the
    program name that ``-lineinfo`` records, so that Nsight Compute can show source lines; the
    plain name when the copy cannot be written."""
    path = os.path.join(cache_dir(), "lineinfo", key, program)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
    except OSError:
        return program
    return path


def _compile_options(arch: str) -> tuple:
    """NVRTC options for target ``arch``; ``HISA_CUPY_LINEINFO=1`` adds ``-lineinfo`` (source
    lines for a profiler; bench/device_session.sh's ``ncu`` step)."""
    lineinfo = os.environ.get("HISA_CUPY_LINEINFO") == "1"
    return _COMPILE_OPTIONS + (f"-arch={arch}",) + (("-lineinfo",) if lineinfo else ())


def cache_key(source: str, name_expr: str, arch: str) -> str:
    """Name of one kernel instance's entries in ``cache_dir()`` (``<key>.bin``, ``<key>.name``): a
    hash of everything that determines the binary (source after include expansion, instance,
    options, target, NVRTC version) and nothing else, no GPU, so a cache filled on another
    machine with the same NVRTC serves this one (bench/precompile_kernels.py)."""
    from cupy_backends.cuda.libs import nvrtc

    return hashlib.sha256("\0".join((source, name_expr, " ".join(_compile_options(arch)),
                                     repr(nvrtc.getVersion()))).encode()).hexdigest()[:40]


def _nvrtc_compile(source: str, name_expr: str, arch: str):
    """(binary, lowered name) of one kernel instance, cached on disk under ``cache_key``.
    ``HISA_CUPY_LINEINFO=1`` adds ``-lineinfo``, a different cache entry."""
    from cupy_backends.cuda.libs import nvrtc

    options = _compile_options(arch)
    lineinfo = "-lineinfo" in options
    key = cache_key(source, name_expr, arch)
    path = os.path.join(cache_dir(), key)
    try:
        with open(path + ".name", encoding="utf-8") as f:
            lowered = f.read()
        with open(path + ".bin", "rb") as f:
            return f.read(), lowered
    except OSError:
        pass
    program = name_expr.split("<")[0] + ".cu"
    if lineinfo:  # a profiler maps the line table to this file: the expanded source, kept on disk
        program = _keep_source(source, key, program)
    prog = nvrtc.createProgram(source, program, [], [])
    try:
        nvrtc.addNameExpression(prog, name_expr)
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {name_expr} ({arch}):\n{nvrtc.getProgramLog(prog)}") from e
        lowered = nvrtc.getLoweredName(prog, name_expr)
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    binary = binary if isinstance(binary, bytes) else bytes(binary)
    try:  # write-then-rename, so a concurrent reader never sees half a file
        os.makedirs(cache_dir(), exist_ok=True)
        for suffix, data in ((".bin", binary), (".name", lowered.encode())):
            tmp = f"{path}{suffix}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path + suffix)
    except OSError:
        pass  # an unwritable cache only costs compile time
    return binary, lowered


def _module_function(source: str, name_expr: str, arch: str):
    """Kernel ``name_expr`` of ``source`` (NVRTC for ``arch``, through the disk cache), loaded on the
    current device (bench/'s microbenchmarks load their own sources through it too)."""
    binary, lowered = _nvrtc_compile(source, name_expr, arch)
    mod = _cupy().cuda.function.Module()
    mod.load(binary)
    return mod.get_function(lowered)  # the function keeps its module alive


@functools.lru_cache(maxsize=None)
def _function(filename: str, name_expr: str, device_id: int):
    from cupy_backends.cuda.libs import nvrtc

    with _cupy().cuda.Device(device_id):
        arch = target_arch(_device_facts(device_id)["cc"], tuple(nvrtc.getSupportedArchs()))
        return _module_function(load_source(filename), name_expr, arch)


_smem_opted_in: dict = {}
#: (file, name expression, dynamic smem bytes, device) -> function, already opted in to that smem
_kernels: dict = {}


_device_getter = (None, None)  # (the _cupy it came from, its runtime.getDevice)


def _device_id() -> int:
    """CuPy's current device (the runtime's getDevice: one C call, no Device object)."""
    global _device_getter
    src, get = _device_getter
    if src is not _cupy:  # first use, or _cupy was replaced (the CPU tests' stand-in)
        get = _cupy().cuda.runtime.getDevice
        _device_getter = (_cupy, get)
    return get()


def _kernel(filename: str, name_expr: str, smem: int):
    """The loaded function of one kernel instance on the current device, opted in to ``smem``
    bytes of dynamic shared memory; after the first call, one dictionary look-up."""
    device_id = _device_id()
    key = (filename, name_expr, smem, device_id)
    fn = _kernels.get(key)
    if fn is not None:
        return fn
    fn = _function(filename, name_expr, device_id)
    if smem > 48 * 1024 and _smem_opted_in.get(fn.ptr, 0) < smem:
        from cupy_backends.cuda.api import driver

        with _lock:  # above 48 KB of dynamic shared memory a kernel must opt in
            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            _smem_opted_in[fn.ptr] = smem
    if len(_kernels) >= 4096:
        _kernels.clear()
    _kernels[key] = fn
    return fn


def _ctas_per_sm(filename: str, name_expr: str, smem: int, threads: int) -> int:
    """CTAs of one kernel instance resident per SM at ``threads`` threads and ``smem`` bytes of
    dynamic shared memory (the driver's occupancy calculator; at least 1)."""
    from cupy_backends.cuda.api import driver

    fn = _kernel(filename, name_expr, smem)
    return max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, threads, smem)))


def kernel_instances():
    """(file, name expression) pairs covering every kernel template with representative arguments.

    Used by the CPU test that compiles every source with nvcc for sm_80, sm_90 and sm_90a.
    """
    out = [("pool.cu", f"pool_kernel<{dt}, {p}, {b}>") for dt in range(4) for p in range(3) for b in POOL_BATCHES]
    out += [("pool.cu", f"pool_vec_kernel<{dt}, {p}{fixed}>") for dt in range(4) for p in range(3)
            for fixed in ("", f", {POOL_FIXED_SIZE}")]
    for engine, qdt, kdt in [(ENGINE_SIMT, DT_F32, DT_F32), (ENGINE_BF16, DT_BF16, DT_BF16),
                             (ENGINE_F16, DT_F16, DT_F16), (ENGINE_E4M3, DT_E4M3, DT_E4M3),
                             (ENGINE_BF16, DT_E4M3, DT_BF16), (ENGINE_SIMT, DT_F16, DT_BF16)]:
        for h, d in [(64, 128), (32, 64), (128, 128)]:
            args = f"{engine}, {qdt}, {kdt}, {h}, {d}"
            rows = {1, _rows_per_cta(engine, kdt, h, True)}
            out += [("block_select.cu", f"block_score_kernel<{args}, {r}>") for r in sorted(rows)]
            if qdt == kdt:
                out.append(("refine.cu", f"refine_score_kernel<{args}>"))
                out += [("dense.cu", f"dense_score_kernel<{args}, {r}>") for r in sorted(rows)]
    # the wgmma engine (real code for sm_90a, a trap elsewhere)
    for engine, qdt, kdt in [(ENGINE_E4M3, DT_E4M3, DT_E4M3), (ENGINE_F16, DT_E4M3, DT_F16),
                             (ENGINE_BF16, DT_E4M3, DT_BF16), (ENGINE_BF16, DT_BF16, DT_BF16),
                             (ENGINE_F16, DT_F16, DT_F16), (ENGINE_F16, DT_E4M3, DT_E4M3)]:
        for h in (64, 128):
            args = f"{engine}, {qdt}, {kdt}, {h}, 128"
            rows = _wgmma_rows(engine, kdt, h, 128, 90, True)
            out.append(("block_select.cu", f"block_score_wgmma_kernel<{args}, {rows}>"))
            if (engine, kdt) in _HALF_KEYS and rows * h == 128:
                out.append(("block_select.cu", f"block_score_wgmma_kernel<{args}, {rows}, 1>"))
            if qdt == kdt or (engine, kdt) == (ENGINE_F16, DT_F16):
                out.append(("refine.cu", f"refine_score_wgmma_kernel<{args}>"))
                if rows * h == 128 and h == 64:
                    out.append(("refine.cu", f"refine_union_wgmma_kernel<{args}>"))
                    if (engine, kdt) == (ENGINE_F16, DT_E4M3):  # its TILE_MAP form (UNION_TILE_MAP)
                        out.append(("refine.cu", f"refine_union_wgmma_kernel<{args}, true>"))
                out.append(("dense.cu", f"dense_score_wgmma_kernel<{args}, {rows}>"))
    out += [("block_select.cu", "block_topm_kernel"), ("refine.cu", "refine_topk_kernel"),
            ("dense.cu", "dense_topk_kernel"), ("topk.cu", "topk_kernel"), ("topk.cu", "topk_chunks_kernel"),
            ("topk.cu", "topk_merge_kernel"), ("topk.cu", "topk_filter_kernel"), ("topk.cu", "topk_filtered_kernel"),
            ("topk.cu", "topk_rescue_kernel"), ("dense.cu", "dense_filter_kernel"), ("dense.cu", "dense_filtered_kernel"),
            ("dense.cu", "dense_rescue_kernel")]
    out += [("block_select.cu", f"block_topm_warp_kernel<{r}>") for r in WARP_KEYS_PER_LANE]
    out += [("refine.cu", "refine_topk_warp_kernel"), ("dense.cu", "dense_topk_warp_kernel")]
    out += [("block_select.cu", "block_topm_regs_kernel"), ("refine.cu", "refine_topk_regs_kernel"),
            ("refine.cu", "refine_topk_ready_regs_kernel"),
            ("dense.cu", "dense_topk_regs_kernel"), ("topk.cu", "topk_regs_kernel"),
            ("topk.cu", "topk_merge_regs_kernel"), ("topk.cu", "topk_filtered_regs_kernel"),
            ("dense.cu", "dense_filtered_regs_kernel")]
    out += [(name.split("_")[0] + ".cu", name) for name in _WIDE_SELECT_KERNELS]
    # dense_select's threshold mode: fp8 keys on the f16 register-A engine, two rows of 64 heads
    args = f"{ENGINE_F16}, {DT_E4M3}, {DT_E4M3}, 64, 128, 2"
    out += [("dense.cu", "dense_sample_kernel"), ("dense.cu", "dense_sample_threshold_kernel<32>"),
            ("dense.cu", "dense_sample_threshold_kernel<64>"),
            ("dense.cu", "dense_select_unordered_kernel"), ("dense.cu", f"dense_score_append_wgmma_kernel<{args}>"),
            ("dense.cu", f"dense_score_rescue_wgmma_kernel<{args}>")]
    return out


# ----------------------------------------------------------------------------------------------
# device facts, dtypes, engines

@functools.lru_cache(maxsize=None)
def _device_facts(device_id: int):
    cupy = _cupy()
    attrs = cupy.cuda.Device(device_id).attributes
    cc = cupy.cuda.Device(device_id).compute_capability
    return {
        "cc": int(cc),
        "smem_optin": int(attrs.get("MaxSharedMemoryPerBlockOptin", 48 * 1024)),
        "sms": int(attrs.get("MultiProcessorCount", 132)),
    }


def _dt_code(arr) -> int:
    dt = np.dtype(arr.dtype)
    if dt == np.uint8:
        return DT_E4M3
    if dt == np.uint16:
        return DT_BF16
    if dt == np.float16:
        return DT_F16
    if dt == np.float32:
        return DT_F32
    raise TypeError(f"cupy backend: unsupported physical dtype {dt}")


def choose_engine(qdt: int, kdt: int, cc: int) -> int:
    """Tensor-core engine able to hold both operand types exactly, else the fp32 SIMT engine."""
    if DT_F32 in (qdt, kdt):
        return ENGINE_SIMT
    pair = {qdt, kdt}
    if pair == {DT_E4M3}:
        return ENGINE_E4M3 if cc >= 89 else ENGINE_BF16
    if pair <= {DT_E4M3, DT_BF16}:
        return ENGINE_BF16
    if pair <= {DT_E4M3, DT_F16}:
        return ENGINE_F16
    return ENGINE_SIMT  # f16 with bf16: no common exact 16-bit type


_ASYNC_KEYS = ((ENGINE_E4M3, DT_E4M3), (ENGINE_BF16, DT_BF16), (ENGINE_F16, DT_F16))
#: (engine, key dtype) of the wgmma engine's register-A path: e4m3 key tiles converted in registers
_FP8A_KEYS = (ENGINE_F16, DT_E4M3)
#: (engine, pooled key dtype) of the block scores' HALF form (block_score_wgmma_kernel): 16-bit keys
#: in the engine's own type, both operands in shared memory
_HALF_KEYS = ((ENGINE_BF16, DT_BF16), (ENGINE_F16, DT_F16))


def _score_smem(engine: int, kdt: int, H: int, D: int, rows: int) -> int:
    """Dynamic shared memory of score_tile (score_smem_bytes in score_tile.cuh)."""
    pitch = (D + 1) * 4 if engine == ENGINE_SIMT else D * (1 if engine == ENGINE_E4M3 else 2) + 16
    buffers = 2 if (engine, kdt) in _ASYNC_KEYS else 1
    return (rows * H + buffers * SCORE_TILE) * pitch + rows * H * 4 + buffers * SCORE_TILE * 4 * (2 + rows)


def _rows_per_cta(engine: int, kdt: int, H: int, shared_keys: bool) -> int:
    """Query rows per score CTA: 2 when the rows share their keys (dense path, block scores) and
    the tensor-core path streams keys asynchronously; each key tile then serves both rows."""
    return MAX_ROWS_PER_CTA if shared_keys and (engine, kdt) in _ASYNC_KEYS and H % 64 == 0 else 1


def _wgmma_rows(engine: int, kdt: int, H: int, D: int, cc: int, shared_keys: bool) -> int:
    """Query rows per CTA of the wgmma engine, or 0 where it does not apply: it needs Hopper
    (sm_90a), D = 128, keys already in the engine's type and rows * H in {64, 128}."""
    keys_ok = (engine, kdt) in _ASYNC_KEYS or (engine, kdt) == _FP8A_KEYS
    if not USE_WGMMA or cc != 90 or D != 128 or not keys_ok or H % 8:
        return 0
    rows = max(1, min(MAX_ROWS_PER_CTA, 128 // H)) if shared_keys else 1
    return rows if rows * H in (64, 128) else 0


def _wgmma_smem(engine: int, H: int, D: int, rows: int, union_m: int = 0, kdt: int | None = None,
                half: bool = False) -> int:
    """Dynamic shared memory of score_tile_wgmma (WgmmaShape::SMEM in score_wgmma.cuh); union_m:
    blocks per row on the union path (refine_union_wgmma_kernel), 0 elsewhere; kdt: the keys'
    dtype code (None: the engine's own type; e4m3 keys on the f16 engine stay 1 byte per element);
    half: the block scores' HALF form (key buffers of half a tile each, score_tile_wgmma's KBUF)."""
    rowb = D * (1 if engine == ENGINE_E4M3 else 2)
    krowb = D if (engine, kdt) == _FP8A_KEYS else rowb
    nbuf = 3 if union_m and rowb == D else 2
    meta = nbuf * SCORE_TILE * 4 * (1 + rows + (rows if union_m else 0))
    lists = (8 * union_m + 32) * 4 if union_m else 0
    buffer_rows = SCORE_TILE // 2 if half else SCORE_TILE
    # + one mbarrier per key buffer (dense: bulk copies of its key tiles)
    return 1024 + rows * H * rowb + nbuf * buffer_rows * krowb + meta + lists + 8 * nbuf


def _select_engine(qdt: int, kdt: int, H: int, D: int, cc: int, shared_keys: bool):
    """(engine, query rows per CTA of the wgmma engine, or 0 for the mma.sync / SIMT engine).

    fp8 q and keys on Hopper go to the f16 wgmma engine, which reads the e4m3 keys as they are
    and converts them in registers (score_wgmma.cuh, FP8A); to the fp8 wgmma engine only with
    FP8_TENSOR_ACCUMULATE; elsewhere to the mma.sync engine (which ptxas runs on the f16 tensor
    cores on sm_90)."""
    engine = choose_engine(qdt, kdt, cc)
    if engine == ENGINE_E4M3 and not FP8_TENSOR_ACCUMULATE:
        rows16 = _wgmma_rows(ENGINE_F16, kdt, H, D, cc, shared_keys)
        return (ENGINE_F16, rows16) if rows16 else (engine, 0)
    return engine, _wgmma_rows(engine, kdt, H, D, cc, shared_keys)


def _tiles_per_cta(ntiles: int, rows: int) -> int:
    """Key tiles per CTA of score_tile: enough CTAs for SCORE_CTAS_PER_SM per SM, q staged as rarely
    as possible (at most 32 tiles per CTA), and a row's tiles spread evenly over its CTAs (8 tiles
    in 2 CTAs: 4 + 4, not 7 + 1)."""
    sms = _device_facts(_device_id())["sms"]
    tpc = max(1, min(32, ntiles, (ntiles * rows) // (sms * SCORE_CTAS_PER_SM)))
    ctas = -(-ntiles // tpc)
    return -(-ntiles // ctas)


def check_supported(H: int, D: int, *arrays) -> None:
    """ValueError for shapes or layouts the CUDA kernels do not handle."""
    if H % 16 or not 16 <= H <= 128:
        raise ValueError(f"cupy backend: number of heads H must be {SUPPORTED_HEADS}, got {H}")
    if D % 32 or not 32 <= D <= 128:
        raise ValueError(f"cupy backend: head dim D must be {SUPPORTED_DIMS}, got {D}")
    for name, a in arrays:
        if a is not None and a.data.ptr % 16:
            raise ValueError(f"cupy backend: argument {name!r} must be 16-byte aligned, "
                             f"got address {a.data.ptr:#x}")


# ----------------------------------------------------------------------------------------------
# workspace

class _Workspace:
    """Grow-only scratch buffers of one (device, stream).

    ``get`` returns a typed view of a named buffer; the view of the last (shape, dtype) asked for
    is kept, so repeated calls of the same size cost a dictionary lookup, not array slicing.
    ``gen`` counts the buffers allocated (and releases): a bound plan (_Bound) holding addresses
    of these buffers is valid while ``gen`` is what it was when the plan was made."""

    def __init__(self):
        self._bufs = {}
        self._views = {}
        self.gen = 0
        # zero-kept buffers (each call's last kernel returns them to zero) that a call which stopped
        # between its launches may have left non-zero: the next call that uses them zeroes them first
        self.stale = set()

    def get(self, name, shape, dtype, zeroed=False):
        """A view [shape] of dtype of buffer ``name``, grown as needed. ``zeroed``: a new buffer
        starts at zero (for state that every call returns to zero itself)."""
        shape = tuple(shape)
        last = self._views.get(name)
        if last is not None and last[0] == shape and last[1] == dtype:
            return last[2]
        dt = np.dtype(dtype)
        size = math.prod(shape) * dt.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.nbytes < max(1, size):
            self.gen += 1  # before the old buffer can go: plans holding its address are void
            buf = (_cupy().zeros if zeroed else _cupy().empty)(max(1, size), dtype=np.uint8)
            self._bufs[name] = buf
        view = buf[:size].view(dt).reshape(shape)
        self._views[name] = (shape, dtype, view)
        return view

    def buffer(self, name):
        """The whole buffer behind ``name``'s views (uint8)."""
        return self._bufs[name]

    def zero_stale(self, em, names):
        """Zero those of the whole buffers ``names`` that a stopped call left stale (see ``stale``)."""
        for name in names:
            if name in self.stale:
                em.fill(self._bufs[name], 0)  # whole buffers: that call's rows may have been more
                self.stale.discard(name)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self._bufs.values())


_workspaces: dict = {}


def workspace(stream: int) -> _Workspace:
    key = (_device_id(), int(stream or 0))
    ws = _workspaces.get(key)
    if ws is None:
        ws = _workspaces[key] = _Workspace()
    return ws


def release_workspace() -> None:
    """Drop every cached workspace buffer (they go back to CuPy's memory pool); the bound plans
    that use them are void from then on."""
    for ws in list(_workspaces.values()):
        ws.gen += 1
        ws._bufs.clear()  # a bound plan may still hold the workspace object, never its memory
        ws._views.clear()
    _workspaces.clear()


class _StreamHandle:
    """A raw cudaStream_t exposed through the CUDA stream protocol."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_stream_objects: dict = {}


class _on_stream:
    """Make ``stream`` CuPy's current stream for the duration (allocations and launches).

    A no-op when it already is (the public API enters the caller's stream once per call)."""

    __slots__ = ("stream", "_ctx")

    def __init__(self, stream):
        self.stream = stream
        self._ctx = None

    def __enter__(self):
        if self.stream is None:
            return self
        cupy = _cupy()
        ptr = int(self.stream)
        if cupy.cuda.get_current_stream().ptr == ptr:
            return self
        key = (cupy.cuda.Device().id, ptr)
        obj = _stream_objects.get(key)
        if obj is None:
            if ptr == 0:
                obj = cupy.cuda.Stream.null
            elif hasattr(cupy.cuda.Stream, "from_external"):
                obj = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
            else:
                obj = cupy.cuda.ExternalStream(ptr)
            _stream_objects[key] = obj
        self._ctx = obj
        obj.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


# Kernel arguments. CuPy's launch converts every NumPy or Python scalar argument to its C form
# on every launch (for a NumPy scalar: a CScalar built from it, ~1 us, plus the NumPy scalar
# itself), which made the arguments the largest part of a launch's host time. The helpers
# below hand CuPy its own C-form objects (CPointer subclasses, which the launch takes as they
# are): int32 / int64 values as CScalar of that exact width, made once per value and reused
# (they are read-only), addresses as CIntptr (intptr_t, 8 bytes like every pointer parameter).
# Where this CuPy has no such classes, NumPy scalars as before.

_arg_kinds = None  # (CScalar, CIntptr), or () where CuPy lacks them; resolved on first use
_I32: dict = {}  # value -> int32 argument
_I64: dict = {}  # value -> int64 argument


def _arg_classes():
    global _arg_kinds
    if _arg_kinds is None:
        try:
            from cupy._core._scalar import CScalar
            from cupy.cuda.function import CIntptr, CPointer

            probe = CScalar(-3, np.int32)
            ok = (issubclass(CScalar, CPointer) and issubclass(CIntptr, CPointer)
                  and probe.dtype == np.int32 and probe.value == -3)
            _arg_kinds = (CScalar, CIntptr) if ok else ()
        except Exception:  # another CuPy: NumPy scalars
            _arg_kinds = ()
    return _arg_kinds


def _scalar(v, dtype, cache):
    kinds = _arg_classes()
    c = kinds[0](v, dtype) if kinds else dtype(v)  # both raise OverflowError out of range
    if len(cache) >= 4096:
        cache.clear()
    cache[v] = c
    return c


def _i32(v):
    """``v`` as an ``int`` kernel argument."""
    c = _I32.get(v)
    return c if c is not None else _scalar(v, np.int32, _I32)


def _i64(v):
    """``v`` as a ``long long`` kernel argument."""
    c = _I64.get(v)
    return c if c is not None else _scalar(v, np.int64, _I64)


def _first_address(p):
    global _address
    kinds = _arg_classes()
    _address = kinds[1] if kinds else np.uint64
    return _address(p)


_address = _first_address  # int -> pointer argument: CIntptr once resolved (np.uint64 without it)


def _addr(p):
    """A device address (an int) as a pointer kernel argument."""
    return _address(int(p))


def _ptr(a):
    """The address of CuPy array ``a`` (0 for None) as a pointer kernel argument."""
    return _address(0 if a is None else a.data.ptr)


def _ptr_at(a, offset: int):
    """The address ``offset`` bytes into CuPy array ``a`` (0 for None) as a pointer argument."""
    return _address(0 if a is None else a.data.ptr + offset)


# ----------------------------------------------------------------------------------------------
# emitters and bound plans
#
# The stages hand their launches to an emitter ``em``: ``em.ptr(array, offset)`` makes a pointer
# argument, ``em.launch(fn, grid, block, args, smem)`` launches, ``em.fill(array, value)`` fills
# (a degenerate shape). _DIRECT does all of it at once through CuPy (the ordinary path). A
# _Binder runs the very same stage code once and records the launches instead: the arrays of the
# call (q, k, weights, ..., out; known by identity) become slots rewritten on every call, every
# other argument (workspace addresses, the int arguments of the plans) a fixed value. The result,
# a _Bound, is the whole call as a preset cuLaunchKernel parameter buffer per launch: a later
# call with the same shapes, dtypes, parameters, device and stream writes its array addresses
# into the buffer and launches through the driver, nothing built or converted per launch.


class _Direct:
    """The ordinary emitter: every launch goes to CuPy at once (pointer arguments as CIntptr)."""

    __slots__ = ()

    @staticmethod
    def ptr(a, offset=0):
        return _address(0 if a is None else a.data.ptr + offset)

    @staticmethod
    def launch(fn, grid, block, args, smem=0):
        _check_arity(fn, args)
        if not (USE_PDL and _launch_pdl_args(fn, grid, block, args, smem)):
            fn(grid, block, args, shared_mem=smem)

    @staticmethod
    def fill(a, value):
        a.fill(value)


_DIRECT = _Direct()


class _Unbindable(Exception):
    """The call does something besides kernel launches (a fill of a degenerate shape)."""


class _Var:
    """A recorded pointer argument into call-time array ``index``, ``offset`` bytes in."""

    __slots__ = ("index", "offset")

    def __init__(self, index, offset):
        self.index, self.offset = index, offset


class _Fixed:
    """A recorded pointer argument that stays: a workspace address, or 0 for an absent array."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _Binder:
    """Emitter that records launches (see above). ``arrays``: the call-time arrays in slot order,
    None where the call has none (their pointer arguments are then fixed zeros)."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)  # alive while recording, so their ids stay unique
        self._index = {id(a): i for i, a in enumerate(self.arrays) if a is not None}
        self._spans = [(a.data.ptr, a.data.ptr + a.nbytes) for a in self.arrays if a is not None]
        self.launches = []

    def ptr(self, a, offset=0):
        if a is None:
            return _Fixed(0)
        i = self._index.get(id(a))
        if i is not None:
            return _Var(i, offset)
        p = a.data.ptr + offset
        if any(lo <= p < hi for lo, hi in self._spans):  # a view of a call-time array: its address
            raise _Unbindable  # would change from call to call, pass the array itself and an offset
        return _Fixed(p)

    def launch(self, fn, grid, block, args, smem=0):
        if not isinstance(fn, _bindable_functions()):  # e.g. a stand-in that records calls
            raise _Unbindable
        _check_arity(fn, args)
        self.launches.append((fn, tuple(grid), tuple(block), tuple(args), smem))

    def fill(self, a, value):
        raise _Unbindable


_BINDABLE = None  # the function types whose .ptr is a CUfunction (CuPy's Function), resolved on first use


def _bindable_functions():
    global _BINDABLE
    if _BINDABLE is None:
        try:
            from cupy.cuda.function import Function

            _BINDABLE = (Function,)
        except Exception:  # no CuPy: nothing binds
            _BINDABLE = ()
    return _BINDABLE


def _arg_slot(arg) -> int:
    """A recorded fixed argument as the 8-byte little-endian slot the driver reads it from
    (an int argument occupies its low 4 or 8 bytes)."""
    if isinstance(arg, _Fixed):
        return arg.value & 0xFFFFFFFFFFFFFFFF
    if isinstance(arg, np.generic):  # CuPy without CScalar: NumPy scalars
        value, size = int(arg), arg.itemsize
    elif hasattr(arg, "value") and hasattr(arg, "dtype"):  # CScalar
        value, size = int(arg.value), np.dtype(arg.dtype).itemsize
    else:
        raise _Unbindable
    if not isinstance(value, int) or size not in (4, 8):
        raise _Unbindable
    return value & ((1 << (8 * size)) - 1)


_launch_kernel = None  # cuLaunchKernel as CuPy's driver.launchKernel, resolved on first use


def _driver_launch():
    global _launch_kernel
    from cupy_backends.cuda.api import driver

    _launch_kernel = driver.launchKernel
    return _launch_kernel


_thread = threading.local()  # .devices: devices whose CUDA context this thread has made current


# Programmatic dependent launch (USE_PDL) goes through the driver's cuLaunchKernelEx with one
# launch attribute, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; CuPy has no launch
# with attributes, so the entry point is called through ctypes with the driver's structures.
class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the attribute id, 4 bytes of padding, a 64-byte value union (here the
    int programmaticStreamSerializationAllowed)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("nattrs", ctypes.c_uint)]


_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_launch_kernel_ex = None  # cuLaunchKernelEx through ctypes, resolved on first use (False: none)


def _driver_entry(name: str, argtypes):
    """The CUDA driver's entry point ``name`` through ctypes (``argtypes``, an int result: the
    CUresult), or None where there is no driver or it has no such entry point (an older one)."""
    try:
        fn = getattr(ctypes.CDLL("libcuda.so.1" if sys.platform != "win32" else "nvcuda.dll"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _driver_check(err: int) -> None:
    """Raise CUDADriverError (with the driver's name for it) where a driver call returned an error."""
    if err:
        from cupy_backends.cuda.api import driver

        driver.check_status(err)


def _driver_launch_ex():
    global _launch_kernel_ex
    if _launch_kernel_ex is None:  # a driver older than CUDA 12: none (plain launches)
        _launch_kernel_ex = _driver_entry("cuLaunchKernelEx", (ctypes.c_void_p,) * 4) or False
    return _launch_kernel_ex


_func_param_info = None  # cuFuncGetParamInfo through ctypes (CUDA 12.4+), resolved on first use (False: none)
#: CuPy Function -> its kernel's parameter count (0: unknown), asked of the driver once per function
_param_counts: dict = {}


def _driver_param_info():
    global _func_param_info
    if _func_param_info is None:  # a driver older than CUDA 12.4: none (no count, no check)
        _func_param_info = _driver_entry("cuFuncGetParamInfo", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                                                ctypes.c_void_p)) or False
    return _func_param_info


def _param_count(fn) -> int:
    """The number of parameters of ``fn``'s kernel as the driver reports it (cuFuncGetParamInfo
    answers for index 0 .. n - 1 and CUDA_ERROR_INVALID_VALUE past them), or 0 where it cannot say."""
    if not isinstance(fn, _bindable_functions()):  # a stand-in (the CPU tests'): its .ptr is no CUfunction
        return 0
    get, ptr = _driver_param_info(), fn.ptr
    if not get or not ptr:
        return 0
    off, size = ctypes.c_size_t(), ctypes.c_size_t()
    n = 0
    while n < 4096:
        err = get(ptr, n, ctypes.byref(off), ctypes.byref(size))
        if err == 1:  # CUDA_ERROR_INVALID_VALUE: past the last parameter
            return n
        if err:  # the driver cannot say for this function
            return 0
        n += 1
    return 0


def _check_arity(fn, args) -> None:
    """Raise ValueError where ``args`` has not one value per parameter of ``fn``'s kernel. The
    driver reads a launch's parameters by the kernel's own layout, so a short list would have it
    read past the end of the argument array (a crash of the process, or garbage arguments)."""
    n = _param_counts.get(fn)
    if n is None:
        if len(_param_counts) >= 4096:
            _param_counts.clear()
        n = _param_counts[fn] = _param_count(fn)
    if n and n != len(args):
        name = next((f"{key[0]}: {key[1]}" for key, f in _kernels.items() if f is fn), repr(fn))
        raise ValueError(f"kernel launch of {name}: expected {n} arguments (its parameters), got {len(args)}")


def _pdl_launches(fn, device: int) -> bool:
    """Whether ``fn`` (a CuPy Function) is launched with programmatic dependent launch on
    ``device``: USE_PDL, a GPU of compute capability 9.0 or later, the driver's entry point, and
    CuPy's argument objects (whose ``.ptr`` is the address of their value, as cuLaunchKernel's
    kernelParams wants)."""
    return (USE_PDL and isinstance(fn, _bindable_functions()) and bool(_arg_classes()) and bool(_driver_launch_ex())
            and _device_facts(device)["cc"] >= 90)


_PDL_ATTRIBUTE = None  # the one launch attribute every PDL launch passes (made on first use)


def _pdl_config(gx, gy, gz, bx, by, bz, smem, stream, cfg=None):
    """A CUlaunchConfig for one launch with the programmatic-serialization attribute (``cfg``:
    one to fill in instead of a new one)."""
    global _PDL_ATTRIBUTE
    if _PDL_ATTRIBUTE is None:
        _PDL_ATTRIBUTE = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    if cfg is None:
        cfg = _LaunchConfig(attrs=ctypes.pointer(_PDL_ATTRIBUTE), nattrs=1)
    cfg.grid[0], cfg.grid[1], cfg.grid[2] = gx, gy, gz
    cfg.block[0], cfg.block[1], cfg.block[2] = bx, by, bz
    cfg.smem, cfg.stream = smem, stream
    return cfg


def _launch_pdl(cfg, f, params):
    """cuLaunchKernelEx of CUfunction ``f`` with the CUlaunchConfig at address ``cfg``;
    ``params``: the address of the kernelParams array."""
    _driver_check(_launch_kernel_ex(cfg, f, params, None))


def _launch_dims(grid, block) -> tuple:
    """(gx, gy, gz, bx, by, bz) of a launch's grid and block tuples, padded and clamped to 1 as
    CuPy's own launch does: what the driver launches take."""
    grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
    return (max(1, grid[0]), max(1, grid[1]), max(1, grid[2]), max(1, block[0]), max(1, block[1]), max(1, block[2]))


def _launch_pdl_args(fn, grid, block, args, smem) -> bool:
    """_Direct's launch of ``fn`` with programmatic dependent launch on the current CuPy device and
    stream; False (nothing launched) where it does not apply (_pdl_launches) or an argument is not
    one of CuPy's argument objects."""
    device = _device_id()
    if not _pdl_launches(fn, device):
        return False
    try:
        params = np.array([a.ptr for a in args], dtype=np.uint64)  # where each argument's value lives
    except AttributeError:
        return False
    _context_ready(device)
    cfg = getattr(_thread, "pdl_config", None)  # this thread's, filled in per launch
    cfg = _thread.pdl_config = _pdl_config(*_launch_dims(grid, block), smem, _cupy().cuda.get_current_stream().ptr,
                                           cfg)
    _launch_pdl(ctypes.addressof(cfg), fn.ptr, params.ctypes.data)
    return True


def _context_ready(device: int, made: bool = False) -> None:
    """cuLaunchKernel needs a current context; CuPy's own launches make sure of it once per thread
    and device (a runtime call), and so does this. ``made``: this thread has just launched through
    CuPy on ``device`` (binding follows such a call), so the context is current already."""
    ready = getattr(_thread, "devices", None)
    if ready is None:
        ready = _thread.devices = set()
    if device not in ready:
        if not made:
            _cupy().cuda.runtime.memGetInfo()
        ready.add(device)


class _KernelNodeParams(ctypes.Structure):  # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p), ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("smem", ctypes.c_uint), ("params", ctypes.c_void_p), ("extra", ctypes.c_void_p),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


class _EdgeData(ctypes.Structure):  # CUgraphEdgeData
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


_CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC = 1
_CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC = 1
#: the driver's graph entry points (name, argument types), resolved on first use
_GRAPH_API = (("cuGraphCreate", (ctypes.c_void_p, ctypes.c_uint)),
              ("cuGraphAddKernelNode_v2", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                           ctypes.c_void_p)),
              ("cuGraphAddDependencies_v2", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_size_t)),
              ("cuGraphInstantiateWithFlags", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong)),
              ("cuGraphExecKernelNodeSetParams_v2", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)),
              ("cuGraphLaunch", (ctypes.c_void_p, ctypes.c_void_p)),
              ("cuGraphExecDestroy", (ctypes.c_void_p,)),
              ("cuGraphDestroy", (ctypes.c_void_p,)),
              ("cuStreamIsCapturing", (ctypes.c_void_p, ctypes.c_void_p)))
_graph_api = None  # name -> ctypes function, resolved on first use (False: the driver lacks one: no graphs)


def _driver_graph_api():
    global _graph_api
    if _graph_api is None:  # a driver before CUDA 12.3 (edge data) lacks some: no graphs
        api = {name: _driver_entry(name, argtypes) for name, argtypes in _GRAPH_API}
        _graph_api = api if all(api.values()) else False
    return _graph_api


class _CallGraph:
    """A bound call's launches as one instantiated CUDA graph. Kernel node i is launch i (its
    function, dimensions, shared memory and kernelParams array, whose slots the driver reads when
    the node is made or its parameters are set again), each node after the one before it: a
    programmatic edge where ``programmatic`` (the node may start once its predecessor's CTAs have
    all triggered or exited, as programmatic dependent launch lets a kernel start; the kernels wait
    for their predecessor's output as they do there), a full dependency otherwise. ``update(i)``:
    node i reads its kernelParams again (for the launches after this one); ``launch(stream)``
    launches the graph. Raises CUDADriverError where the driver refuses."""

    __slots__ = ("_api", "_graph", "_exec", "_nodes", "_params")

    def __init__(self, launches, programmatic: bool):
        api = self._api = _driver_graph_api()
        self._graph = self._exec = None
        self._nodes, self._params = [], []
        graph = ctypes.c_void_p()
        _driver_check(api["cuGraphCreate"](ctypes.byref(graph), 0))
        self._graph = graph
        try:
            for f, gx, gy, gz, bx, by, bz, smem, params in launches:
                p = _KernelNodeParams(func=f, smem=smem, params=params)
                p.grid[:] = (gx, gy, gz)
                p.block[:] = (bx, by, bz)
                node = ctypes.c_void_p()
                _driver_check(api["cuGraphAddKernelNode_v2"](ctypes.byref(node), graph, None, 0, ctypes.byref(p)))
                if self._nodes:
                    edge = _EdgeData()
                    if programmatic:
                        edge.from_port = _CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
                        edge.type = _CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
                    _driver_check(api["cuGraphAddDependencies_v2"](graph, ctypes.byref(self._nodes[-1]),
                                                                  ctypes.byref(node), ctypes.byref(edge), 1))
                self._nodes.append(node)
                self._params.append(p)
            ex = ctypes.c_void_p()
            _driver_check(api["cuGraphInstantiateWithFlags"](ctypes.byref(ex), graph, 0))
            self._exec = ex
        except Exception:
            self.close()
            raise

    def update(self, i: int) -> None:
        _driver_check(self._api["cuGraphExecKernelNodeSetParams_v2"](self._exec, self._nodes[i],
                                                                     ctypes.byref(self._params[i])))

    def launch(self, stream: int) -> None:
        _driver_check(self._api["cuGraphLaunch"](self._exec, stream))

    def close(self) -> None:
        """Destroy the executable graph and the graph (once; later calls do nothing)."""
        ex, graph, self._exec, self._graph = self._exec, self._graph, None, None
        if ex is not None:
            self._api["cuGraphExecDestroy"](ex)
        if graph is not None:
            self._api["cuGraphDestroy"](graph)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may be gone
            pass


class _Bound:
    """The kernel launches of one call signature on one (device, stream), bound (see above).

    ``bound(ptrs)``: ``ptrs`` are the addresses of the call-time arrays in slot order (0 where
    absent). Launches everything in order on the bound stream and returns True, or returns False
    having launched nothing when the plan no longer holds (the workspace was regrown or released,
    a knob changed, another device is current) or an array is not aligned as the kernels need
    (``align``: slots that must be 16-byte aligned); the caller then takes the ordinary path.

    Memory (``_mem``, uint64 slots): the call-time addresses first (one slot per (array, offset)
    used), then the fixed arguments, then per launch its kernelParams array: the address of the
    slot of each argument. Only the first part is written per call, under a lock (two threads on
    one plan); cuLaunchKernel copies the arguments before it returns.
    """

    __slots__ = ("_mem", "_pack", "_var", "_launches", "_fns", "_stream", "_device", "_ws", "_ws_key", "_gen",
                 "_knobs", "_align", "_lock", "_pdl", "_pdl_configs", "_pdl_launches", "launches", "_graph",
                 "_graph_vars", "_graph_last")

    def __init__(self, records, nvar, var, stream, device, ws, ws_key, gen, knobs, align):
        nfixed = sum(1 for *_, args, _ in records for a in args if not isinstance(a, _Var))
        nargs = sum(len(args) for *_, args, _ in records)
        mem = np.zeros(nvar + nfixed + nargs, dtype=np.uint64)
        base = mem.ctypes.data
        fixed = nvar
        at = nvar + nfixed
        launches = []
        graph_vars = []  # per launch, the call-time slots it reads (CALL_GRAPHS)
        for fn, grid, block, args, smem in records:
            params = base + 8 * at
            graph_vars.append(frozenset(var[(a.index, a.offset)] for a in args if isinstance(a, _Var)))
            for a in args:
                if isinstance(a, _Var):
                    slot = var[(a.index, a.offset)]
                else:
                    slot = fixed
                    mem[slot] = _arg_slot(a)
                    fixed += 1
                mem[at] = base + 8 * slot
                at += 1
            launches.append((fn.ptr, *_launch_dims(grid, block), smem, params))
        self._mem = mem
        self._var = tuple(sorted(var, key=var.get))  # (array index, offset) per call-time slot
        self._pack = struct.Struct(f"<{nvar}Q").pack_into
        self._launches = tuple(launches)
        self._fns = tuple(r[0] for r in records)  # the functions keep their modules loaded
        self._stream, self._device = stream, device
        self._ws, self._ws_key, self._gen, self._knobs = ws, ws_key, gen, knobs
        self._align = align
        self._lock = threading.Lock()
        self._pdl = all(_pdl_launches(fn, device) for fn in self._fns)  # as _Direct would launch them
        # PDL: one preset CUlaunchConfig per launch (the stream is the plan's), so that a call
        # passes three addresses per launch and builds nothing (_pdl_configs keeps them alive)
        self._pdl_configs = [_pdl_config(*l[1:8], self._stream) for l in launches] if self._pdl else []
        self._pdl_launches = tuple((ctypes.addressof(cfg), l[0], l[8]) for cfg, l in zip(self._pdl_configs, launches))
        self.launches = len(launches)
        # CALL_GRAPHS: the call's _CallGraph, made at its first call (None: not yet; False: none to
        # be had), per node the call-time slots it reads, and the slots' values its nodes hold
        self._graph, self._graph_vars, self._graph_last = None, tuple(graph_vars), None

    @property
    def stream(self) -> int:
        return self._stream

    def records(self):
        """(function pointer, grid, block, smem, kernelParams address) per launch (tests, bench/)."""
        return [(f, (gx, gy, gz), (bx, by, bz), smem, params)
                for f, gx, gy, gz, bx, by, bz, smem, params in self._launches]

    def __call__(self, ptrs) -> bool:
        if (self._ws.gen != self._gen or _workspaces.get(self._ws_key) is not self._ws
                or _device_id() != self._device or _knobs() != self._knobs):
            return False
        for i in self._align:
            if ptrs[i] & 15:
                return False
        _context_ready(self._device)
        with self._lock:
            values = [ptrs[i] + offset for i, offset in self._var]
            if values:
                self._pack(self._mem, 0, *values)
            if CALL_GRAPHS and self._graph is not False and self._launch_graph(values):
                return True
            if self._pdl:
                for cfg, f, params in self._pdl_launches:
                    _launch_pdl(cfg, f, params)
            else:
                launch, stream = _launch_kernel or _driver_launch(), self._stream
                for f, gx, gy, gz, bx, by, bz, smem, params in self._launches:
                    launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, 0)
        return True

    def _launch_graph(self, values) -> bool:
        """Launch the call as its _CallGraph (made at the first call; nodes whose call-time slots
        changed since the last call read their parameters again first), or return False having
        launched nothing: where the driver has no graphs or refuses to make this one (the plan then
        always launches one by one), and while the stream is being captured into a graph of the
        caller's (its launches one by one are what the capture records)."""
        api = _driver_graph_api()
        if not api:
            self._graph = False
            return False
        capturing = ctypes.c_int()
        if api["cuStreamIsCapturing"](self._stream, ctypes.byref(capturing)) or capturing.value:
            return False
        graph = self._graph
        if graph is None:
            try:
                graph = _CallGraph(self._launches, self._pdl)
            except Exception:  # e.g. a driver without programmatic edges: launches one by one
                self._graph = False
                return False
            self._graph = graph
        elif values != self._graph_last:
            changed = {i for i, (a, b) in enumerate(zip(values, self._graph_last)) if a != b}
            for node, slots in enumerate(self._graph_vars):
                if not changed.isdisjoint(slots):
                    graph.update(node)
        self._graph_last = values
        graph.launch(self._stream)
        return True


def _bind(run, arrays, stream, align):
    """Run ``run(binder)`` (a stage body) with a _Binder over ``arrays`` and make its _Bound; None
    where the call is not only launches, or an argument cannot be bound."""
    if sys.byteorder != "little":
        return None
    binder = _Binder(arrays)
    try:
        with _on_stream(stream):  # where a workspace buffer is (re)allocated, as in a call
            run(binder)
        var = {}
        for *_, args, _ in binder.launches:
            for a in args:
                if isinstance(a, _Var):
                    var.setdefault((a.index, a.offset), len(var))
        for *_, args, _ in binder.launches:  # fixed arguments must be representable
            for a in args:
                if not isinstance(a, _Var):
                    _arg_slot(a)
    except _Unbindable:
        return None
    device = _device_id()
    ws_key = (device, int(stream or 0))
    ws = workspace(stream)
    _context_ready(device, made=True)
    return _Bound(binder.launches, len(var), var, int(stream or 0), device, ws, ws_key, ws.gen, _knobs(), align)



# ----------------------------------------------------------------------------------------------
# generic launches

def _list_cap(k: int) -> int:
    """Entries of list mode's selected list (and of register mode's, by score): the next power of
    two >= k, at least SELECT_LIST_MIN."""
    return max(SELECT_LIST_MIN, 1 << max(0, int(math.ceil(math.log2(max(k, 1))))))


def _select_plan(k: int, ncols: int, by_score: bool, smem_optin: int, rows: int = 1, sms: int = 132):
    """(lists, sort_cap, cand_cap, ring, cache_cap, smem) of one row_select launch (row_select.cuh).

    List mode holds a selected list of sort_cap = max(512, next power of two >= k) entries and a
    candidate list of cand_cap >= sort_cap entries; it is used whenever they fit in shared
    memory. Otherwise the in-order mode runs (any k for position order; by score, its bitonic
    buffer must fit). A row's keys are cached in shared memory when they fit beside the fixed
    part (cache_cap keys). Rows that do not fit are read from global memory: as long as the CTAs
    per SM that ``rows`` needs leave room, through a ring of asynchronous copies (``ring``,
    SELECT_RING_BYTES) and with a longer candidate list (fewer passes over the row)."""
    p2 = 1 << max(0, int(math.ceil(math.log2(max(k, 1)))))
    budget = smem_optin - 1024
    cap = _list_cap(k)
    lists = SELECT_LIST_FIXED_SMEM + 16 * cap <= budget
    cand_cap, ring = 0, False
    if lists:
        sort_cap, fixed = cap, SELECT_LIST_FIXED_SMEM + 16 * cap
    else:
        sort_cap = p2 if by_score else 0
        fixed = SELECT_FIXED_SMEM + sort_cap * 8
        if fixed > budget:
            raise ValueError(f"topk={k} too large for order='score' on this GPU "
                             f"(at most {(budget - SELECT_FIXED_SMEM) // 8})")
    cache_cap = max(0, (budget - fixed) // 4) if SELECT_CACHE_ROWS else 0
    if ncols <= cache_cap:
        smem = fixed + ncols * 4
        cand_cap = sort_cap if lists else 0
    elif lists:
        per_sm = max(1, min(4, -(-rows // max(1, sms))))
        cta_budget = max(fixed, (smem_optin + 1024) // per_sm - 1024 if per_sm > 1 else budget)
        ring = SELECT_RING and cta_budget - fixed >= SELECT_RING_BYTES
        room = cta_budget - fixed - (SELECT_RING_BYTES if ring else 0)
        cand_cap = max(cap, min(room // 64 * 8 + cap, -(-ncols // 8) * 8))
        smem = fixed + 8 * (cand_cap - cap) + (SELECT_RING_BYTES if ring else 0)
    else:
        smem = fixed
    return lists, sort_cap, cand_cap, ring, cache_cap, smem


def _launch_select(filename, kernel, *, rows, keys=None, scores=None, ld, ncols, lengths=None, k,
                   row0=0, T, S, ks=None, ke=None, blocks=None, m=0, B=1, relative=False,
                   by_score=False, out_idx, out_ld, out_val=None, out_off=0, em=None, extra=(), range_off=0):
    """Row top-k launches (row_select.cuh) of ``rows`` rows of ``keys`` / ``scores`` (row stride
    ``ld``), writing row r to ``out_idx`` (and ``out_val``) ``out_off`` bytes + r * out_ld items in.
    ``extra``: arguments after the select parameters (arrays as pointers, (array, byte offset)
    pairs as pointers into them, ints as int32), for
    the kernels that take more (the filtered paths, row_filter.cuh); ``range_off``: bytes into
    ``ks`` / ``ke`` (a launch whose row 0 is a later row of them)."""
    em = em or _DIRECT
    if rows == 0:
        return
    ctx = _plan_context()
    key = ("select", filename, kernel, rows, ld, ncols, k, row0, T, S, m, B, relative, by_score, out_ld, ctx)
    plan = _plans.get(key)
    if plan is None:
        facts = _device_facts(ctx[0])
        warp, regs = _select_form(kernel, keys is not None, ncols, k, by_score, facts["smem_optin"])
        wide = kernel in _WIDE_SELECT_KERNELS
        if kernel in _REG_ONLY_SELECT_KERNELS and not regs:
            raise ValueError(f"{kernel} is register mode only: k = {k} over {ncols} columns does not fit it")
        if warp:
            kernel = kernel[:-len("_kernel")] + "_warp_kernel"
            if kernel == "block_topm_warp_kernel":  # its keys per lane fitted to the rows
                kernel += f"<{_warp_keys_per_lane(ncols)}>"
            lists, sort_cap, cand_cap, ring, cache_cap, smem = False, 0, 0, False, 0, 0
            per_cta, block = WARP_SELECT_ROWS, (32 * WARP_SELECT_ROWS,)
        elif kernel in _SORTED_REG_SELECT_KERNELS:  # register mode, list mode's sort in either order
            sort_cap = _list_cap(k)
            smem, lists, cand_cap, ring, cache_cap = SELECT_LIST_FIXED_SMEM + 16 * sort_cap, False, 0, False, 0
            per_cta, block = 1, (SELECT_THREADS,)
        elif regs:  # the wide kernels are launched by their own names
            kernel = kernel if wide else kernel[:-len("_kernel")] + "_regs_kernel"
            (sort_cap, smem), lists, cand_cap, ring, cache_cap = regs, False, 0, False, 0
            per_cta, block = 1, (FILTER_WIDE_THREADS if wide else SELECT_THREADS,)
        else:
            lists, sort_cap, cand_cap, ring, cache_cap, smem = _select_plan(k, ncols, by_score, facts["smem_optin"],
                                                                            rows, facts["sms"])
            per_cta, block = 1, (SELECT_THREADS,)
        launches = []
        step = MAX_ROWS_PER_LAUNCH * per_cta
        for r0 in range(0, rows, step):
            nr = min(step, rows - r0)
            launches.append(((-(-nr // per_cta),), r0 * ld * 4, r0 * out_ld * 4, (_i64(ld), _i32(ncols)),
                             (_i32(k), _i32(cache_cap), _i32(row0 + r0), _i32(T), _i32(S)),
                             (_i32(m), _i32(B), _i32(0), _i32(int(relative)), _i32(int(by_score)),
                              _i32(sort_cap), _i32(int(lists)), _i32(cand_cap), _i32(int(ring))),
                             (_i64(out_ld),) + ((_i32(nr),) if warp else ())))
        plan = _keep_plan(key, (kernel, block, smem, tuple(launches)))
    kernel, block, smem, launches = plan
    fn = _kernel(filename, kernel, smem)
    ptr = em.ptr
    side = (ptr(ks, range_off), ptr(ke, range_off), ptr(blocks))
    tail = tuple(_i32(x) if isinstance(x, int) else ptr(*x) if isinstance(x, tuple) else ptr(x) for x in extra)
    for grid, koff, ooff, a, b, c, d in launches:
        em.launch(fn, grid, block, (ptr(keys, koff), ptr(scores, koff)) + a + (ptr(lengths),) + b
                  + side + c + (ptr(out_idx, out_off + ooff),) + d[:1] + (ptr(out_val, out_off + ooff),) + d[1:]
                  + tail, smem)


#: select kernels with a register-mode twin (`<name>_regs_kernel`, row_select_regs)
_REG_SELECT_KERNELS = ("block_topm_kernel", "refine_topk_kernel", "refine_topk_ready_kernel", "dense_topk_kernel",
                       "topk_kernel", "topk_merge_kernel", "topk_filtered_kernel", "dense_filtered_kernel")
#: register-mode select kernels of FILTER_WIDE_THREADS threads (named as launched; no twins)
_WIDE_SELECT_KERNELS = ("topk_filtered_wide_kernel", "dense_filtered_wide_kernel")
#: register-mode select kernels that sort their selected items in either order (named as launched;
#: dense.cu's select of unordered candidate lists)
_SORTED_REG_SELECT_KERNELS = ("dense_select_unordered_kernel",)
#: select kernels with a warp-mode twin (`<name>_warp_kernel`, row_select_warp)
_WARP_SELECT_KERNELS = ("block_topm_kernel", "refine_topk_kernel", "dense_topk_kernel")


#: select kernels that have no list-mode form: _launch_select raises where register mode does not fit
#: (hisa_select asks _union_ready first, which takes the same decision through _select_form)
_REG_ONLY_SELECT_KERNELS = _WIDE_SELECT_KERNELS + ("refine_topk_ready_kernel",)


def _select_form(kernel: str, u32_keys: bool, ncols: int, k: int, by_score: bool, smem_optin: int):
    """(warp, regs) of a row top-k launch of ``kernel``: whether it takes warp mode (_warp_select),
    and otherwise its register-mode (sort_cap, smem) (_reg_select_plan) or None (list mode). The one
    place this decision is taken: _launch_select launches by it, _union_ready plans by it."""
    warp = _warp_select(kernel, u32_keys, ncols, by_score)
    reg_capable = kernel in _WIDE_SELECT_KERNELS or kernel in _REG_SELECT_KERNELS
    regs = None if warp or not reg_capable else _reg_select_plan(k, ncols, by_score, smem_optin)
    return warp, regs


def _reg_select_plan(k: int, ncols: int, by_score: bool, smem_optin: int):
    """(sort_cap, smem) of a register-mode launch (row_select_regs: one CTA per row, the row's keys
    in registers), or None where register mode does not apply: REG_SELECT off, rows longer than
    REG_SELECT_ITEMS, or (order by score) a selected list and sort scratch that do not fit."""
    if not (REG_SELECT and 0 < ncols <= REG_SELECT_ITEMS):
        return None
    sort_cap = _list_cap(k) if by_score else 0
    smem = SELECT_LIST_FIXED_SMEM + 16 * sort_cap
    return (sort_cap, smem) if smem <= smem_optin - 1024 else None


def _warp_keys_per_lane(ncols: int) -> int:
    """Keys per lane of block_topm_warp_kernel<R> for rows of ``ncols`` blocks: the fewest of
    WARP_KEYS_PER_LANE that hold them (its threshold search and in-order pass take R steps per bit
    and per row; at 256 blocks, 32K keys, 8 instead of 32)."""
    return next(r for r in WARP_KEYS_PER_LANE if 32 * r >= ncols)


def _warp_select(kernel: str, u32_keys: bool, ncols: int, by_score: bool) -> bool:
    """Whether a row top-k launch takes warp mode: precomputed keys, position order, rows of at
    most WARP_SELECT_ITEMS items, and a kernel that has the warp twin."""
    return (WARP_SELECT and u32_keys and not by_score and 0 < ncols <= WARP_SELECT_ITEMS
            and kernel in _WARP_SELECT_KERNELS)


def _score_engine(q, keys, H, D, shared_keys):
    """(engine, query rows per CTA of the wgmma engine or 0, q's dtype code, the keys' dtype code)
    of the score kernels for these operands on this device (_select_engine)."""
    qdt, kdt = _dt_code(q), _dt_code(keys)
    engine, wgmma_rows = _select_engine(qdt, kdt, H, D, _device_facts(_device_id())["cc"], shared_keys)
    return engine, wgmma_rows, qdt, kdt


def _score_instance_of(kernel, choice, H, D, shared_keys, *, half=False):
    """(name expression, dynamic smem bytes, rows per CTA) of score kernel ``kernel`` for an engine
    choice (_score_engine); half: block_score_wgmma_kernel's HALF form (_block_score_half)."""
    engine, rows, qdt, kdt = choice
    if rows:
        smem = _wgmma_smem(engine, H, D, rows, kdt=kdt, half=half)
        name = f"{kernel[:-len('_kernel')]}_wgmma_kernel<{engine}, {qdt}, {kdt}, {H}, {D}"
        name += (f", {rows}" if shared_keys else "") + (", 1>" if half else ">")
        return name, smem, rows
    if half:
        raise ValueError("cupy backend: the HALF form is a wgmma form")
    rows = _rows_per_cta(engine, kdt, H, shared_keys)
    smem = _score_smem(engine, kdt, H, D, rows)
    name = f"{kernel}<{engine}, {qdt}, {kdt}, {H}, {D}" + (f", {rows}>" if shared_keys else ">")
    return name, smem, rows


def _score_instance(filename, kernel, q, keys, H, D, shared_keys):
    """(name expression, dynamic smem bytes, rows per CTA) of the score kernel for these operands."""
    return _score_instance_of(kernel, _score_engine(q, keys, H, D, shared_keys), H, D, shared_keys)


def _block_score_half(engine: int, kdt: int, wgmma_rows: int, H: int, tiles_per_cta: int, ctas: int,
                      sms: int) -> bool:
    """Whether a block-score launch of ``ctas`` CTAs of ``tiles_per_cta`` key tiles takes
    block_score_wgmma_kernel's HALF form: the wgmma engine (``wgmma_rows`` > 0, _select_engine) on
    16-bit pooled keys in its own type (dtype code ``kdt``), wgmma_rows * H = 128, and
    BLOCK_SCORE_HALF: 1 always, 2 where a CTA scores at most BLOCK_SCORE_HALF_MAX_TILES tiles and the
    launch fills at least two waves of three CTAs per SM (at T = 1024 the form was no faster with 1-2
    tiles per CTA and slower with 4: bench/NOTES.md, session 39)."""
    if not BLOCK_SCORE_HALF or wgmma_rows * H != 128 or (engine, kdt) not in _HALF_KEYS:
        return False
    return BLOCK_SCORE_HALF == 1 or (tiles_per_cta <= BLOCK_SCORE_HALF_MAX_TILES and ctas >= 2 * 3 * sms)


def _score_kernel(filename, kernel, q, keys, H, D, *, shared_keys):
    """(function, dynamic smem bytes, rows per CTA) of a score_tile kernel for these operands."""
    key = ("score", filename, kernel, q.dtype, keys.dtype, H, D, shared_keys, _plan_context())
    plan = _plans.get(key)
    if plan is None:
        plan = _keep_plan(key, _score_instance(filename, kernel, q, keys, H, D, shared_keys))
    name, smem, rows = plan
    return _kernel(filename, name, smem), smem, rows


# ----------------------------------------------------------------------------------------------
# launch plans: what a stage decides from shapes, dtypes, parameters, the device and the module's
# knobs (engine, kernel instance, shared memory, grids, row chunks, tiles per CTA), computed once
# per combination and looked up afterwards. A call then only fills in the addresses. The kernels
# are still fetched through _kernel on every call (a dictionary look-up), so replacing _kernel
# (tests that record what is launched) sees every launch.

#: plan key -> plan; keys end with the device and _knobs(), so flipping a knob takes effect
_plans: dict = {}


def _knobs():
    """The module settings the plans depend on (tests and bench/ flip them at run time)."""
    return (USE_WGMMA, FP8_TENSOR_ACCUMULATE, MAX_ROWS_PER_CTA, USE_UNION_PAIRS, REFINE_WORKSPACE_BYTES,
            DENSE_WORKSPACE_BYTES, MAX_ROWS_PER_LAUNCH, SCORE_TILE, SELECT_RING, UNION_SPLITS, WARP_SELECT,
            SCORE_CTAS_PER_SM, REG_SELECT, SELECT_CACHE_ROWS, POOL_BATCH, DENSE_FILTER, POOL_VEC, POOL_FIXED, USE_PDL,
            PAIR_RECORDS, FILTER_WIDE_SELECT, DENSE_THRESHOLD, DENSE_THRESHOLD_MIN_S, DENSE_SAMPLE_STRIDE,
            DENSE_SAMPLE_RANK, UNION_LAYOUT, UNION_TAIL_SPLITS, UNION_TAIL_WAVES, TOPM_TRIGGER_WAVES,
            UNION_FINE_TAIL_SPLITS, UNION_FINE_TAIL_PAIRS, BLOCK_SCORE_HALF, BLOCK_SCORE_HALF_MAX_TILES, UNION_READY,
            UNION_READY_MAX_WAVES, UNION_TILE_MAP)


def _keep_plan(key, plan):
    if len(_plans) >= 1024:
        _plans.clear()
    _plans[key] = plan
    return plan


def _pool_vec(k, D) -> bool:
    """Whether pool_vec_kernel takes keys ``k`` [S, D]: POOL_VEC, D <= 128, rows a whole number of
    16-byte vectors, the keys 16-byte aligned."""
    return POOL_VEC and D <= 128 and (D * k.dtype.itemsize) % 16 == 0 and k.data.ptr % 16 == 0


def _pool_plan(k, pool_dtype, S, D, block_size):
    """(name, grid, block, (S, D, B) as arguments) of the pooling launch."""
    nb = -(-S // block_size)
    if _pool_vec(k, D):
        fixed = f", {D}" if POOL_FIXED and D == POOL_FIXED_SIZE else ""
        return (f"pool_vec_kernel<{_dt_code(k)}, {POOL_CODES[pool_dtype]}{fixed}>", (nb,), (128,),
                (_i32(S), _i32(D), _i32(block_size)))
    if POOL_BATCH not in POOL_BATCHES:
        raise ValueError(f"cupy backend: POOL_BATCH must be one of {POOL_BATCHES}, got {POOL_BATCH}")
    name = f"pool_kernel<{_dt_code(k)}, {POOL_CODES[pool_dtype]}, {POOL_BATCH}>"
    return name, (nb,), (max(32, -(-D // 32) * 32),), (_i32(S), _i32(D), _i32(block_size))


def _blocks_plan(q, pooled, T, H, D, nb, seq_len, block_size):
    """(name, smem, ((grid, int arguments before the keys, byte offset of the keys, int arguments
    after), ...)) of the block-score launches (row chunks of at most MAX_ROWS_PER_LAUNCH)."""
    choice = _score_engine(q, pooled, H, D, True)
    name, smem, rows = _score_instance_of("block_score_kernel", choice, H, D, True)
    ntiles = -(-nb // SCORE_TILE)
    tpc = _tiles_per_cta(ntiles, T // rows)
    engine, wgmma_rows, _, kdt = choice
    sms = _device_facts(_device_id())["sms"]
    if _block_score_half(engine, kdt, wgmma_rows, H, tpc, -(-ntiles // tpc) * -(-T // rows), sms):
        name, smem, _ = _score_instance_of("block_score_kernel", choice, H, D, True, half=True)
    head = (_i32(T), _i32(seq_len), _i32(block_size), _i32(nb))
    launches = []
    for r0 in range(0, T, MAX_ROWS_PER_LAUNCH):
        nr = min(MAX_ROWS_PER_LAUNCH, T - r0)
        launches.append(((-(-ntiles // tpc), -(-nr // rows)), head + (_i32(r0), _i32(nr)), r0 * nb * 4,
                         (_i64(nb), _i32(tpc))))
    return name, smem, tuple(launches)


def _refine_plan(q, k, T, H, D, S, m, block_size, pairs_ok):
    """(name, smem, candidates per row, chunk rows, ((row0, rows, grid, int arguments before the
    keys, after, the union kernel's layout (head pairs, their splits, the others' splits: ints)), ...), grouped, early,
    few_waves) of the
    candidate-score launches: pairs of rows over their blocks' union where it applies (pairs_ok: the
    blocks come from select_blocks; the pairs' shares laid out by _union_layout), else one row per
    CTA; rows in chunks whose candidate keys stay within REFINE_WORKSPACE_BYTES. grouped: None
    without pairs, else whether the union kernel orders a pair's union by group (its SPLIT_ROWS:
    fp8 keys on the f16 engine) rather than by block. early: whether hisa_select's block top-m
    triggers the first union launch at its start (block_topm_warp_kernel's `early`): that launch
    has at least TOPM_TRIGGER_WAVES > 0 waves of CTAs. few_waves: the first union launch has fewer
    than UNION_READY_MAX_WAVES waves (where the ready flags apply, _union_ready)."""
    n = m * block_size
    facts = _device_facts(_device_id())
    qdt, kdt = _dt_code(q), _dt_code(k)
    engine, rows = _select_engine(qdt, kdt, H, D, facts["cc"], True)
    smem = _wgmma_smem(engine, H, D, 2, m, kdt=kdt)  # the union path's (grows with m)
    pairs = (pairs_ok and USE_UNION_PAIRS and T > 1 and rows == 2 and 2 * H == 128
             and smem <= facts["smem_optin"])
    # the union kernel's SPLIT_ROWS order (fp8 keys on the f16 engine; pairs means H = 64)
    grouped = (engine == ENGINE_F16 and kdt == DT_E4M3) if pairs else None
    if pairs:
        tile_map = UNION_TILE_MAP and grouped and block_size == SCORE_TILE  # refine.cu TILE_MAP
        name = f"refine_union_wgmma_kernel<{engine}, {qdt}, {kdt}, {H}, {D}{', true' if tile_map else ''}>"
        tpc, per_cta, grid_x = 0, 2, None
    else:
        name, smem, _ = _score_instance("refine.cu", "refine_score_kernel", q, k, H, D, False)
        ntiles = -(-n // SCORE_TILE)
        tpc, per_cta = _tiles_per_cta(ntiles, T), 1
        grid_x = -(-ntiles // tpc)
    # all rows at once if they fit, else chunks of an even number of rows (pairs stay whole)
    budget = max(2, min(MAX_ROWS_PER_LAUNCH - 1, REFINE_WORKSPACE_BYTES // (n * 4)) // 2 * 2)
    chunk = T if T <= budget else budget
    head = (_i32(T), _i32(S), _i32(block_size), _i32(m))
    tail = (_i64(n), _i32(tpc))
    launches = []
    slots = _ctas_per_sm("refine.cu", name, smem, SCORE_THREADS) * facts["sms"] if grid_x is None else 0
    for r0 in range(0, T, chunk):
        nr = min(chunk, T - r0)
        if grid_x is None:  # pairs: one CTA per share of a pair (refine_union_wgmma_kernel)
            head_pairs, head_splits, tail_splits = _union_layout(-(-nr // 2), facts["sms"], slots)
            ctas = head_pairs * head_splits + (-(-nr // 2) - head_pairs) * tail_splits
            launches.append((r0, nr, (ctas, 1), head + (_i32(r0), _i32(nr)), tail,
                             (head_pairs, head_splits, tail_splits)))
            continue
        launches.append((r0, nr, (grid_x, -(-nr // per_cta)), head + (_i32(r0), _i32(nr)), tail, ()))
    early = bool(pairs and TOPM_TRIGGER_WAVES and launches[0][2][0] >= TOPM_TRIGGER_WAVES * slots)
    few_waves = bool(pairs and launches[0][2][0] < UNION_READY_MAX_WAVES * slots)
    return name, smem, n, chunk, tuple(launches), grouped, early, few_waves


def _refine_plan_of(q, k, T, H, D, S, m, block_size, blocks_from_select, ctx):
    """_refine_plan, kept per shape and context."""
    pairs_ok = bool(blocks_from_select)
    key = ("refine", T, H, D, S, m, block_size, q.dtype, k.dtype, pairs_ok, ctx)
    plan = _plans.get(key)
    if plan is None:
        plan = _keep_plan(key, _refine_plan(q, k, T, H, D, S, m, block_size, pairs_ok))
    return plan


def _block_topm_warp(nb: int) -> bool:
    """Whether the block top-m over nb blocks takes warp mode (block_topm_warp_kernel, whose two
    arguments after the select parameters are the pairs' records and their order)."""
    return _warp_select("block_topm_kernel", True, nb, False)


def _pair_records(nb: int, grouped) -> bool:
    """Whether hisa_select's block top-m also records each pair's union of blocks for the union
    kernel (row_select.cuh write_pair_record): PAIR_RECORDS, the refinement runs on pairs (grouped
    is not None) and the block top-m in warp mode (its rows' selected sets as 1024-bit masks)."""
    return PAIR_RECORDS and grouped is not None and _block_topm_warp(nb)


def _union_splits(pairs: int, sms: int) -> int:
    """CTAs per pair of the union launch: UNION_SPLITS, or where it is 0 about 12 CTAs per SM
    (4 waves at 3 CTAs per SM), 2 to 4 per pair. H200, 128K keys: 2 splits at 2048 pairs
    (1 -> 2: -2%), 3 at 512 pairs (1 -> 3: -16%), bench/profile_run.py --sweep UNION_SPLITS."""
    if UNION_SPLITS:
        return max(1, int(UNION_SPLITS))
    return min(4, max(2, round(12 * sms / max(1, pairs))))


def _union_layout(pairs: int, sms: int, slots: int):
    """(head pairs, their CTAs per pair, CTAs per pair of the others) of a union launch over
    ``pairs`` pairs in launch order (refine_union_wgmma_kernel), ``slots`` CTAs resident at once.

    Each CTA stages q and its pair's union and fills its key pipeline (H200: ~9 us of a slot), so
    fewer CTAs per pair pay less; but CTAs start in launch order as slots free up, and the last
    ones decide when the launch ends, so the last pairs want short CTAs. UNION_LAYOUT "model" takes
    the layout with the earliest end in _union_makespan among one uniform split per pair
    (_union_splits, the former layout) and whole pairs followed by 2-8 shares for the last pairs,
    as many as fill 0.5-2 waves. H200 at 128K keys (bench/NOTES.md, session 30), against the uniform
    split (3 shares per pair at 512 pairs, 2 at 2048): 1 share, then 3 for the last 132 of 512
    pairs, -3.6%; 1, then 4 for the last 99 of 2048, -3.6% to -4.7% (the whole hisa_select call);
    the model picks both. Its equal pairs are not what runs, though: where _union_fine_tail's rule
    applies, its layout comes first (session 38: a call another 13 us shorter at 128K / 1024)."""
    splits = int(UNION_SPLITS) if UNION_SPLITS else _union_splits(pairs, sms)
    if UNION_TAIL_SPLITS:
        tail = min(pairs, max(1, round(UNION_TAIL_WAVES * slots / int(UNION_TAIL_SPLITS))))
        return pairs - tail, splits, int(UNION_TAIL_SPLITS)
    uniform = (pairs, splits, splits)
    if UNION_LAYOUT != "model" or UNION_SPLITS or pairs < slots:
        return uniform
    fine = _union_fine_tail(pairs, slots)
    if fine is not None:
        return fine
    best, best_end = uniform, _union_makespan(pairs, uniform, slots)
    for tail_splits in range(2, 9):
        for waves in (0.5, 1.0, 1.5, 2.0):
            tail = min(pairs, max(1, round(waves * slots / tail_splits)))
            layout = (pairs - tail, 1, tail_splits)
            end = _union_makespan(pairs, layout, slots)
            if end < best_end * 0.99:  # a clear gain in the model, else the former layout
                best, best_end = layout, end
    return best


def _union_fine_tail(pairs: int, slots: int):
    """The union layout's fine tail, or None: the last UNION_FINE_TAIL_PAIRS * slots pairs in
    UNION_FINE_TAIL_SPLITS shares each, the others whole, where the whole pairs fill their last
    wave at least 3/4 (a last wave of few whole pairs ends a pair's time after the rest).

    _union_makespan's equal pairs are not what a launch runs: a pair's union holds 64-104 blocks at
    128K / 1024 on the benchmark's segments rows (median 76; 64-125 at 128K / 4096), and a CTA
    left alone on an SM runs faster than three together, so the whole pairs end spread out and the
    launch's end is decided by how finely its last pairs are cut. H200 (bench/NOTES.md, session
    38), a call's span against the model's layouts: this rule (393 whole pairs and the last 119 in
    8 shares at T = 1024, 1929 and 119 at T = 4096) -13.2 us at 128K / 1024, -10.1 at 128K / 4096,
    -8.6 at 32K / 4096, -2.9 at 16K / 4096, -11.0 at 64K / 1024 with m = 128 (unions of 129-153
    blocks) and -4.8 at 128K / 1024 on random rows; at 128K / 1024, 4 and 5 shares gained 3.0 and
    6.7 us where 8 gained 11.6. A simulation of the launch with the pairs' own union sizes ranks
    the share counts alike and puts 8 at its optimum (6, 10 and 16 shares 1-5% later)."""
    if not UNION_FINE_TAIL_SPLITS or pairs < slots:
        return None
    tail = min(pairs, max(1, round(UNION_FINE_TAIL_PAIRS * slots)))
    whole = pairs - tail
    last_wave = whole / slots - whole // slots  # how full the whole pairs' last wave is
    if whole == 0 or (0 < last_wave < 0.75):
        return None
    return whole, 1, int(UNION_FINE_TAIL_SPLITS)


# a CTA's fixed cost in _union_makespan, in pairs' work (H200: ~9 us of ~200 per pair)
_UNION_CTA_COST = 0.05


def _union_makespan(pairs: int, layout, slots: int) -> float:
    """When a union launch over ``pairs`` pairs laid out as ``layout`` (_union_layout) ends, in
    pairs' work, if every pair is the same work, each CTA costs _UNION_CTA_COST more and starts on
    the slot that frees first (launch order). Slots are counted by end time (few distinct ones)."""
    head_pairs, head_splits, tail_splits = layout
    ends = {0.0: slots}
    for ctas, size in ((head_pairs * head_splits, 1.0 / head_splits + _UNION_CTA_COST),
                       ((pairs - head_pairs) * tail_splits, 1.0 / tail_splits + _UNION_CTA_COST)):
        while ctas > 0:
            t = min(ends)
            free = ends.pop(t)
            take = min(free, ctas)
            if free > take:
                ends[t] = free - take
            t2 = round(t + size, 9)
            ends[t2] = ends.get(t2, 0) + take
            ctas -= take
    return max(ends)


def _score_chunks(T, rows, ntiles, per_cta):
    """((row0, rows, grid, tiles per CTA), ...) of score launches over T query rows in chunks of
    ``rows``, ``per_cta`` rows per CTA, ``ntiles`` key tiles per row."""
    out = []
    for r0 in range(0, T, rows):
        nr = min(rows, T - r0)
        tpc = _tiles_per_cta(ntiles, nr // per_cta)
        out.append((r0, nr, (-(-ntiles // tpc), -(-nr // per_cta)), tpc))
    return tuple(out)


def _dense_plan(q, k, T, H, D, S, topk):
    """(name, smem, rows per chunk, ((row0, rows, grid, int arguments before the keys, after),
    ...)) of the dense score launches: row chunks whose [rows, S] ranking keys stay within
    DENSE_WORKSPACE_BYTES, and no longer than the filtered top-k takes (TOPK_FILTER_MAX_ROWS)
    where it takes rows of S keys: a longer chunk would send every row to list mode."""
    rows = max(1, min(T, DENSE_WORKSPACE_BYTES // (S * 4), MAX_ROWS_PER_LAUNCH))
    if DENSE_FILTER and rows > TOPK_FILTER_MAX_ROWS and _topk_filter(TOPK_FILTER_MAX_ROWS, S, topk, False):
        rows = TOPK_FILTER_MAX_ROWS
    name, smem, per_cta = _score_instance("dense.cu", "dense_score_kernel", q, k, H, D, True)
    launches = tuple((r0, nr, grid, (_i32(T), _i32(S), _i32(r0), _i32(nr)), (_i64(S), _i32(tpc)))
                     for r0, nr, grid, tpc in _score_chunks(T, rows, -(-S // SCORE_TILE), per_cta))
    return name, smem, rows, launches


# ----------------------------------------------------------------------------------------------
# stages

_POOL_PHYS = {"float32": np.float32, "bfloat16": np.uint16, "float8_e4m3fn": np.uint8}


def pool_keys(k, k_scale, *, block_size, pool_dtype, stream, out=None, out_scale=None):
    """Mean-pooled keys: returns (pooled [nb, D], pooled_scale [nb] float32 or None)."""
    with _on_stream(stream):
        return _pool_keys(k, k_scale, block_size, pool_dtype, out, out_scale)


def _pool_keys(k, k_scale, block_size, pool_dtype, out, out_scale, em=None):
    S, D = k.shape
    nb = -(-S // block_size)
    pooled = out if out is not None else _cupy().empty((nb, D), dtype=_POOL_PHYS[pool_dtype])
    pscale = None
    if pool_dtype == "float8_e4m3fn":
        pscale = out_scale if out_scale is not None else _cupy().empty((nb,), dtype=np.float32)
    if nb == 0:
        return pooled, pscale
    key = ("pool", k.dtype, pool_dtype, S, D, block_size, POOL_BATCH, _pool_vec(k, D), POOL_FIXED)
    plan = _plans.get(key)
    if plan is None:
        plan = _keep_plan(key, _pool_plan(k, pool_dtype, S, D, block_size))
    name, grid, block, ints = plan
    em = em or _DIRECT
    ptr = em.ptr
    em.launch(_kernel("pool.cu", name, 0), grid, block, (ptr(k), ptr(k_scale)) + ints + (ptr(pooled), ptr(pscale)))
    return pooled, pscale


def select_blocks(q, pooled, weights, pooled_scale, ks, ke, *, seq_len, block_size, block_topk, out,
                  stream):
    """Block scores + eligibility + forced blocks + top-m: ``out`` [T, m] block ids ascending, -1 padded."""
    T, H, D = q.shape
    check_supported(H, D, ("q", q), ("pooled", pooled))
    with _on_stream(stream):
        return _select_blocks(q, pooled, weights, pooled_scale, ks, ke, seq_len, block_size, block_topk, out,
                              workspace(stream), _plan_context())


def _plan_context():
    """What every plan key ends with: the current device and the knobs."""
    return _device_id(), _knobs()


def _select_blocks(q, pooled, weights, pooled_scale, ks, ke, seq_len, block_size, block_topk, out, ws, ctx,
                   em=None, unions=None, grouped=False, early=False, epoch=None):
    """``unions`` (with the block top-m in warp mode, _pair_records): also each pair of rows' union
    of blocks, as the union kernel reads it (``grouped``: in its SPLIT_ROWS order); ``early``: the
    warp-mode block top-m triggers the launch after it at its start (_refine_plan's `early`);
    ``epoch`` (a uint32 array of one, with the block top-m in warp mode): advanced once per launch
    for the union kernel's ready flags (_union_ready)."""
    em = em or _DIRECT
    T, H, D = q.shape
    nb = pooled.shape[0]
    if T == 0:
        return out
    if nb == 0:
        em.fill(out, -1)
        return out
    keys = ws.get("block_keys", (T, nb), np.uint32)
    key = ("blocks", T, H, D, nb, seq_len, block_size, q.dtype, pooled.dtype, ctx)
    plan = _plans.get(key)
    if plan is None:
        plan = _keep_plan(key, _blocks_plan(q, pooled, T, H, D, nb, seq_len, block_size))
    name, smem, launches = plan
    fn = _kernel("block_select.cu", name, smem)
    ptr = em.ptr
    ptrs = (ptr(q), ptr(pooled), ptr(weights), ptr(pooled_scale), ptr(ks), ptr(ke))
    for grid, head, offset, tail in launches:
        em.launch(fn, grid, (SCORE_THREADS,), ptrs + head + (ptr(keys, offset),) + tail, smem)
    _launch_select("block_select.cu", "block_topm_kernel", rows=T, keys=keys, ld=nb, ncols=nb,
                   k=block_topk, T=T, S=seq_len, out_idx=out, out_ld=block_topk, em=em,
                   extra=(unions, int(grouped), int(early), epoch) if _block_topm_warp(nb) else ())
    return out


def refine(q, k, weights, k_scale, blocks, ks, ke, *, block_size, topk, index_base, order, out, stream,
           blocks_from_select=False):
    """Candidate scoring of the selected blocks + exact top-k + index translation into ``out``.

    Rows are processed in chunks whose candidate keys stay within REFINE_WORKSPACE_BYTES.
    ``blocks_from_select``: the blocks are select_blocks' output (strictly ascending, -1 padded),
    so pairs of rows may be scored over the union of their blocks (refine_union_wgmma_kernel).
    """
    T, H, D = q.shape
    check_supported(H, D, ("q", q), ("k", k))
    with _on_stream(stream):
        return _refine(q, k, weights, k_scale, blocks, ks, ke, block_size, topk, index_base, order, out, stream,
                       blocks_from_select, workspace(stream), _plan_context())


def _refine(q, k, weights, k_scale, blocks, ks, ke, block_size, topk, index_base, order, out, stream,
            blocks_from_select, ws, ctx, em=None, unions=None, plan=None, ready=None):
    """``unions``: the pairs' records written by the block top-m (_pair_records), which the union
    kernel then reads instead of merging each pair's two block lists itself; ``plan``: this call's
    _refine_plan_of where the caller has it already (hisa_select); ``ready``: the union launches'
    ready flags after the epoch the block top-m advanced (_union_ready: uint32, the epoch first,
    then one flag per union CTA of every launch in turn)."""
    em = em or _DIRECT
    T, H, D = q.shape
    S = k.shape[0]
    m = blocks.shape[1]
    if T == 0:
        return out
    if S == 0 or m * block_size == 0:
        em.fill(out, -1)
        return out
    plan = plan or _refine_plan_of(q, k, T, H, D, S, m, block_size, blocks_from_select, ctx)
    name, smem, n, chunk, launches, grouped, _, _ = plan
    fn = _kernel("refine.cu", name, smem)
    keys = ws.get("cand_keys", (chunk, n), np.uint32)
    ptr = em.ptr
    ptrs = (ptr(q), ptr(k), ptr(weights), ptr(k_scale), ptr(ks), ptr(ke), ptr(blocks))
    kp = (ptr(keys),)
    after = (ptr(unions),) if grouped is not None else ()  # the union kernel's records, before its layout
    relative, by_score = index_base == "relative", order == "score"
    flag0 = 1  # the first flag of this launch in `ready`
    for r0, nr, grid, head, tail, layout in launches:
        # the union kernel's ready flags and epoch (null where ready is None)
        flags = (ptr(ready, 4 * flag0), ptr(ready)) if ready is not None else (ptr(None), ptr(None))
        em.launch(fn, grid, (SCORE_THREADS,), ptrs + head + kp + tail + after + tuple(_i32(x) for x in layout)
                  + (flags if grouped is not None else ()), smem)
        select = dict(rows=nr, keys=keys, ld=n, ncols=n, k=topk, row0=r0, T=T, S=S, ks=ks, ke=ke, blocks=blocks,
                      m=m, B=block_size, relative=relative, by_score=by_score, out_idx=out, out_ld=topk,
                      out_off=r0 * topk * 4, em=em)
        if ready is not None:
            _launch_select("refine.cu", "refine_topk_ready_kernel", **select,
                           extra=((ready, 4 * flag0), ready) + layout)
            flag0 += grid[0]
        else:
            _launch_select("refine.cu", "refine_topk_kernel", **select)
    return out


def _union_ready(plan, nb: int, topk: int, order: str, ws):
    """hisa_select's ready flags (refine.cu, refine_topk_ready_regs_kernel): a zeroed uint32 array
    [1 + the union launches' CTAs] (the epoch, then each launch's flags in turn), or None where they
    do not apply: UNION_READY off, the refinement not on pairs or its first union launch of
    UNION_READY_MAX_WAVES waves or more, the block top-m (which advances the epoch) not in warp
    mode, or the refine top-k not in register mode."""
    if not (UNION_READY and plan is not None):
        return None
    _, _, n, _, launches, grouped, _, few_waves = plan
    if grouped is None or not few_waves or not _block_topm_warp(nb):
        return None
    # the refine top-k as _refine would launch it without the flags: register mode (not warp, not list)
    smem_optin = _device_facts(_device_id())["smem_optin"]
    if _select_form("refine_topk_kernel", True, n, topk, order == "score", smem_optin)[1] is None:
        return None
    if any(max(layout[1], layout[2]) > 32 for *_, layout in launches):
        return None  # the top-k waits on a pair's CTAs with one lane each
    return ws.get("union_ready", (1 + sum(grid[0] for _, _, grid, *_ in launches),), np.uint32, zeroed=True)


def hisa_select(q, k, weights, k_scale, ks, ke, *, block_size, block_topk, topk, pool_dtype, index_base,
                order, out, stream):
    """Pool + block selection + refinement (SPEC §5) into ``out`` [T, topk] int32."""
    T, H, D = q.shape
    check_supported(H, D, ("q", q), ("k", k))
    with _on_stream(stream):  # the stages below run inside it (no stream or support checks of their own)
        _hisa(q, k, weights, k_scale, ks, ke, block_size, block_topk, topk, pool_dtype, index_base, order, out,
              stream, _DIRECT)
    return out


def _hisa(q, k, weights, k_scale, ks, ke, block_size, block_topk, topk, pool_dtype, index_base, order, out, stream,
          em):
    T, H, D = q.shape
    S = k.shape[0]
    nb = -(-S // block_size)
    ws = workspace(stream)
    pooled = ws.get("pooled", (nb, D), _POOL_PHYS[pool_dtype])
    pscale = ws.get("pooled_scale", (nb,), np.float32) if pool_dtype == "float8_e4m3fn" else None
    _pool_keys(k, k_scale, block_size, pool_dtype, pooled, pscale, em)
    blocks = ws.get("blocks", (T, block_topk), np.int32)
    ctx = _plan_context()
    # the refinement's plan, asked once here (its pairs decide the block top-m's records); none for
    # an empty call, where _refine plans nothing
    plan = _refine_plan_of(q, k, T, H, D, S, block_topk, block_size, True, ctx) if T > 0 and S > 0 else None
    grouped, early = plan[5:7] if plan else (None, False)
    unions = None
    if _pair_records(nb, grouped):
        unions = ws.get("pair_unions", ((T + 1) // 2, PAIR_RECORD_HEAD + 6 * block_topk), np.int32)
    ready = _union_ready(plan, nb, topk, order, ws)
    _select_blocks(q, pooled, weights, pscale, ks, ke, S, block_size, block_topk, blocks, ws, ctx, em, unions,
                   bool(grouped), early, ready)
    _refine(q, k, weights, k_scale, blocks, ks, ke, block_size, topk, index_base, order, out, stream, True,
            ws, ctx, em, unions, plan, ready)


def dense_select(q, k, weights, k_scale, ks, ke, *, topk, index_base, order, out, stream):
    """Flat DSA selection (SPEC §4) in row chunks whose ranking-key workspace stays bounded."""
    T, H, D = q.shape
    check_supported(H, D, ("q", q), ("k", k))
    with _on_stream(stream):
        _dense(q, k, weights, k_scale, ks, ke, topk, index_base, order, out, stream, _DIRECT)
    return out


def _dense_threshold_plan(q, k, T, H, D, S, topk):
    """The launches of dense_select's threshold mode (DENSE_THRESHOLD), or None where it does not
    apply: (score name, smem, passes and sample score launches (_score_chunks), ns, workspace rows
    of the rescue, the sample rank, (grid, tiles per CTA) of the rescue's score launches). topk is
    at most a quarter of a list (2048): a row keeps about topk + 5 sqrt(topk *
    stride) keys (4608 at 2048), which must stay well below the list's 8192."""
    ns = S // DENSE_SAMPLE_STRIDE
    if not (DENSE_THRESHOLD and S >= DENSE_THRESHOLD_MIN_S and 0 < ns <= DENSE_SAMPLE_MAX
            and 0 < topk <= DENSE_APPEND_CAP // 4
            and _dt_code(k) == DT_E4M3 and _dt_code(q) == DT_E4M3):
        return None
    name, smem, per_cta = _score_instance("dense.cu", "dense_score_kernel", q, k, H, D, True)
    if per_cta != 2 or not name.startswith(f"dense_score_wgmma_kernel<{ENGINE_F16}, "):
        return None
    ntiles = -(-S // SCORE_TILE)
    rows = max(1, min(T, DENSE_WORKSPACE_BYTES // (DENSE_APPEND_CAP * 8), MAX_ROWS_PER_LAUNCH))
    passes = _score_chunks(T, rows, ntiles, per_cta)
    sample = _score_chunks(T, min(T, MAX_ROWS_PER_LAUNCH), -(-ns // SCORE_TILE), per_cta)
    ws_rows = max(2, min(T + T % 2, DENSE_WORKSPACE_BYTES // (S * 4), MAX_ROWS_PER_LAUNCH) // 2 * 2)  # whole pairs
    expect = topk / DENSE_SAMPLE_STRIDE  # samples among the top k, on average
    rank = DENSE_SAMPLE_RANK or max(16, math.ceil(expect + 5 * math.sqrt(expect)))
    tpc = _tiles_per_cta(ntiles, DENSE_RESCUE_SLOTS)  # about a wave for DENSE_RESCUE_SLOTS pairs
    rescue = ((-(-ntiles // tpc), DENSE_RESCUE_SLOTS), tpc)
    return name, smem, passes, sample, ns, ws_rows, rank, rescue


def _dense_threshold(plan, q, k, weights, k_scale, ks, ke, topk, relative, by_score, out, stream, em):
    """dense_select's threshold mode (dense.cu): the sample and its thresholds, the appending score
    launches, the select of the lists, then the rescue of the rows it marked."""
    name, smem, passes, sample, ns, ws_rows, rank, (rescue_grid, rescue_tpc) = plan
    T, H, D = q.shape
    S = k.shape[0]
    cap = DENSE_APPEND_CAP
    ws = workspace(stream)
    k_s = ws.get("dense_sample_k", (ns, D), np.uint8)
    kscale_s = ws.get("dense_sample_scale", (ns,), np.float32)
    ks_s = ws.get("dense_sample_ks", (T,), np.int32)
    ke_s = ws.get("dense_sample_ke", (T,), np.int32)
    keys_s = ws.get("dense_sample_keys", (T, ns), np.uint32)
    thr = ws.get("dense_thresholds", (T,), np.uint32)
    # one buffer for a pass's candidate lists (keys [rows, cap], then columns) and, once every pass is
    # ranked, the rescue's ranking keys [ws_rows, S]
    rows = passes[0][1]
    big = ws.get("dense_keys", (max(rows * cap * 8, ws_rows * S * 4),), np.uint8)
    count = ws.get("dense_cand_counts", (rows,), np.int32, zeroed=True)  # zero-kept: the select zeroes it
    ws.zero_stale(em, ("dense_cand_counts",))
    failed = ws.get("dense_failed_rows", (T,), np.int32)
    fail_count = ws.get("dense_fail_count", (1,), np.int32)
    fail_pairs = ws.get("dense_fail_pairs", (T,), np.int32)
    ptr = em.ptr
    try:
        em.launch(_kernel("dense.cu", "dense_sample_kernel", 0), (-(-max(ns * 32, T) // 256),), (256,),
                  (ptr(k), ptr(k_scale), ptr(ks), ptr(ke), _i32(T), _i32(S), _i32(DENSE_SAMPLE_STRIDE), _i32(ns),
                   ptr(k_s), ptr(kscale_s), ptr(ks_s), ptr(ke_s), ptr(fail_count)))
        fn = _kernel("dense.cu", name, smem)
        for r0, nr, grid, tpc in sample:
            em.launch(fn, grid, (SCORE_THREADS,), (ptr(q), ptr(k_s), ptr(weights), ptr(kscale_s), ptr(ks_s), ptr(ke_s),
                                                   _i32(T), _i32(ns), _i32(r0), _i32(nr), ptr(keys_s), _i64(ns),
                                                   _i32(tpc)), smem)
        per = 32 if ns <= 1024 else 64
        em.launch(_kernel("dense.cu", f"dense_sample_threshold_kernel<{per}>", 0), (-(-T // WARP_SELECT_ROWS),),
                  (32 * WARP_SELECT_ROWS,), (ptr(keys_s), _i64(ns), _i32(ns), _i32(T), _i32(rank), ptr(thr)))
        fn_app = _kernel("dense.cu", name.replace("dense_score_wgmma_kernel", "dense_score_append_wgmma_kernel"),
                         smem + APPEND_SMEM)
        common = dict(k=topk, T=T, S=S, ks=ks, ke=ke, relative=relative, by_score=by_score, out_idx=out, out_ld=topk,
                      em=em)
        for r0, nr, grid, tpc in passes:  # nr <= MAX_ROWS_PER_LAUNCH: one select launch, so `extra` is its rows'
            em.launch(fn_app, grid, (SCORE_THREADS,),
                      (ptr(q), ptr(k), ptr(weights), ptr(k_scale), ptr(ks), ptr(ke), _i32(T), _i32(S), _i32(r0),
                       _i32(nr), ptr(thr, r0 * 4), ptr(big), ptr(big, rows * cap * 4), ptr(count), _i32(cap),
                       _i32(tpc)), smem + APPEND_SMEM)
            _launch_select("dense.cu", "dense_select_unordered_kernel", rows=nr, ld=cap, ncols=cap, row0=r0,
                           out_off=r0 * topk * 4, extra=(big, (big, rows * cap * 4), count, cap, (thr, r0 * 4), failed,
                                                         fail_count, fail_pairs), **common)
    except BaseException:  # the appending kernel may have run without the select that zeroes the counts
        ws.stale.add("dense_cand_counts")
        raise
    # the rescue, per chunk of the key workspace (the lists' buffer): the failed pairs' rows scored
    # whole (with no failed pair every CTA returns at once) and ranked the usual way (the unmarked
    # rows' CTAs return at once)
    fn_res = _kernel("dense.cu", name.replace("dense_score_wgmma_kernel", "dense_score_rescue_wgmma_kernel"), smem)
    for r0 in range(0, T, ws_rows):
        nr = min(ws_rows, T - r0)
        em.launch(fn_res, rescue_grid, (SCORE_THREADS,),
                  (ptr(q), ptr(k), ptr(weights), ptr(k_scale), ptr(ks), ptr(ke), _i32(T), _i32(S), _i32(r0), _i32(nr),
                   ptr(big), _i64(S), _i32(rescue_tpc), ptr(fail_count), ptr(fail_pairs)), smem)
        _launch_select("dense.cu", "dense_rescue_kernel", rows=nr, keys=big, ld=S, ncols=S, row0=r0,
                       out_off=r0 * topk * 4, extra=(failed,), **common)


def _dense(q, k, weights, k_scale, ks, ke, topk, index_base, order, out, stream, em):
    T, H, D = q.shape
    S = k.shape[0]
    if T == 0:
        return
    if S == 0:
        em.fill(out, -1)
        return
    tkey = ("dense_threshold", T, H, D, S, topk, q.dtype, k.dtype, _plan_context())
    tplan = _plans.get(tkey, False)
    if tplan is False:
        tplan = _keep_plan(tkey, _dense_threshold_plan(q, k, T, H, D, S, topk))
    if tplan is not None:
        _dense_threshold(tplan, q, k, weights, k_scale, ks, ke, topk, index_base == "relative", order == "score",
                         out, stream, em)
        return
    key = ("dense", T, H, D, S, topk, q.dtype, k.dtype, _plan_context())
    plan = _plans.get(key)
    if plan is None:
        plan = _keep_plan(key, _dense_plan(q, k, T, H, D, S, topk))
    name, smem, rows, launches = plan
    keys = workspace(stream).get("dense_keys", (rows, S), np.uint32)
    fn = _kernel("dense.cu", name, smem)
    ptr = em.ptr
    ptrs = (ptr(q), ptr(k), ptr(weights), ptr(k_scale), ptr(ks), ptr(ke))
    kp = (ptr(keys),)
    relative, by_score = index_base == "relative", order == "score"
    for r0, nr, grid, head, tail in launches:
        em.launch(fn, grid, (SCORE_THREADS,), ptrs + head + kp + tail, smem)
        fplan = _topk_filter(nr, S, topk, False) if DENSE_FILTER else None
        if fplan is not None:  # long rows: the chunk's rows are rows 0.. of ks / ke from r0 on, of T - r0
            _filtered_top_k("dense.cu", fplan, rows=nr, keys=keys, ld=S, ncols=S, k=topk, T=T - r0, S=S, ks=ks,
                            ke=ke, ranged=True, range_off=r0 * 4, relative=relative, by_score=by_score, out_idx=out,
                            out_ld=topk, out_off=r0 * topk * 4, min_len=_filter_min_len(topk),
                            ws=workspace(stream), em=em)
            continue
        _launch_select("dense.cu", "dense_topk_kernel", rows=nr, keys=keys, ld=S, ncols=S, k=topk,
                       row0=r0, T=T, S=S, ks=ks, ke=ke, relative=relative, by_score=by_score,
                       out_idx=out, out_ld=topk, out_off=r0 * topk * 4, em=em)


def _nonempty(*arrays) -> bool:
    return all(a is None or a.size > 0 for a in arrays)


def bind_hisa_select(q, k, weights, k_scale, ks, ke, *, block_size, block_topk, topk, pool_dtype, index_base,
                     order, out, stream):
    """hisa_select's launches for calls like this one, bound (_Bound; call it with the addresses of
    q, k, weights, k_scale, ks, ke, out), or None where a call of this kind is not only launches.

    Call it after hisa_select ran with the same arguments (which checked them and sized the
    workspace of ``stream``); it launches nothing and allocates nothing new then."""
    if not _nonempty(q, k, weights, k_scale, ks, ke, out):
        return None
    arrays = (q, k, weights, k_scale, ks, ke, out)
    return _bind(lambda em: _hisa(q, k, weights, k_scale, ks, ke, block_size, block_topk, topk, pool_dtype,
                                  index_base, order, out, stream, em), arrays, stream, (0, 1))


def bind_dense_select(q, k, weights, k_scale, ks, ke, *, topk, index_base, order, out, stream):
    """dense_select's launches bound, as :func:`bind_hisa_select` (same slots)."""
    if not _nonempty(q, k, weights, k_scale, ks, ke, out):
        return None
    arrays = (q, k, weights, k_scale, ks, ke, out)
    return _bind(lambda em: _dense(q, k, weights, k_scale, ks, ke, topk, index_base, order, out, stream, em),
                 arrays, stream, (0, 1))


def _topk_split(R: int, N: int, k: int, has_lengths: bool, sms: int) -> int:
    """Chunks per row for hisa_cupy.topk (1: one CTA per row). Few long rows leave most SMs idle
    with one CTA each, so each row is split into P chunks of N / P columns (one CTA each, at most
    one CTA per SM in all: a chunk CTA's cache or ring of its row takes most of an SM's shared
    memory) whose top k are then merged (topk.cu). Only without lengths (every
    chunk full, so no padding among the kept items), for N a multiple of 4P (aligned chunks) and
    chunks of at least max(4k, 8192) columns. TOPK_SPLIT > 1 forces that many chunks where N
    allows it; 1 turns the split off."""
    if TOPK_SPLIT == 1 or has_lengths:
        return 1
    if TOPK_SPLIT > 1:
        P = TOPK_SPLIT
        return P if N % (4 * P) == 0 and N // P >= k else 1
    best = 1
    for P in (2, 4, 8, 16):
        if R * P > sms or N % (4 * P) or N // P < max(4 * k, 8192):
            break
        best = P
    return best


#: columns per chunk of the filtered top-k and sampled keys per row (FILTER_CHUNK and
#: FILTER_SAMPLES in row_filter.cuh)
TOPK_FILTER_CHUNK = 8192
TOPK_FILTER_SAMPLES = 2048
#: most rows of one filtered top-k (its candidate workspace: 64 KiB per row)
TOPK_FILTER_MAX_ROWS = 1024


def _filter_min_len(k: int) -> int:
    """Shortest row the filtered top-k takes for k: at least 16 columns per candidate and four
    chunks (_topk_filter's bound on N, and dense_select's bound on each row's own range)."""
    return max(32 * k, 4 * TOPK_FILTER_CHUNK)


def _topk_filter(R: int, N: int, k: int, has_lengths: bool):
    """(P, n, expect) of the filtered top-k over rows of N columns (row_filter.cuh: a threshold
    from sampled keys, the columns at or above it in column order, the exact top k of those, rows
    where that cannot be exact redone whole), or None.

    P chunks of TOPK_FILTER_CHUNK columns per row, a list of n = REG_SELECT_ITEMS candidate slots
    per row (the register-mode select of step 2); expect: the candidates per row to aim at, 2.5k
    (room for the sample's error both ways: a row fails below k or above n), or more for small k
    (up to half the slots). The kernel takes the threshold at sample rank ks = expect * 2048 /
    (the row's length), which for a full row must be >= 32 (a threshold of sample rank ks is off
    by ~1/sqrt(ks)). Taken for rows without lengths, N >= max(32k, 32768) (at least 16 columns
    per candidate), at most TOPK_FILTER_MAX_ROWS rows (workspace: 64 KiB per row), k <= n / 4
    and ks >= 32 on a full row (N up to ~327680 for k = 2048)."""
    if has_lengths or k > REG_SELECT_ITEMS // 4 or R > TOPK_FILTER_MAX_ROWS:
        return None
    if N < _filter_min_len(k):
        return None
    P = -(-N // TOPK_FILTER_CHUNK)
    n = REG_SELECT_ITEMS
    half = TOPK_FILTER_SAMPLES * (n // 2) // N
    ks = max(1, -(-5 * k * TOPK_FILTER_SAMPLES // (2 * N)), min(64, half))
    if ks < 32:  # rows so long that the sample is too thin
        return None
    return P, n, -(-ks * N // TOPK_FILTER_SAMPLES)


def topk(scores, lengths, *, k, out_values, out_indices, stream):
    """Exact row top-k of fp32 ``scores`` [R, N] (SPEC §3 ranking), values and indices in rank order."""
    R, N = scores.shape
    with _on_stream(stream):
        if R == 0 or k == 0:
            return out_values, out_indices
        plan = _topk_filter(R, N, k, lengths is not None) if TOPK_FILTER else None
        if plan is not None:
            _filtered_top_k("topk.cu", plan, rows=R, scores=scores, ld=N, ncols=N, k=k, T=R, S=N, ranged=False,
                            by_score=True, out_idx=out_indices, out_ld=k, out_val=out_values, ws=workspace(stream))
            return out_values, out_indices
        P = _topk_split(R, N, k, lengths is not None, _device_facts(_device_id())["sms"])
        if P == 1:
            _launch_select("topk.cu", "topk_kernel", rows=R, scores=scores, ld=N, ncols=N, lengths=lengths, k=k,
                           T=R, S=N, by_score=True, out_idx=out_indices, out_ld=k, out_val=out_values)
            return out_values, out_indices
        # each chunk's top k in position order (row r, chunk c is row r * P + c of [R * P, N / P]),
        # then the top k of each row's P * k kept items
        ws = workspace(stream)
        kept_values = ws.get("topk_kept_values", (R * P, k), np.float32)
        kept_indices = ws.get("topk_kept_indices", (R * P, k), np.int32)
        C = N // P
        _launch_select("topk.cu", "topk_chunks_kernel", rows=R * P, scores=scores, ld=C, ncols=C, k=k, T=R * P,
                       S=N, m=P, B=C, out_idx=kept_indices, out_ld=k, out_val=kept_values)
        _launch_select("topk.cu", "topk_merge_kernel", rows=R, scores=kept_values, ld=P * k, ncols=P * k, k=k, T=R,
                       S=N, blocks=kept_indices, m=P * k, B=1, by_score=True, out_idx=out_indices, out_ld=k,
                       out_val=out_values)
    return out_values, out_indices


def _filtered_select_kernel(stem: str, rows: int, sms: int) -> str:
    """The filtered top-k's select launch (step 2 of row_filter.cuh) over ``rows`` rows:
    `<stem>_filtered_wide_kernel` (FILTER_WIDE_THREADS threads per row) where the rows fit one
    wave (FILTER_WIDE_SELECT, REG_SELECT), else `<stem>_filtered_kernel` (register or list mode by
    _launch_select's plan)."""
    if FILTER_WIDE_SELECT and REG_SELECT and rows <= sms:
        return f"{stem}_filtered_wide_kernel"
    return f"{stem}_filtered_kernel"


def _filtered_top_k(filename, plan, *, rows, keys=None, scores=None, ld, ncols, k, T, S, ks=None, ke=None,
                    ranged, range_off=0, relative=False, by_score, out_idx, out_ld, out_val=None, out_off=0,
                    min_len=0, ws, em=None):
    """The filtered top-k's three launches (row_filter.cuh) over ``rows`` rows of ``keys`` (u32
    ranking keys) or fp32 ``scores`` [rows, ld]: candidates above a sampled threshold, the top k of
    the rows whose candidates hold it, the other rows redone whole. ``plan``: (P, n, expect)
    from _topk_filter; the launches' row 0 is row 0 of ks / ke from ``range_off`` bytes on, of T rows
    (so a chunk of dense's rows passes T - r0); ``ranged``: columns [ks, ke) of each row, else all
    ``ncols``; rows shorter than ``min_len`` go straight to the rescue."""
    em = em or _DIRECT
    stem = filename[:-len(".cu")]
    P, n, expect = plan
    cand = ws.get("filter_cand_words", (rows, n), np.uint32)
    cand_idx = ws.get("filter_cand_indices", (rows, n), np.int32)
    # each row's chunk states and chunk counter: zero before every call (the select zeroes them;
    # after a call that stopped between its launches, the next call zeroes them first)
    states = ws.get("filter_chunk_states", (rows, P), np.uint32, zeroed=True)
    next_chunk = ws.get("filter_next_chunk", (rows,), np.int32, zeroed=True)
    failed = ws.get("filter_failed_rows", (rows,), np.int32)
    # CTAs per row: about two per SM in all (one wave), taking the row's chunks in order
    sms = _device_facts(_device_id())["sms"]
    per_row = min(P, -(-2 * sms // rows))
    per_row = -(-P // -(-P // per_row))  # as few as give the same number of rounds per CTA
    zero_kept = ("filter_chunk_states", "filter_next_chunk")
    ws.zero_stale(em, zero_kept)
    ptr = em.ptr
    common = dict(k=k, T=T, S=S, ks=ks, ke=ke, range_off=range_off, relative=relative, by_score=by_score,
                  out_idx=out_idx, out_ld=out_ld, out_val=out_val, out_off=out_off, em=em)
    try:
        em.launch(_kernel(filename, f"{stem}_filter_kernel", 0), (per_row, rows), (SELECT_THREADS,),
                  (ptr(keys), ptr(scores), _i64(ld), _i32(ncols), _i32(0), _i32(T), _i32(S), ptr(ks, range_off),
                   ptr(ke, range_off), _i32(int(ranged)), _i32(P), _i32(expect), _i32(n), _i32(min_len), ptr(cand),
                   ptr(cand_idx), ptr(states), ptr(next_chunk)))
        # a select of one CTA per row in one wave triggers the rescue's launch at its start (common.cuh,
        # grid_dependents_launch)
        early = int(rows <= sms)
        _launch_select(filename, _filtered_select_kernel(stem, rows, sms), rows=rows,
                       keys=cand if keys is not None else None, scores=cand if scores is not None else None,
                       ld=n, ncols=n, blocks=cand_idx, m=n, B=1,
                       extra=(states, P, n, next_chunk, failed, early), **common)
        _launch_select(filename, f"{stem}_rescue_kernel", rows=rows, keys=keys, scores=scores, ld=ld, ncols=ncols,
                       extra=(failed,), **common)
    except BaseException:  # the filter may have run without the select that zeroes its states
        ws.stale.update(zero_kept)
        raise
