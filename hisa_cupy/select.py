"""Public API: HISA / dense / block-sparse selection, the stage functions and the exact row top-k.

Every function accepts NumPy, PyTorch, JAX or CuPy arrays (any DLPack producer), validates its
arguments (SPEC §8: ``TypeError`` for dtypes, ``ValueError`` for shapes, devices, layouts and
parameter values, each naming the argument), picks a backend, and returns the caller's array
type on the caller's device. Device work is queued on the caller's CUDA stream (torch: the
current stream; CuPy: the current stream) and, with ``validate=False``, nothing synchronises the
host, so calls can be captured in a CUDA graph.

Shapes and dtypes used throughout (docs/semantics.md has the full semantics):

=========  ==============  =============================================================
name       shape           dtype
=========  ==============  =============================================================
q          [T, H, D]       float8_e4m3fn (or uint8 + ``dtype=``), bfloat16, float16, float32
k          [S, D]          same dtype as ``q``
weights    [T, H]          float32 (already holding any q scale and softmax scale)
k_scale    [S]             float32, finite and > 0; None means 1
ks, ke     [T]             int32; query t sees keys [ks[t], ke[t]); None: the T queries are
                           the last T positions of one causal sequence (ks=0, ke=S-T+t+1)
result     [T, topk]       int32 positions (minus ks unless index_base="absolute"), ascending
                           (or by score with order="score"), then -1 padding
=========  ==============  =============================================================

``backend``: "cupy" (CUDA kernels), "numba" (Numba CUDA kernels; the CUDA simulator on a CPU when
``NUMBA_ENABLE_CUDASIM=1``), "numpy" (the normative reference), or "auto" (cupy for device
arrays, numpy for host arrays). A backend living elsewhere than the inputs gets a copy, and the
result comes back where the inputs were.

Repeated ``validate=False`` calls of :func:`hisa_select` / :func:`dense_select` with torch CUDA
tensors are served from a call cache ("the call cache" below): the first call of a signature
(shapes, dtypes, layouts, device, stream, parameters) takes the full path and records the
backend's bound launches; equal later calls only read the array addresses, allocate the result
and launch (as one CUDA graph: ``cupy_backend.CALL_GRAPHS``). ``FAST_PATH = False`` sends every
call down the full path.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from . import _validation as v
from . import reference



_modules: dict = {}  # lazily imported: adapters and the backends (an import statement per use costs)


def _adapters():
    ad = _modules.get("adapters")
    if ad is None:
        from hisa_cupy import adapters as ad

        _modules["adapters"] = ad
    return ad


def _backend_module(name: str):
    mod = _modules.get(name)
    if mod is None:
        if name == "cupy":
            from hisa_cupy.kernels import cupy_backend as mod
        else:
            from hisa_cupy.kernels import numba_backend as mod
        _modules[name] = mod
    return mod


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


class _Inputs:
    """Imported and checked q / k / weights / k_scale / ks / ke (adapters.Tensor each)."""

    def __init__(self, q, k, weights, k_scale, ks, ke, dtype, *, k_name="k", k_ndim_meaning="[S, D]"):
        ad = _adapters()
        self.q = ad.import_array(q, name="q", dtype=dtype)
        v.dtype_in(self.q, "q", v.INPUT_DTYPES)
        v.ndim_is(self.q, "q", 3, "[T, H, D]")
        T, H, D = self.q.shape
        self.T, self.H, self.D = int(T), int(H), int(D)
        self.k = None
        if k is not None:
            self.k = ad.import_array(k, name=k_name, dtype=dtype)
            v.dtype_in(self.k, k_name, v.INPUT_DTYPES)
            if self.k.dtype != self.q.dtype:
                raise TypeError(f"argument {k_name!r}: expected dtype {self.q.dtype} (the dtype of 'q'), "
                                f"got {self.k.dtype}")
            v.ndim_is(self.k, k_name, 2, k_ndim_meaning)
            if int(self.k.shape[1]) != self.D:
                raise ValueError(f"argument {k_name!r}: expected shape (S, {self.D}) (D of 'q'), "
                                 f"got {tuple(self.k.shape)}")
        self.S = int(self.k.shape[0]) if self.k is not None else None
        self.weights = ad.import_array(weights, name="weights")
        v.dtype_in(self.weights, "weights", ("float32",))
        v.shape_is(self.weights, "weights", (self.T, self.H), "[T, H] of 'q'")
        self.k_scale = None
        if k_scale is not None:
            self.k_scale = ad.import_array(k_scale, name="k_scale")
            v.dtype_in(self.k_scale, "k_scale", ("float32",))
            v.shape_is(self.k_scale, "k_scale", (self.S,), "[S] of 'k'")
        if (ks is None) != (ke is None):
            raise ValueError("arguments 'ks' and 'ke': expected both or neither, got only "
                             f"{'ks' if ke is None else 'ke'}")
        self.ks = self.ke = None
        if ks is not None:
            self.ks = ad.import_array(ks, name="ks")
            self.ke = ad.import_array(ke, name="ke")
            for name, t in (("ks", self.ks), ("ke", self.ke)):
                v.dtype_in(t, name, ("int32",))
                v.shape_is(t, name, (self.T,), "[T] of 'q'")

    def tensors(self):
        return [self.q, self.k, self.weights, self.k_scale, self.ks, self.ke]


class _Exec:
    """Where a call runs (host or device), its stream, and the moves in and out of the backend."""

    def __init__(self, backend: str, tensors, names):
        ad = _adapters()
        v.choice(backend, "backend", v.BACKENDS)
        present = [t for t in tensors if t is not None]
        self.lead = present[0]
        device = self.lead.device
        for t in present:
            if t.device != device:  # raises, naming the argument
                ad.check_same_device(tensors, names)
        on_device = self.lead.is_device
        if backend == "auto":
            backend = "cupy" if on_device else "numpy"
        self.backend = backend
        self.host = backend == "numpy" or (backend == "numba" and _simulator())
        # all on one device: the caller's stream is the lead's (ad.caller_stream of all of them)
        self.stream = self.lead.stream if on_device else None
        if not self.host and self.stream is None:
            self.stream = 0
        self._native = None  # outputs the caller's framework allocated (allocate_result)

    def scope(self):
        if self.host:
            return contextlib.nullcontext()
        lead = self.lead if self.lead.is_device else None
        return _adapters().device_scope(lead) if lead is not None else contextlib.nullcontext()

    def arg(self, t):
        """The backend's array for tensor t: logical NumPy (reference), physical NumPy (simulator),
        or physical CuPy (device)."""
        if t is None:
            return None
        if not self.host and t.is_device:  # the usual device call: the caller's array as it is
            return t.data
        ad = _adapters()
        if self.host:
            if t.is_device:
                t = ad.to_host(t)
            return ad.host_logical(t) if self.backend == "numpy" else t.data
        if not t.is_device:
            t = ad.to_device(t)
        return t.data

    def empty(self, shape, logical: str):
        dt = _adapters().physical_dtype(logical)
        if self.host:
            return np.empty(shape, dtype=dt)
        import cupy

        return cupy.empty(shape, dtype=dt)

    def output(self, out_t, shape, logical="int32"):
        """Buffer the backend writes into: the caller's ``out`` when it lives where the backend
        runs, else a fresh one -- allocated by the caller's own framework where the adapters
        can (torch on a GPU: handed back as it is, no export), else by the backend's."""
        if out_t is not None and out_t.is_device == (not self.host):
            return out_t.data
        if out_t is None and not self.host and self.lead.is_device:
            t = _adapters().allocate_result(shape, dtype=logical, like=self.lead)
            if t is not None:
                self._native = (self._native or []) + [t]
                return t.data
        return self.empty(shape, logical)

    def finish(self, result, logical: str, out_t=None):
        """Hand ``result`` (backend array) back as the caller's array type, device and stream."""
        ad = _adapters()
        if out_t is not None:
            return out_t.source if result is out_t.data else ad.copy_into(out_t, result, like=self.lead)
        for t in self._native or ():
            if result is t.data:
                return t.source
        return ad.export_array(result, dtype=logical, like=self.lead)


def _check_values(inp: _Inputs, validate, S):
    if v.boolean(validate, "validate"):
        v.ranges_in_bounds(inp.ks, inp.ke, S)
        v.scale_positive(inp.k_scale, "k_scale")


def _import_out(out, T, cols):
    if out is None:
        return None
    return _adapters().import_out(out, name="out", shape=(T, cols), dtype="int32")


_NAMES = ["q", "k", "weights", "k_scale", "ks", "ke"]


# ----------------------------------------------------------------------------------------------
# the call cache (the host path of repeated device calls)
#
# A device call with validate=False is looked up by its signature: the kind of call, per array
# what the adapters read cheaply (type, dtype, shape, contiguity; adapters.call_signature), the
# device and stream, and every other argument. The first call of a signature takes the full path
# (imports, checks, scopes, the backend's stages) and then records what the backend bound for it
# (a launch plan that only needs the array addresses) with a result maker from the adapters. A
# later call with an equal signature has passed the same checks: it reads the addresses, makes
# its result and launches. Everything else -- validate=True, host arrays, other frameworks, a
# plan the backend no longer holds -- takes the full path, which raises what it always raised.

#: serve repeated device calls from the call cache (a knob for tests and bench/)
FAST_PATH = True
_calls: dict = {}  # call key -> _Cached, or _UNCOVERED (the backend binds nothing for it)
_UNCOVERED = object()
_MAX_CALLS = 512
_signature = None  # adapters.call_signature, resolved on first use


class _Cached:
    """A recorded signature: the backend's bound launches and the adapters' result maker (None
    when the caller passes ``out``)."""

    __slots__ = ("bound", "make")

    def __init__(self, bound, make):
        self.bound, self.make = bound, make

    def __call__(self, ptrs, out):
        """The call's result, or None when the bound plan declined (nothing was launched)."""
        make = self.make
        if make is None:
            return out if self.bound(ptrs) else None
        res, ptrs[-1] = make()
        return res if self.bound(ptrs) else None


def _call_key(kind, arrays, ints, strs, extra):
    """(key, array addresses, stream) of a call the cache may hold, else None. ``arrays`` end with
    ``out``; ``ints`` must be ints and ``strs`` strs (what the full path would accept as equal
    values, it accepts as these types); ``extra`` any other hashable arguments."""
    for x in ints:
        if type(x) is not int:
            return None
    for x in strs:
        if type(x) is not str:
            return None
    global _signature
    sign = _signature
    if sign is None:
        sign = _signature = _adapters().call_signature
    facts = sign(arrays)
    if facts is None:
        return None
    sig, ptrs, device, stream = facts
    return (kind, sig, device, stream, ints, strs, extra), ptrs, stream


def _cached(call, out):
    """The result of a call found in the cache, or None (take the full path)."""
    try:
        entry = _calls.get(call[0])
    except TypeError:  # an unhashable argument: the full path says what it thinks of it
        return None
    if entry is None or entry is _UNCOVERED:
        return None
    return entry(call[1], out)


def _look_up(validate, kind, arrays, ints, strs, extra, out):
    """(call key, cached result) of a call: the key is None where the cache does not apply
    (validate not False, FAST_PATH off, or what _call_key turns down), the result None where the
    full path must run."""
    if validate is not False or not FAST_PATH:
        return None, None
    call = _call_key(kind, arrays, ints, strs, extra)
    return call, (None if call is None else _cached(call, out))


def _remember(call, ex, out_t, shape, bind):
    """After a full-path device call: record its signature with what the backend binds for it."""
    if ex.backend != "cupy" or ex.host or ex.stream != call[2] or bind is None:
        return
    try:
        if _calls.get(call[0]) is _UNCOVERED:  # tried before: nothing to bind
            return
    except TypeError:
        return
    make = None
    if out_t is None:
        make = _adapters().result_allocator(shape, dtype="int32", like=ex.lead)
    bound = bind() if out_t is not None or make is not None else None
    if len(_calls) >= _MAX_CALLS:
        _calls.clear()
    _calls[call[0]] = _UNCOVERED if bound is None else _Cached(bound, make)


def clear_call_cache() -> None:
    """Forget every recorded call signature (the next call of each takes the full path)."""
    _calls.clear()


def _prepare_selection(q, k, weights, k_scale, ks, ke, dtype, out, topk, index_base, order, backend, validate):
    """Shared front of the end-to-end selections: option checks, imported inputs and ``out``,
    where the call runs, and the value checks. Returns (inputs, out tensor or None, exec)."""
    v.choice(index_base, "index_base", v.INDEX_BASES)
    v.choice(order, "order", v.ORDERS)
    inp = _Inputs(q, k, weights, k_scale, ks, ke, dtype)
    out_t = _import_out(out, inp.T, topk)
    ex = _Exec(backend, inp.tensors() + [out_t], _NAMES + ["out"])
    _check_values(inp, validate, inp.S)
    return inp, out_t, ex


def hisa_select(q, k, weights, *, k_scale=None, ks=None, ke=None, block_size=128, block_topk=64, topk=2048,
                pool_dtype="bfloat16", dtype=None, index_base="relative", order="position", backend="auto",
                validate=True, out=None):
    """HISA top-k selection (SPEC §5): pooled-block filter, then exact token top-k inside the blocks.

    Args:
        q: [T, H, D] float8_e4m3fn / bfloat16 / float16 / float32 indexer queries.
        k: [S, D] keys, same dtype as ``q``.
        weights: [T, H] float32 per-row head weights.
        k_scale: [S] float32 per-token key scale (fp8 keys), or None.
        ks, ke: [T] int32 visible key range per query, or None for the causal default.
        block_size: B, tokens per block (blocks aligned to absolute positions).
        block_topk: m >= 2 blocks kept per query (first and last eligible always); m * B >= topk.
        topk: k, indices returned per query.
        pool_dtype: "bfloat16" (default), "float32" or "float8_e4m3fn" (per-block scale).
        dtype: "float8_e4m3fn" when q and k are passed as uint8 bit patterns.
        index_base: "relative" (positions minus ks, the vLLM / SGLang convention) or "absolute".
        order: "position" (ascending) or "score" (SPEC §3 rank order).
        backend: "auto", "cupy", "numba" or "numpy".
        validate: check ks/ke bounds and k_scale > 0 (a device-to-host read); with False the
            kernels clamp ks/ke into [0, S] and the call never synchronises the host.
        out: optional [T, topk] int32 output buffer of the caller's type.

    Returns:
        [T, topk] int32 indices, the caller's array type on the caller's device.
    """
    call, res = _look_up(validate, "hisa", (q, k, weights, k_scale, ks, ke, out), (block_size, block_topk, topk),
                         (pool_dtype, index_base, order, backend), dtype, out)
    if res is not None:
        return res
    p = v.selection_params(block_size=block_size, block_topk=block_topk, topk=topk)
    v.choice(pool_dtype, "pool_dtype", v.POOL_DTYPES)
    inp, out_t, ex = _prepare_selection(q, k, weights, k_scale, ks, ke, dtype, out, p["topk"], index_base, order,
                                        backend, validate)
    with ex.scope():
        a = [ex.arg(t) for t in inp.tensors()]
        if ex.backend == "numpy":
            res = reference.hisa_select(a[0], a[1], a[2], k_scale=a[3], ks=a[4], ke=a[5], pool_dtype=pool_dtype,
                                        index_base=index_base, order=order, **p)
        else:
            mod = _backend_module(ex.backend)
            kw = dict(pool_dtype=pool_dtype, index_base=index_base, order=order, **p)
            buf = ex.output(out_t, (inp.T, p["topk"]))
            res = mod.hisa_select(*a, out=buf, stream=ex.stream, **kw)
            if call is not None:
                bind = getattr(mod, "bind_hisa_select", None)
                _remember(call, ex, out_t, (inp.T, p["topk"]),
                          bind and (lambda: bind(*a, out=buf, stream=ex.stream, **kw)))
        return ex.finish(res, "int32", out_t)


def dense_select(q, k, weights, *, k_scale=None, ks=None, ke=None, topk=2048, dtype=None, index_base="relative",
                 order="position", backend="auto", validate=True, out=None):
    """Flat DSA selection (SPEC §4): the exact top-k of every visible key's token score.

    Same arguments and result as :func:`hisa_select` without the block parameters. The CUDA
    backend processes query rows in chunks so its workspace stays bounded (never a [T, S] buffer
    for long S): at most ``kernels.cupy_backend.DENSE_WORKSPACE_BYTES`` (512 MB) of ranking keys
    per chunk plus 64 KiB of candidate slots per row of a chunk where the filtered top-k takes its
    rows; lower the knob to trade speed for memory. With fp8 q and k, 64 heads, topk <= 2048 and
    65536 or more keys on Hopper it keeps, per row, only the keys above a threshold taken from a
    scored sample (``DENSE_THRESHOLD``): up to 8192 candidates of 8 bytes per row in the same
    512 MB buffer, which then holds the keys of rows scored again whole where that cannot be
    exact, plus about 16 MB of sample scores at S = 128K, T = 4096 (560 MiB in all there). Rows
    of all-equal scores are such rows: an input made of them takes about 2.4x the time of
    ``DENSE_THRESHOLD = False`` (H200, 128K / 4096), with the same result.
    """
    call, res = _look_up(validate, "dense", (q, k, weights, k_scale, ks, ke, out), (topk,),
                         (index_base, order, backend), dtype, out)
    if res is not None:
        return res
    p = v.selection_params(topk=topk)
    inp, out_t, ex = _prepare_selection(q, k, weights, k_scale, ks, ke, dtype, out, p["topk"], index_base, order,
                                        backend, validate)
    with ex.scope():
        a = [ex.arg(t) for t in inp.tensors()]
        if ex.backend == "numpy":
            res = reference.dense_select(a[0], a[1], a[2], k_scale=a[3], ks=a[4], ke=a[5], index_base=index_base,
                                         order=order, **p)
        else:
            mod = _backend_module(ex.backend)
            kw = dict(index_base=index_base, order=order, **p)
            buf = ex.output(out_t, (inp.T, p["topk"]))
            res = mod.dense_select(*a, out=buf, stream=ex.stream, **kw)
            if call is not None:
                bind = getattr(mod, "bind_dense_select", None)
                _remember(call, ex, out_t, (inp.T, p["topk"]),
                          bind and (lambda: bind(*a, out=buf, stream=ex.stream, **kw)))
        return ex.finish(res, "int32", out_t)


def block_sparse_select(q, k, weights, *, k_scale=None, ks=None, ke=None, block_size=128, topk=2048,
                        pool_dtype="bfloat16", dtype=None, index_base="relative", order="position",
                        backend="auto", validate=True, out=None):
    """The paper's block-sparse baseline (SPEC §6): keep m = topk // block_size blocks (first and
    last eligible forced), return every visible position inside them, no token refinement.

    Same arguments and result as :func:`hisa_select`; requires topk // block_size >= 2.
    """
    p = v.selection_params(block_size=block_size, topk=topk)
    m = p["topk"] // p["block_size"]
    if m < 2:
        raise ValueError(f"block_sparse_select: expected topk // block_size >= 2 blocks, got "
                         f"{p['topk']} // {p['block_size']} = {m}")
    v.choice(pool_dtype, "pool_dtype", v.POOL_DTYPES)
    inp, out_t, ex = _prepare_selection(q, k, weights, k_scale, ks, ke, dtype, out, p["topk"], index_base, order,
                                        backend, validate)
    with ex.scope():
        a = [ex.arg(t) for t in inp.tensors()]
        if ex.backend == "numpy":
            res = reference.block_sparse_select(a[0], a[1], a[2], k_scale=a[3], ks=a[4], ke=a[5],
                                                pool_dtype=pool_dtype, index_base=index_base, order=order, **p)
        else:
            # selecting topk >= m * B candidates keeps every candidate of the m blocks
            mod = _backend_module(ex.backend)
            pooled, pscale = mod.pool_keys(a[1], a[3], block_size=p["block_size"], pool_dtype=pool_dtype,
                                           stream=ex.stream)
            blocks = mod.select_blocks(a[0], pooled, a[2], pscale, a[4], a[5], seq_len=inp.S,
                                       block_size=p["block_size"], block_topk=m,
                                       out=ex.empty((inp.T, m), "int32"), stream=ex.stream)
            res = mod.refine(a[0], a[1], a[2], a[3], blocks, a[4], a[5], block_size=p["block_size"],
                             topk=p["topk"], index_base=index_base, order=order,
                             out=ex.output(out_t, (inp.T, p["topk"])), stream=ex.stream)
        return ex.finish(res, "int32", out_t)


def pool_keys(k, *, k_scale=None, block_size=128, pool_dtype="bfloat16", dtype=None, backend="auto",
              validate=True):
    """Mean-pooled keys per block (SPEC §5.2).

    Args:
        k: [S, D] keys (float8_e4m3fn / bfloat16 / float16 / float32; uint8 + dtype= for fp8).
        k_scale: [S] float32 or None.
        block_size: B; block b covers [b*B, min((b+1)*B, S)), the last may be partial.
        pool_dtype: "bfloat16", "float32" or "float8_e4m3fn".

    Returns:
        (pooled [ceil(S/B), D] in ``pool_dtype``, pooled_scale [ceil(S/B)] float32 for the fp8
        pool or None). CuPy callers get fp8 / bf16 as uint8 / uint16 bit patterns.
    """
    p = v.selection_params(block_size=block_size)
    v.choice(pool_dtype, "pool_dtype", v.POOL_DTYPES)
    ad = _adapters()
    kt = ad.import_array(k, name="k", dtype=dtype)
    v.dtype_in(kt, "k", v.INPUT_DTYPES)
    v.ndim_is(kt, "k", 2, "[S, D]")
    st = None
    if k_scale is not None:
        st = ad.import_array(k_scale, name="k_scale")
        v.dtype_in(st, "k_scale", ("float32",))
        v.shape_is(st, "k_scale", (int(kt.shape[0]),), "[S] of 'k'")
    ex = _Exec(backend, [kt, st], ["k", "k_scale"])
    if v.boolean(validate, "validate"):
        v.scale_positive(st, "k_scale")
    with ex.scope():
        if ex.backend == "numpy":
            pooled, pscale = reference.pool_keys(ex.arg(kt), ex.arg(st), pool_dtype=pool_dtype, **p)
        else:
            pooled, pscale = _backend_module(ex.backend).pool_keys(ex.arg(kt), ex.arg(st), pool_dtype=pool_dtype,
                                                                   stream=ex.stream, **p)
        pooled_out = ex.finish(pooled, pool_dtype)
        return pooled_out, (ex.finish(pscale, "float32") if pscale is not None else None)


def select_blocks(q, pooled, weights, *, pooled_scale=None, ks=None, ke=None, block_size=128, block_topk=64,
                  seq_len=None, dtype=None, backend="auto", validate=True, out=None):
    """Block selection (SPEC §5.3-§5.4): block scores, causal eligibility, forced first/last
    eligible blocks and the best ``block_topk - 2`` others.

    Args:
        q: [T, H, D] queries; weights: [T, H] float32.
        pooled: [nb, D] pooled keys from :func:`pool_keys` (bfloat16, float32 or float8_e4m3fn;
            uint16 / uint8 bit patterns are read as bfloat16 / float8_e4m3fn).
        pooled_scale: [nb] float32, required for a float8_e4m3fn pool.
        ks, ke: [T] int32, or None for the causal default over ``seq_len`` keys.
        seq_len: S, the key count (default nb * block_size); must satisfy ceil(S / B) == nb.

    Returns:
        [T, block_topk] int32 block ids, ascending, then -1.
    """
    p = v.selection_params(block_size=block_size, block_topk=block_topk)
    ad = _adapters()
    pt = ad.import_array(pooled, name="pooled")
    if pt.dtype in ("uint8", "uint16"):
        pt = ad.import_array(pooled, name="pooled", dtype="float8_e4m3fn" if pt.dtype == "uint8" else "bfloat16")
    v.dtype_in(pt, "pooled", v.POOL_DTYPES)
    v.ndim_is(pt, "pooled", 2, "[nb, D]")
    nb = int(pt.shape[0])
    S = nb * p["block_size"] if seq_len is None else v.positive_int(seq_len, "seq_len")
    if -(-S // p["block_size"]) != nb:
        raise ValueError(f"argument 'seq_len': expected ceil(seq_len / block_size) == {nb} (rows of 'pooled'), "
                         f"got seq_len={S}, block_size={p['block_size']}")
    inp = _Inputs(q, None, weights, None, ks, ke, dtype)
    if int(pt.shape[1]) != inp.D:
        raise ValueError(f"argument 'pooled': expected shape ({nb}, {inp.D}) (D of 'q'), got {tuple(pt.shape)}")
    st = None
    if pt.dtype == "float8_e4m3fn":
        if pooled_scale is None:
            raise ValueError("argument 'pooled_scale': expected a [nb] float32 array for a float8_e4m3fn pool, got None")
    if pooled_scale is not None:
        st = ad.import_array(pooled_scale, name="pooled_scale")
        v.dtype_in(st, "pooled_scale", ("float32",))
        v.shape_is(st, "pooled_scale", (nb,), "[nb] of 'pooled'")
    out_t = _import_out(out, inp.T, p["block_topk"])
    tensors = [inp.q, pt, inp.weights, st, inp.ks, inp.ke, out_t]
    ex = _Exec(backend, tensors, ["q", "pooled", "weights", "pooled_scale", "ks", "ke", "out"])
    if v.boolean(validate, "validate"):
        v.ranges_in_bounds(inp.ks, inp.ke, S)
        v.scale_positive(st, "pooled_scale")
    with ex.scope():
        a = [ex.arg(t) for t in tensors[:6]]
        if ex.backend == "numpy":
            res = reference.select_blocks(a[0], a[1], a[2], pooled_scale=a[3], ks=a[4], ke=a[5], seq_len=S, **p)
        else:
            res = _backend_module(ex.backend).select_blocks(
                *a, seq_len=S, out=ex.output(out_t, (inp.T, p["block_topk"])), stream=ex.stream, **p)
        return ex.finish(res, "int32", out_t)


def refine(q, k, weights, blocks, *, k_scale=None, ks=None, ke=None, block_size=128, topk=2048, dtype=None,
           index_base="relative", order="position", backend="auto", validate=True, out=None):
    """Token refinement (SPEC §5.5-§5.6): exact top-k among the positions of each row's blocks.

    Args:
        blocks: [T, m] int32 block ids per row, strictly ascending, then -1 (as returned by
            :func:`select_blocks`; checked when ``validate=True``).
        Other arguments as in :func:`hisa_select`.

    Returns:
        [T, topk] int32 indices.
    """
    p = v.selection_params(block_size=block_size, topk=topk)
    v.choice(index_base, "index_base", v.INDEX_BASES)
    v.choice(order, "order", v.ORDERS)
    inp = _Inputs(q, k, weights, k_scale, ks, ke, dtype)
    bt = _adapters().import_array(blocks, name="blocks")
    v.dtype_in(bt, "blocks", ("int32",))
    v.ndim_is(bt, "blocks", 2, "[T, m]")
    if int(bt.shape[0]) != inp.T:
        raise ValueError(f"argument 'blocks': expected shape ({inp.T}, m) (T of 'q'), got {tuple(bt.shape)}")
    out_t = _import_out(out, inp.T, p["topk"])
    tensors = inp.tensors() + [bt, out_t]
    ex = _Exec(backend, tensors, _NAMES + ["blocks", "out"])
    _check_values(inp, validate, inp.S)
    if validate:
        v.blocks_well_formed(bt, -(-inp.S // p["block_size"]))
    with ex.scope():
        a = [ex.arg(t) for t in inp.tensors()]
        b = ex.arg(bt)
        if ex.backend == "numpy":
            res = reference.refine(a[0], a[1], a[2], b, k_scale=a[3], ks=a[4], ke=a[5], index_base=index_base,
                                   order=order, **p)
        else:
            res = _backend_module(ex.backend).refine(
                a[0], a[1], a[2], a[3], b, a[4], a[5], index_base=index_base, order=order,
                out=ex.output(out_t, (inp.T, p["topk"])), stream=ex.stream, **p)
        return ex.finish(res, "int32", out_t)


def topk(scores, k, *, lengths=None, backend="auto"):
    """Exact row top-k with the SPEC §3 ranking (score descending, ties by lower index, NaN last).

    Args:
        scores: [R, N] float32.
        k: number of entries per row.
        lengths: optional [R] int32; row r considers columns [0, lengths[r]) (clamped to [0, N]).

    Returns:
        (values [R, k] float32, indices [R, k] int32), in rank order; slots past a row's
        candidate count hold index -1 and value -inf.

    On the CuPy backend, long rows with k small against N (no ``lengths``, k <= 2048, N from
    max(32k, 32768) to about 262144, at most 1024 rows; e.g. k = 2048 of 131072) first keep the
    columns above a threshold sampled from the row and rank only those (workspace: 64 KiB per
    row); rows where that cannot be exact (heavy ties, mostly NaN) are redone whole. Results are
    exact either way.
    """
    k = v.positive_int(k, "k")
    ad = _adapters()
    st = ad.import_array(scores, name="scores")
    v.dtype_in(st, "scores", ("float32",))
    v.ndim_is(st, "scores", 2, "[R, N]")
    R = int(st.shape[0])
    lt = None
    if lengths is not None:
        lt = ad.import_array(lengths, name="lengths")
        v.dtype_in(lt, "lengths", ("int32",))
        v.shape_is(lt, "lengths", (R,), "[R] of 'scores'")
    ex = _Exec(backend, [st, lt], ["scores", "lengths"])
    with ex.scope():
        if ex.backend == "numpy":
            vals, idx = reference.topk(ex.arg(st), k, lengths=ex.arg(lt))
        else:
            vals, idx = _backend_module(ex.backend).topk(
                ex.arg(st), ex.arg(lt), k=k, out_values=ex.output(None, (R, k), "float32"),
                out_indices=ex.output(None, (R, k), "int32"), stream=ex.stream)
        return ex.finish(vals, "float32"), ex.finish(idx, "int32")
