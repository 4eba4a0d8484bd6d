"""Numba CUDA backend: the HISA stages written as readable Numba kernels (CUDA cores only).

This is the place to experiment with new stage variants (see docs/numba.md). It implements the
device backend contract of docs/internals.md with the same results as the CuPy backend and the
NumPy reference (SPEC.md): on SPEC §9 exact-arithmetic inputs the outputs are equal bit for bit.

Arrays are in *physical* dtypes: ``uint8`` = float8_e4m3fn bits, ``uint16`` = bfloat16 bits,
``float16``, ``float32``, ``int32``. On a GPU they are objects with ``__cuda_array_interface__``
(CuPy arrays, Numba device arrays, ...); under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) they
are NumPy arrays and the kernels run as Python, which is how CI tests them.

Kernel structure (every selection kernel works on one query row per thread block)
-------------------------------------------------------------------------------------
1. *Score*: each thread scores candidates ``c = tid, tid + THREADS, ...``. The row's queries
   ``q[t]`` are decoded to float32 once into shared memory (in head chunks when ``H * D`` is larger
   than ``Q_SHARED``); a score is ``scale * sum_h w[t, h] * relu(q[t, h] . key)`` accumulated in
   float32 (SPEC §2), and is stored as its ordered uint32 ranking key (docs/internals.md):
   ``0`` = not a candidate, ``1`` = NaN, ``0xFFFFFFFF`` = forced block, larger = better.
2. *Select*: an exact block-wide radix select over the keys (4 passes of 8 bits with a shared
   256-bin histogram) finds the k-th key ``thr`` and how many keys equal to ``thr`` are taken.
3. *Compact*: the candidates are scanned in index order (= position order) with a block-wide
   prefix sum; keys above ``thr`` and the first ``ties`` keys equal to ``thr`` are written to the
   selection list in ascending index order. Ties therefore go to the lower position (SPEC §3) and
   the result is deterministic without any sort.
4. *Write*: indices are translated (relative/absolute) and written in position order, or in
   score order, where each selected entry's rank is counted directly (score desc, index asc).

Ranking keys live in a global workspace ``[rows, N]``; rows are processed in chunks so that this
workspace stays below ``WORKSPACE_BYTES`` (no ``[T, S]`` buffer for long contexts).

Kernels are built per input dtype by small factories (``_token_kernels``, ``_pool_kernel``): the
dtype-specific decoder is a device function captured by the kernel, so there is no dtype branch
at run time. Numba compiles each kernel on first use (a few seconds) and caches it per process.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from types import SimpleNamespace

import numpy as np

from ._numba_compat import SIMULATOR, cuda, numba
from .cupy_backend import _on_stream

# Two decorators for device functions (identical on a GPU: ``cuda.jit(device=True)``):
#   @device        per-element arithmetic that never touches ``cuda.*`` (decoders, encoders,
#                  ranking keys, dot products). Under the simulator these are plain Python
#                  functions: the simulator's wrapper around a device-function call costs tens of
#                  microseconds, far more than the arithmetic inside.
#   @block_device  block-wide helpers that use ``cuda.threadIdx`` / ``cuda.syncthreads`` /
#                  shared memory. They keep the simulator's wrapper, which installs the simulated
#                  ``cuda`` module for the function's own module, so they also work when called
#                  from kernels defined in other modules (e.g. kernels/numba_variants.py).
# Casts: Numba's type objects are slow callables in the simulator, NumPy scalar types give the
# same float32 / int results there.
block_device = cuda.jit(device=True)
if SIMULATOR:
    float32, int32, int64 = np.float32, np.int32, np.int64

    def device(fn):
        return fn

else:
    float32, int32, int64 = numba.float32, numba.int32, numba.int64
    device = cuda.jit(device=True)

#: threads per block of every kernel (the simulator runs one Python thread per CUDA thread)
THREADS = 32 if SIMULATOR else 256
#: float32 slots of the shared buffer holding the decoded queries of one row (a chunk of
#: heads; the head dim D must fit). HISA_NUMBA_Q_SHARED overrides it: the simulator tests set a
#: tiny value so that the head-chunk loop runs several times.
Q_SHARED = int(os.environ.get("HISA_NUMBA_Q_SHARED", "8192"))
#: heads whose dot products share one decoded key element (per-thread registers)
HEAD_GROUP = 8
#: upper bound on the bytes of ranking keys + selection lists of one launch (rows are chunked)
WORKSPACE_BYTES = 256 << 20

#: block scans: groups of SCAN_GROUP threads, scanned serially by one thread each
SCAN_GROUP = min(16, THREADS)
SCAN_GROUPS = THREADS // SCAN_GROUP
SCAN_SIZE = THREADS + SCAN_GROUPS + 1

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS

KEY_NONE = 0  # not a candidate
KEY_NAN = 1  # NaN ranks below every number
KEY_FORCED = 0xFFFFFFFF  # first / last eligible block
SIGN_BIT = 0x80000000

F32_ZERO = np.float32(0.0)
F32_NAN = np.float32(np.nan)
F32_NEG_INF = np.float32(-np.inf)
FP8_MAX = np.float32(448.0)
FP8_MIN_SCALE = np.float32(1e-10)
FP8_SUBNORMAL_UNIT = np.float32(2.0 ** -9)  # value of e4m3 code 0x01
FP8_SUBNORMAL_INV = np.float32(512.0)
HALF = np.float32(0.5)

# candidate kinds of the generic row scorer
MODE_DENSE, MODE_REFINE, MODE_BLOCKS = 0, 1, 2
# pooled storage codes
POOL_F32, POOL_BF16, POOL_FP8 = 0, 1, 2
POOL_CODES = {"float32": POOL_F32, "bfloat16": POOL_BF16, "float8_e4m3fn": POOL_FP8}
POOL_PHYSICAL = {"float32": np.float32, "bfloat16": np.uint16, "float8_e4m3fn": np.uint8}


# =============================================================================================
# bit-level helpers: float32 <-> its 32 bits, fp8 e4m3fn / bf16 decode and encode
# =============================================================================================
if SIMULATOR:
    # The simulator runs kernels as Python: reinterpret with NumPy.
    @device
    def f32_bits(f):
        """The 32 bits of float32 ``f`` as a non-negative int64."""
        return np.int64(np.float32(f).view(np.uint32))

    @device
    def f32_from_bits(b):
        """The float32 whose bits are the low 32 bits of ``b``."""
        return np.uint32(int(b) & 0xFFFFFFFF).view(np.float32)

else:
    from numba.cuda import libdevice

    @device
    def f32_bits(f):
        """The 32 bits of float32 ``f`` as a non-negative int64."""
        return int64(libdevice.float_as_int(float32(f))) & 0xFFFFFFFF

    @device
    def f32_from_bits(b):
        """The float32 whose bits are the low 32 bits of ``b``."""
        return libdevice.int_as_float(int32(b & 0xFFFFFFFF))


@device
def decode_float(v):
    """float32 / float16 element -> float32 (exact)."""
    return float32(v)


@device
def decode_bf16(v):
    """bfloat16 bits (uint16) -> float32: the bf16 bits are the high half of the float32."""
    return f32_from_bits(int64(v) << 16)


@device
def decode_fp8(v):
    """float8_e4m3fn bits (uint8) -> float32 (exact).

    Layout: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 holds the
    subnormals ``m * 2**-9``; 0x7F / 0xFF are NaN; there is no infinity.
    """
    b = int64(v)
    e = (b >> 3) & 0xF
    m = b & 0x7
    if e == 0xF and m == 0x7:
        mag = F32_NAN
    elif e == 0:
        mag = float32(m) * FP8_SUBNORMAL_UNIT
    else:  # normal: re-bias the exponent (7 -> 127) and widen the mantissa (3 -> 23 bits)
        mag = f32_from_bits(((e + 120) << 23) | (m << 20))
    if b & 0x80:
        return -mag
    return mag


@device
def encode_bf16(f):
    """float32 -> bfloat16 bits (round to nearest even; NaN -> the quiet NaN 0x7FC0 with f's sign)."""
    u = f32_bits(f)
    if f != f:
        return ((u >> 16) & 0x8000) | 0x7FC0
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


@device
def encode_fp8(f):
    """float32 with ``|f| <= 448`` (or NaN) -> float8_e4m3fn bits (round to nearest even).

    NaN -> 0x7F with f's sign (ml_dtypes' choice). Larger magnitudes are not handled: callers
    clip to +-448 first (SPEC §5.2).
    """
    u = f32_bits(f)
    sign = (u >> 24) & 0x80
    if f != f:
        return sign | 0x7F
    a = u & 0x7FFFFFFF
    if a >= 0x3C800000:  # |f| >= 2**-6: normal e4m3, keep 3 of the 23 mantissa bits
        a = a + 0x7FFFF + ((a >> 20) & 1)
        return sign | ((a >> 20) - (120 << 3))
    # subnormal e4m3: a multiple of 2**-9; |f| * 512 is exact, round it half to even
    x = f32_from_bits(a) * FP8_SUBNORMAL_INV
    n = int64(math.floor(x))
    r = x - float32(n)
    if r > HALF or (r == HALF and (n & 1) == 1):
        n += 1
    return sign | n  # n == 8 is the smallest normal 2**-6, whose code is 0x08 as well


@device
def score_key(f):
    """Ordered ranking key of a float32 score: larger key = better (docs/internals.md).

    NaN -> 1 (below everything); -0.0 and +0.0 -> the same key; f >= 0 -> bits | 0x80000000;
    f < 0 -> ~bits. Key 0 is reserved for "not a candidate", 0xFFFFFFFF for forced blocks.
    """
    if f != f:
        return int64(KEY_NAN)
    if f == F32_ZERO:
        return int64(SIGN_BIT)
    b = f32_bits(f)
    if b >= SIGN_BIT:
        return (~b) & 0xFFFFFFFF
    return b | SIGN_BIT


# =============================================================================================
# block-wide building blocks (every thread of the block must call them)
# =============================================================================================
@device
def row_range(ks, has_ks, ke, has_ke, t, T, S):
    """Key range ``[lo, hi)`` of query row t: ks/ke or the causal default, clamped to [0, S]."""
    lo = int64(ks[t]) if has_ks else int64(0)
    hi = int64(ke[t]) if has_ke else int64(S - T + t + 1)
    lo = min(max(lo, 0), S)
    hi = min(max(hi, 0), S)
    return lo, hi


@block_device
def block_exclusive_scan(scan, v):
    """Exclusive prefix sum of one int ``v`` per thread, in shared ``scan`` (int32[SCAN_SIZE]).

    Two levels with four barriers: thread g < SCAN_GROUPS scans the SCAN_GROUP values of group g
    serially, thread 0 scans the group totals (kept after the THREADS per-thread slots).
    Returns ``(sum of v over threads with a lower index, sum over all threads)``.
    """
    tid = cuda.threadIdx.x
    scan[tid] = v
    cuda.syncthreads()
    if tid < SCAN_GROUPS:
        run = 0
        for i in range(tid * SCAN_GROUP, (tid + 1) * SCAN_GROUP):
            run += scan[i]
            scan[i] = run  # inclusive within the group
        scan[THREADS + tid] = run
    cuda.syncthreads()
    if tid == 0:
        run = 0
        for g in range(SCAN_GROUPS):
            x = scan[THREADS + g]
            scan[THREADS + g] = run  # exclusive over the groups
            run += x
        scan[THREADS + SCAN_GROUPS] = run
    cuda.syncthreads()
    inclusive = int64(scan[tid]) + int64(scan[THREADS + tid // SCAN_GROUP])
    total = int64(scan[THREADS + SCAN_GROUPS])
    cuda.syncthreads()
    return inclusive - v, total


@block_device
def select_threshold(keys, n, k, hist, state):
    """Exact radix select of the k-th largest non-zero key among ``keys[0:n]``.

    Returns ``(thr, ties, k_eff)``: ``k_eff = min(k, #candidates)`` entries are selected, namely
    every key ``> thr`` and the first ``ties`` keys ``== thr`` (in index order). When all
    candidates fit, ``thr = 0`` and ``ties = 0`` (take every non-zero key).
    ``state`` is a shared int64[4]: prefix, remaining, k_eff, done flag.
    """
    tid = cuda.threadIdx.x
    if tid == 0:
        state[0] = 0  # bits of thr found so far
        state[1] = k  # how many of the keys matching the prefix are still to take
        state[2] = 0  # k_eff
        state[3] = 0  # done
    for p in range(4):
        shift = 32 - RADIX_BITS * (p + 1)
        for i in range(tid, RADIX_BINS, THREADS):
            hist[i] = 0
        cuda.syncthreads()
        high = state[0] >> (shift + RADIX_BITS)  # the bits above this digit must match
        for c in range(tid, n, THREADS):
            key = int64(keys[c])
            if key != KEY_NONE and (key >> (shift + RADIX_BITS)) == high:
                cuda.atomic.add(hist, (key >> shift) & (RADIX_BINS - 1), 1)
        cuda.syncthreads()
        if tid == 0:
            remaining = state[1]
            if p == 0:
                total = 0
                for i in range(RADIX_BINS):
                    total += hist[i]
                if total <= remaining:  # everything is selected: no threshold needed
                    state[0] = 0
                    state[1] = 0
                    state[2] = total
                    state[3] = 1
                else:
                    state[2] = remaining
            if state[3] == 0:
                # walk the digits from the largest down until `remaining` keys are covered
                digit = RADIX_BINS - 1
                above = 0
                while digit > 0 and above + hist[digit] < remaining:
                    above += hist[digit]
                    digit -= 1
                state[0] = state[0] | (int64(digit) << shift)
                state[1] = remaining - above
        cuda.syncthreads()
        if state[3] != 0:
            break
    thr = state[0]
    ties = state[1]
    k_eff = state[2]
    cuda.syncthreads()
    return thr, ties, k_eff


@block_device
def compact_selection(keys, n, thr, ties, k_eff, sel, scan):
    """Write the selected candidate indices to ``sel[0:k_eff]`` in ascending index order.

    Selected: keys ``> thr`` and the first ``ties`` keys ``== thr`` (lower index wins ties).
    One block-wide scan per tile of THREADS candidates counts both kinds at once
    (greater-than in the low 16 bits, equal in the high bits).
    """
    tid = cuda.threadIdx.x
    written = int64(0)
    ties_left = int64(ties)
    base = int64(0)
    while base < n and written < k_eff:
        c = base + tid
        key = int64(keys[c]) if c < n else int64(KEY_NONE)
        gt = 1 if key > thr else 0
        eq = 1 if (thr != KEY_NONE and key == thr) else 0
        before, total = block_exclusive_scan(scan, gt + (eq << 16))
        gt_before = before & 0xFFFF
        eq_before = before >> 16
        if gt == 1 or (eq == 1 and eq_before < ties_left):
            slot = written + gt_before + min(eq_before, ties_left)
            if slot < k_eff:  # always true; guards memory against any inconsistency
                sel[slot] = c
        taken_eq = min(total >> 16, ties_left)
        written += (total & 0xFFFF) + taken_eq
        ties_left -= taken_eq
        base += THREADS
    cuda.syncthreads()


@device
def select_row(keys, n, k, sel, hist, scan, state):
    """Top-k of the ranking keys ``keys[0:n]``: ``sel[0:k_eff]`` ascending; returns k_eff."""
    thr, ties, k_eff = select_threshold(keys, n, k, hist, state)
    compact_selection(keys, n, thr, ties, k_eff, sel, scan)
    return k_eff


@device
def rank_in_selection(keys, sel, k_eff, i):
    """Rank of selected entry i under SPEC §3 (key desc, then index asc; ``sel`` is ascending)."""
    ki = int64(keys[sel[i]])
    r = 0
    for j in range(k_eff):
        kj = int64(keys[sel[j]])
        if kj > ki or (kj == ki and j < i):
            r += 1
    return r


# =============================================================================================
# scoring kernels, built per (query dtype, key dtype)
# =============================================================================================
DECODERS = {"f32": decode_float, "f16": decode_float, "bf16": decode_bf16, "fp8": decode_fp8}
_DTYPE_CODES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float16): "f16",
    np.dtype(np.uint16): "bf16",
    np.dtype(np.uint8): "fp8",
}


def dtype_code(arr) -> str:
    """Decoder name of a physical dtype (uint8 = e4m3 bits, uint16 = bf16 bits)."""
    try:
        return _DTYPE_CODES[np.dtype(arr.dtype)]
    except KeyError:
        raise TypeError(f"numba backend: unsupported array dtype {arr.dtype}; expected one of "
                        "uint8 (float8_e4m3fn bits), uint16 (bfloat16 bits), float16, float32") from None


def make_row_scorer(decode_q, decode_k):
    """Device function ``fill_keys`` that scores the candidates of one row into ranking keys.

    ``decode_q`` / ``decode_k`` turn one stored element into float32. The candidate kinds:

    * MODE_DENSE: candidate c is position ``lo + c`` (n = hi - lo).
    * MODE_REFINE: candidate c is position ``blk[c // B] * B + c % B`` of the row's sorted block
      list; positions outside ``[lo, hi)`` are not candidates.
    * MODE_BLOCKS: candidate c is block ``b0 + c`` of the n eligible blocks; the first and the
      last are forced (key 0xFFFFFFFF) and not scored.
    """

    @block_device
    def stage_q(q, t, h0, nh, qs):
        """Decode ``q[t, h0:h0+nh, :]`` into shared ``qs`` (float32, head-major)."""
        D = q.shape[2]
        for i in range(cuda.threadIdx.x, nh * D, THREADS):
            qs[i] = decode_q(q[t, h0 + i // D, i % D])

    @device
    def head_sum(acc, qs, w, t, h0, nh, keymat, s, dots):
        """``acc + sum_{h in chunk} w[t, h] * relu(q[t, h] . key[s])`` in float32.

        Heads go in groups of HEAD_GROUP: each key element is decoded once per group and feeds
        HEAD_GROUP dot products, kept in ``dots`` (a per-thread local array; the constant-trip
        inner loops let the compiler keep it in registers). Every dot product still sums over d
        in order and the heads are added in order, so the arithmetic is the plain loop's.
        """
        D = keymat.shape[1]
        for g0 in range(0, nh, HEAD_GROUP):
            for j in range(HEAD_GROUP):
                dots[j] = F32_ZERO
            for d in range(D):
                kv = decode_k(keymat[s, d])
                for j in range(HEAD_GROUP):
                    if g0 + j < nh:
                        dots[j] += qs[(g0 + j) * D + d] * kv
            for j in range(HEAD_GROUP):
                if g0 + j < nh:
                    dot = dots[j]
                    if dot < F32_ZERO:  # relu; NaN stays NaN (SPEC: NaN scores stay candidates)
                        dot = F32_ZERO
                    acc += w[t, h0 + g0 + j] * dot
        return acc

    @block_device
    def fill_keys(q, keymat, w, scale, has_scale, t, mode, n, lo, hi, b0, blk, B, keys, qs):
        tid = cuda.threadIdx.x
        dots = cuda.local.array(HEAD_GROUP, float32)
        H = q.shape[1]
        D = q.shape[2]
        heads_per_chunk = max(1, Q_SHARED // D)
        n_chunks = (H + heads_per_chunk - 1) // heads_per_chunk
        if n_chunks == 1:
            stage_q(q, t, 0, H, qs)
            cuda.syncthreads()
        base = int64(0)
        while base < n:  # one tile of THREADS candidates per iteration (uniform trip count)
            c = base + tid
            s = int64(-1)  # key row scored by this thread, -1 = none
            if c < n:
                if mode == MODE_DENSE:
                    s = lo + c
                elif mode == MODE_REFINE:
                    s = int64(blk[c // B]) * B + c % B
                    if s < lo or s >= hi:
                        s = -1
                elif c > 0 and c < n - 1:  # MODE_BLOCKS, interior block
                    s = b0 + c
            acc = F32_ZERO
            for ci in range(n_chunks):
                h0 = ci * heads_per_chunk
                nh = min(heads_per_chunk, H - h0)
                if n_chunks > 1:
                    cuda.syncthreads()
                    stage_q(q, t, h0, nh, qs)
                    cuda.syncthreads()
                if s >= 0:
                    acc = head_sum(acc, qs, w, t, h0, nh, keymat, s, dots)
            if c < n:
                if s >= 0:
                    if has_scale:
                        acc = scale[s] * acc
                    keys[c] = score_key(acc)
                elif mode == MODE_BLOCKS:
                    keys[c] = KEY_FORCED  # first or last eligible block
                else:
                    keys[c] = KEY_NONE
            base += THREADS
        cuda.syncthreads()

    return fill_keys


@functools.lru_cache(maxsize=None)
def _token_kernels(qcode: str, kcode: str):
    """The dense / refine / block-selection kernels for q of kind ``qcode``, keys of ``kcode``."""
    fill_keys = make_row_scorer(DECODERS[qcode], DECODERS[kcode])

    @cuda.jit
    def dense_kernel(q, k, w, k_scale, has_scale, ks, has_ks, ke, has_ke, topk, relative,
                     by_score, row0, out, ws_keys, ws_sel):
        """SPEC §4: row t keeps the best min(topk, hi - lo) positions of [lo, hi)."""
        qs = cuda.shared.array(Q_SHARED, float32)
        hist = cuda.shared.array(RADIX_BINS, int32)
        scan = cuda.shared.array(SCAN_SIZE, int32)
        state = cuda.shared.array(4, int64)
        r = cuda.blockIdx.x
        t = row0 + r
        tid = cuda.threadIdx.x
        T = q.shape[0]
        S = k.shape[0]
        lo, hi = row_range(ks, has_ks, ke, has_ke, t, T, S)
        n = max(hi - lo, 0)
        keys = ws_keys[r]
        sel = ws_sel[r]
        fill_keys(q, k, w, k_scale, has_scale, t, MODE_DENSE, n, lo, hi, 0, sel, 1, keys, qs)
        k_eff = select_row(keys, n, topk, sel, hist, scan, state)
        for i in range(tid, topk, THREADS):
            if i < k_eff:
                pos = lo + sel[i]
                dst = rank_in_selection(keys, sel, k_eff, i) if by_score else i
                out[t, dst] = pos - lo if relative else pos
            else:
                out[t, i] = -1

    @cuda.jit
    def refine_kernel(q, k, w, k_scale, has_scale, blocks, ks, has_ks, ke, has_ke, B, topk,
                      relative, by_score, row0, out, ws_keys, ws_sel, ws_blk):
        """SPEC §5.5-5.6: exact top-k of the positions of the row's selected blocks."""
        qs = cuda.shared.array(Q_SHARED, float32)
        hist = cuda.shared.array(RADIX_BINS, int32)
        scan = cuda.shared.array(SCAN_SIZE, int32)
        state = cuda.shared.array(4, int64)
        r = cuda.blockIdx.x
        t = row0 + r
        tid = cuda.threadIdx.x
        T = q.shape[0]
        S = k.shape[0]
        m = blocks.shape[1]
        nb = (S + B - 1) // B
        lo, hi = row_range(ks, has_ks, ke, has_ke, t, T, S)
        blk = ws_blk[r]
        if tid == 0:
            # Sorted list of the distinct valid block ids that intersect [lo, hi): insertion
            # sort, linear for the ascending lists that select_blocks produces. Sorting makes
            # candidate order = position order, which the tie rule and compaction rely on.
            nblk = 0
            for j in range(m):
                b = int64(blocks[t, j])
                if b < 0 or b >= nb or b * B >= hi or (b + 1) * B <= lo:
                    continue
                i = nblk
                while i > 0 and blk[i - 1] > b:
                    i -= 1
                if i > 0 and blk[i - 1] == b:
                    continue  # duplicate id: its positions count once
                for j2 in range(nblk, i, -1):
                    blk[j2] = blk[j2 - 1]
                blk[i] = b
                nblk += 1
            state[0] = nblk
        cuda.syncthreads()
        n = state[0] * B
        cuda.syncthreads()
        keys = ws_keys[r]
        sel = ws_sel[r]
        fill_keys(q, k, w, k_scale, has_scale, t, MODE_REFINE, n, lo, hi, 0, blk, B, keys, qs)
        k_eff = select_row(keys, n, topk, sel, hist, scan, state)
        for i in range(tid, topk, THREADS):
            if i < k_eff:
                c = sel[i]
                pos = int64(blk[c // B]) * B + c % B
                dst = rank_in_selection(keys, sel, k_eff, i) if by_score else i
                out[t, dst] = pos - lo if relative else pos
            else:
                out[t, i] = -1

    @cuda.jit
    def blocks_kernel(q, pooled, w, pooled_scale, has_scale, ks, has_ks, ke, has_ke, seq_len, B,
                      row0, out, ws_keys, ws_sel):
        """SPEC §5.4: eligible blocks, forced first/last, best m - 2 others; ids ascending."""
        qs = cuda.shared.array(Q_SHARED, float32)
        hist = cuda.shared.array(RADIX_BINS, int32)
        scan = cuda.shared.array(SCAN_SIZE, int32)
        state = cuda.shared.array(4, int64)
        r = cuda.blockIdx.x
        t = row0 + r
        tid = cuda.threadIdx.x
        T = q.shape[0]
        nb = pooled.shape[0]
        m = out.shape[1]
        lo, hi = row_range(ks, has_ks, ke, has_ke, t, T, seq_len)
        b0 = lo // B
        b1 = min((hi - 1) // B, nb - 1)
        n = b1 - b0 + 1 if hi > lo else 0
        n = max(n, 0)
        if n <= m:  # at most m eligible blocks: all are selected, no scoring needed
            for i in range(tid, m, THREADS):
                out[t, i] = b0 + i if i < n else -1
            return
        keys = ws_keys[r]
        sel = ws_sel[r]
        fill_keys(q, pooled, w, pooled_scale, has_scale, t, MODE_BLOCKS, n, lo, hi, b0, sel, B,
                  keys, qs)
        k_eff = select_row(keys, n, m, sel, hist, scan, state)
        for i in range(tid, m, THREADS):
            out[t, i] = b0 + sel[i] if i < k_eff else -1

    return SimpleNamespace(dense=dense_kernel, refine=refine_kernel, blocks=blocks_kernel)


@functools.lru_cache(maxsize=None)
def _pool_kernel(kcode: str, pool_code: int):
    """Mean-pooling kernel for keys of kind ``kcode`` stored as ``pool_code``."""
    decode_k = DECODERS[kcode]

    @device
    def block_mean(k, k_scale, has_scale, s0, cnt, d):
        """Mean of the dequantised ``k[s0:s0+cnt, d] * k_scale`` in float32, in token order."""
        acc = F32_ZERO
        for j in range(cnt):
            v = decode_k(k[s0 + j, d])
            if has_scale:
                v = v * k_scale[s0 + j]
            acc += v
        return acc / float32(cnt)

    @cuda.jit
    def pool_kernel(k, k_scale, has_scale, B, pooled, pooled_scale):
        """SPEC §5.2: block b of B keys -> mean (float32 / bf16 / fp8 with per-block scale)."""
        red = cuda.shared.array(THREADS, float32)
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        S = k.shape[0]
        D = k.shape[1]
        s0 = int64(b) * B
        cnt = min(int64(B), S - s0)
        amax = F32_ZERO
        for d in range(tid, D, THREADS):
            mean = block_mean(k, k_scale, has_scale, s0, cnt, d)
            if pool_code == POOL_F32:
                pooled[b, d] = mean
            elif pool_code == POOL_BF16:
                pooled[b, d] = encode_bf16(mean)
            else:
                a = abs(mean)
                if a > amax or a != a:  # max that propagates NaN, like np.max
                    amax = a
        if pool_code == POOL_FP8:
            # block-wide amax, then scale = max(amax / 448, 1e-10) and one more pass to encode
            red[tid] = amax
            cuda.syncthreads()
            half = THREADS // 2
            while half > 0:
                if tid < half:
                    o = red[tid + half]
                    if o > red[tid] or o != o:
                        red[tid] = o
                cuda.syncthreads()
                half //= 2
            scale = red[0] / FP8_MAX
            if scale < FP8_MIN_SCALE:  # NaN stays NaN (np.maximum)
                scale = FP8_MIN_SCALE
            if tid == 0:
                pooled_scale[b] = scale
            for d in range(tid, D, THREADS):
                v = block_mean(k, k_scale, has_scale, s0, cnt, d) / scale
                if v > FP8_MAX:
                    v = FP8_MAX
                elif v < -FP8_MAX:
                    v = -FP8_MAX
                pooled[b, d] = encode_fp8(v)

    return pool_kernel


@cuda.jit
def topk_kernel(scores, lengths, has_lengths, k, row0, out_values, out_indices, ws_keys, ws_sel):
    """Exact row top-k of float32 scores over ``[0, lengths[r])`` in SPEC §3 rank order."""
    hist = cuda.shared.array(RADIX_BINS, int32)
    scan = cuda.shared.array(SCAN_SIZE, int32)
    state = cuda.shared.array(4, int64)
    r = cuda.blockIdx.x
    row = row0 + r
    tid = cuda.threadIdx.x
    N = scores.shape[1]
    n = min(max(int64(lengths[row]), 0), N) if has_lengths else int64(N)
    keys = ws_keys[r]
    sel = ws_sel[r]
    for c in range(tid, n, THREADS):
        keys[c] = score_key(scores[row, c])
    cuda.syncthreads()
    k_eff = select_row(keys, n, k, sel, hist, scan, state)
    for i in range(tid, k, THREADS):
        if i < k_eff:
            c = sel[i]
            dst = rank_in_selection(keys, sel, k_eff, i)
            out_indices[row, dst] = c
            out_values[row, dst] = scores[row, c]
        else:
            out_indices[row, i] = -1
            out_values[row, i] = F32_NEG_INF


# =============================================================================================
# host side: array handling, workspace, launches
# =============================================================================================
def _is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


class _Call:
    """Per-call launch context: the stream, how arrays are wrapped, allocated and returned.

    * simulator: NumPy arrays in, NumPy arrays out, launches run synchronously as Python.
    * GPU with CuPy arrays: allocations come from CuPy's pool on ``stream`` (stream-ordered reuse)
      and results are CuPy arrays; kernels get zero-copy Numba views (no synchronisation).
    * GPU with other ``__cuda_array_interface__`` objects: Numba device arrays are allocated.
    """

    def __init__(self, stream, like):
        self.cupy = None
        self.stream = 0
        if SIMULATOR:
            return
        if stream:
            self.stream = cuda.external_stream(int(stream))
        if _is_cupy(like):
            import cupy

            self.cupy = cupy
        self._stream_handle = int(stream or 0)

    def _cupy_stream(self):
        """Make ``stream`` CuPy's current stream, so its pool orders our buffers on it (the CuPy
        backend's context: a no-op when it already is, stream objects made once per handle)."""
        return _on_stream(self._stream_handle)

    def empty(self, shape, dtype):
        shape = tuple(int(x) for x in shape)
        if SIMULATOR:
            return np.empty(shape, dtype=dtype)
        if self.cupy is not None:
            with self._cupy_stream():
                return self.cupy.empty(shape, dtype=dtype)
        return cuda.device_array(shape, dtype=dtype, stream=self.stream)

    def arg(self, x, dtype=None):
        """Kernel argument for array ``x`` (a 1-element dummy of ``dtype`` for None)."""
        if x is None:
            x = self.empty((1,), dtype)
        if SIMULATOR:
            return np.asarray(x)
        if isinstance(x, cuda.cudadrv.devicearray.DeviceNDArray):  # already a Numba array
            return x
        # zero-copy view; sync=False: the producer's stream is not synchronised (no host sync)
        return cuda.as_cuda_array(x, sync=False)

    def work(self, shape, dtype):
        """Scratch buffer as a kernel argument (stream-ordered, freed when the call returns)."""
        return self.arg(self.empty(shape, dtype))

    def launch(self, kernel, grid, *args):
        if grid <= 0:
            return
        with warnings.catch_warnings():
            # one block per query row: small T (decode) gives small grids on purpose
            warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU")
            kernel[int(grid), THREADS, self.stream](*args)


def _rows_per_launch(T: int, row_bytes: int) -> int:
    return max(1, min(T, WORKSPACE_BYTES // max(1, row_bytes)))


def _check_dims(D: int) -> None:
    """One head of decoded queries must fit the shared buffer (Q_SHARED floats)."""
    if not 1 <= D <= Q_SHARED:
        raise ValueError(f"argument 'q': numba backend supports a head dim D in [1, {Q_SHARED}], got {D}")


def _range_args(call, ks, ke):
    return (call.arg(ks, np.int32), ks is not None, call.arg(ke, np.int32), ke is not None)


def _launch_rows(call, kern, nrows, head, outs, work):
    """Launch ``kern`` over ``nrows`` rows in chunks whose scratch stays within the workspace budget.

    Arguments per launch: ``*head, r0, *outs`` and one ``[rows, width]`` scratch buffer per
    ``(width, dtype)`` of ``work``.
    """
    per_row = sum(int(w) * np.dtype(dt).itemsize for w, dt in work)
    rows = _rows_per_launch(nrows, per_row)
    bufs = [call.work((rows, int(w)), dt) for w, dt in work]
    for r0 in range(0, nrows, rows):
        call.launch(kern, min(rows, nrows - r0), *head, r0, *outs, *bufs)


def pool_keys(k, k_scale, *, block_size, pool_dtype, stream=0, out=None, out_scale=None):
    """Mean-pooled keys (SPEC §5.2): ``(pooled [nb, D], pooled_scale [nb] float32 or None)``."""
    call = _Call(stream, k)
    S, D = k.shape
    B = int(block_size)
    nb = -(-S // B)
    pooled = out if out is not None else call.empty((nb, D), POOL_PHYSICAL[pool_dtype])
    pscale = None
    if pool_dtype == "float8_e4m3fn":
        pscale = out_scale if out_scale is not None else call.empty((nb,), np.float32)
    if nb == 0 or D == 0:
        return pooled, pscale
    kernel = _pool_kernel(dtype_code(k), POOL_CODES[pool_dtype])
    call.launch(kernel, nb, call.arg(k), call.arg(k_scale, np.float32), k_scale is not None, B,
                call.arg(pooled), call.arg(pscale, np.float32))
    return pooled, pscale


def select_blocks(q, pooled, weights, pooled_scale, ks, ke, *, seq_len, block_size, block_topk,
                  out=None, stream=0):
    """Block scores + eligibility + forced blocks + top-m: ``out [T, m]`` ascending ids, -1."""
    call = _Call(stream, q)
    T, H, D = q.shape
    _check_dims(D)
    nb = pooled.shape[0]
    m = int(block_topk)
    if out is None:
        out = call.empty((T, m), np.int32)
    if T == 0 or m == 0:
        return out
    kern = _token_kernels(dtype_code(q), dtype_code(pooled)).blocks
    head = (call.arg(q), call.arg(pooled), call.arg(weights), call.arg(pooled_scale, np.float32),
            pooled_scale is not None, *_range_args(call, ks, ke), int(seq_len), int(block_size))
    _launch_rows(call, kern, T, head, (call.arg(out),), [(max(1, nb), np.uint32), (max(m, 1), np.int32)])
    return out


def refine(q, k, weights, k_scale, blocks, ks, ke, *, block_size, topk, index_base, order,
           out=None, stream=0):
    """Candidate scoring of the selected blocks + exact top-k + index translation."""
    call = _Call(stream, q)
    T, H, D = q.shape
    _check_dims(D)
    m = blocks.shape[1]
    B = int(block_size)
    topk = int(topk)
    if out is None:
        out = call.empty((T, topk), np.int32)
    if T == 0 or topk == 0:
        return out
    kern = _token_kernels(dtype_code(q), dtype_code(k)).refine
    head = (call.arg(q), call.arg(k), call.arg(weights), call.arg(k_scale, np.float32), k_scale is not None,
            call.arg(blocks), *_range_args(call, ks, ke), B, topk, index_base == "relative", order == "score")
    _launch_rows(call, kern, T, head, (call.arg(out),),
                 [(max(1, m * B), np.uint32), (max(1, topk), np.int32), (max(1, m), np.int32)])
    return out


def dense_select(q, k, weights, k_scale, ks, ke, *, topk, index_base, order, out=None, stream=0):
    """Flat DSA selection (SPEC §4), rows in chunks so the key workspace stays bounded."""
    call = _Call(stream, q)
    T, H, D = q.shape
    _check_dims(D)
    S = k.shape[0]
    topk = int(topk)
    if out is None:
        out = call.empty((T, topk), np.int32)
    if T == 0 or topk == 0:
        return out
    kern = _token_kernels(dtype_code(q), dtype_code(k)).dense
    head = (call.arg(q), call.arg(k), call.arg(weights), call.arg(k_scale, np.float32), k_scale is not None,
            *_range_args(call, ks, ke), topk, index_base == "relative", order == "score")
    _launch_rows(call, kern, T, head, (call.arg(out),), [(max(1, S), np.uint32), (topk, np.int32)])
    return out


def hisa_select(q, k, weights, k_scale, ks, ke, *, block_size, block_topk, topk, pool_dtype,
                index_base, order, out=None, stream=0):
    """SPEC §5: pool -> select blocks -> refine, three launches on ``stream``."""
    call = _Call(stream, q)
    T = q.shape[0]
    S = k.shape[0]
    pooled, pscale = pool_keys(k, k_scale, block_size=block_size, pool_dtype=pool_dtype,
                               stream=stream)
    blocks = call.empty((T, int(block_topk)), np.int32)
    select_blocks(q, pooled, weights, pscale, ks, ke, seq_len=S, block_size=block_size,
                  block_topk=block_topk, out=blocks, stream=stream)
    return refine(q, k, weights, k_scale, blocks, ks, ke, block_size=block_size, topk=topk,
                  index_base=index_base, order=order, out=out, stream=stream)


def topk(scores, lengths, *, k, out_values=None, out_indices=None, stream=0):
    """Exact row top-k of float32 ``scores [R, N]``: values and indices in SPEC §3 rank order."""
    call = _Call(stream, scores)
    R, N = scores.shape
    k = int(k)
    if out_values is None:
        out_values = call.empty((R, k), np.float32)
    if out_indices is None:
        out_indices = call.empty((R, k), np.int32)
    if R == 0 or k == 0:
        return out_values, out_indices
    head = (call.arg(scores), call.arg(lengths, np.int32), lengths is not None, k)
    _launch_rows(call, topk_kernel, R, head, (call.arg(out_values), call.arg(out_indices)),
                 [(max(1, N), np.uint32), (k, np.int32)])
    return out_values, out_indices
