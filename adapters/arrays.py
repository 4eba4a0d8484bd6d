"""Import any caller array as a ``Tensor``; hand results back as the caller's array type.

Import (``import_array``)
    NumPy, PyTorch (CPU/CUDA), JAX (CPU/GPU), CuPy and any other DLPack producer become one
    ``Tensor``: ``data`` is a zero-copy view of the caller's memory in the *physical* dtype
    (``numpy.ndarray`` on the host, ``cupy.ndarray`` on a GPU), ``dtype`` the *logical* dtype.

    ==========  ================================================  ================================
    framework   how                                               copies?
    ==========  ================================================  ================================
    numpy       the array itself (``.view(uint8/uint16)``)        never
    torch CPU   ``.detach().view(uint8/int16).numpy()``           never
    torch CUDA  ``data_ptr()`` wrapped as CuPy memory owned by    never; used on the caller's
                the tensor, in the physical dtype (what DLPack    current torch stream, so no
                on that stream gives, ~10x cheaper; a handful     event is needed
                of C-level reads per argument, the hot path)
    jax CPU     DLPack (fp8/bf16 capsules retyped to              never (waits until the array
                uint8/uint16 in place, dlpack.py)                 is ready, like ``np.asarray``)
    jax GPU     DLPack with JAX's external-ready stream           never; JAX makes that stream
                (fp8/bf16 retyped in place)                       wait for the array (no host
                                                                  sync)
    cupy        the array itself                                  never
    other       ``np.from_dlpack`` / ``cupy.from_dlpack``         producer's choice
    ==========  ================================================  ================================

    Non-C-contiguous inputs are rejected (ValueError), never silently copied.

Streams
    ``Tensor.stream`` is the ``cudaStream_t`` the caller works on (torch: current stream of the
    tensor's device; CuPy: current stream; JAX: the stream JAX uses for external ready events,
    0 = legacy default stream if that is unavailable).  ``device_scope(t)`` makes it CuPy's
    current device and stream, so allocations, launches and DLPack exports inside the scope are
    ordered with the caller's work without any host synchronisation; it enters only what is not
    current already (torch's default stream is CuPy's null stream: nothing to enter).

Export (``export_array``)
    The result goes back to the caller's framework on the caller's device:

    ============  =================================================================================
    caller        result
    ============  =================================================================================
    numpy         ``numpy.ndarray`` in the logical dtype (ml_dtypes for fp8/bf16); device results
                  are copied to the host (``.get()`` on the stream they were computed on)
    torch         ``torch.from_numpy`` (host) / ``torch.from_dlpack`` (CUDA) then ``.view`` to the
                  torch dtype: zero-copy
    jax           ``jax.dlpack.from_dlpack``, fp8/bf16 retyped in the capsule: zero-copy on GPU;
                  on CPU JAX copies when the buffer is not 64-byte aligned; int64 results become
                  int32 unless ``jax_enable_x64`` is on (JAX's canonicalisation, a copy)
    cupy          the CuPy array itself; fp8/bf16 stay ``uint8``/``uint16`` bit patterns because
                  CuPy has no such dtypes
    ============  =================================================================================

    Fresh results need no export where the caller's framework allocates them itself:
    ``allocate_result(shape, dtype=, like=)`` gives torch CUDA callers a ``torch.empty`` tensor
    (``source``) with its CuPy view (``data``) for the backend to write, handed back as it is;
    it returns None for every other caller, whose results go through ``export_array``.

    When a backend runs where the caller's arrays do not live (explicit ``backend=`` choice),
    ``to_device``/``to_host`` copy a Tensor and remember the caller's original Tensor in
    ``origin``; ``export_array(..., like=copy)`` still returns the result on the caller's device.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from . import dlpack as _dl
from .dtypes import (
    BFLOAT16,
    FLOAT8,
    as_physical,
    check_dtype,
    dtype_name,
    host_logical_dtype,
    physical_dtype,
    resolve_logical,
)

__all__ = [
    "Tensor",
    "import_array",
    "import_out",
    "export_array",
    "copy_into",
    "allocate",
    "allocate_result",
    "result_allocator",
    "call_signature",
    "to_device",
    "to_host",
    "device_scope",
    "caller_stream",
    "check_same_device",
    "device_str",
]


# --------------------------------------------------------------------------------------------
# Tensor


@dataclass(frozen=True, eq=False, repr=False, init=False)
class Tensor:
    """Framework-neutral description of one caller array (see the module docstring)."""

    data: Any  # numpy.ndarray (host) or cupy.ndarray (device), physical dtype, zero-copy view
    dtype: str  # logical dtype name
    framework: str  # "numpy" | "torch" | "jax" | "cupy"
    device: Any  # "cpu" or CUDA ordinal (int)
    stream: int | None  # caller's cudaStream_t handle for device tensors, None on host
    source: Any  # the caller's original object
    name: str = ""  # argument name, for error messages
    origin: "Tensor | None" = None  # caller's Tensor when this one is a to_device/to_host copy

    def __init__(self, data, dtype, framework, device, stream, source, name="", origin=None):
        # One dict update instead of the frozen dataclass's eight object.__setattr__ calls (half
        # the cost; a Tensor is built per argument of every call). Still frozen afterwards.
        self.__dict__.update(data=data, dtype=dtype, framework=framework, device=device, stream=stream,
                             source=source, name=name, origin=origin)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def is_device(self) -> bool:
        return self.device != "cpu"

    @property
    def ptr(self) -> int:
        """Address of the first element (host or device)."""
        if isinstance(self.data, np.ndarray):
            return int(self.data.__array_interface__["data"][0])
        return int(self.data.data.ptr)

    @property
    def caller(self) -> "Tensor":
        """The Tensor describing the caller's own array (``origin`` or self)."""
        return self.origin if self.origin is not None else self

    def __repr__(self) -> str:
        extra = "" if self.origin is None else f", copy of {device_str(self.origin.device)}"
        return (
            f"Tensor(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, "
            f"physical={self.data.dtype}, framework={self.framework}, "
            f"device={device_str(self.device)}, stream={self.stream}{extra})"
        )


def device_str(device) -> str:
    return "cpu" if device == "cpu" else f"cuda:{device}"


# --------------------------------------------------------------------------------------------
# framework detection (never imports a framework the caller has not imported)


def _cupy():
    import cupy

    return cupy


def _framework_of(x) -> str | None:
    if isinstance(x, np.ndarray):
        return "numpy"
    mods = sys.modules
    torch = mods.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = mods.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    jax = mods.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return "dlpack"
    return None


def _type_name(x) -> str:
    t = type(x)
    mod = t.__module__
    return t.__qualname__ if mod in (None, "builtins") else f"{mod}.{t.__qualname__}"


# --------------------------------------------------------------------------------------------
# import


def _c_contiguous(shape, strides, itemsize) -> bool:
    if any(n == 0 for n in shape):
        return True
    expected = itemsize
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _check_contiguous(data, name: str) -> None:
    _check_layout(tuple(data.shape), tuple(data.strides), data.dtype.itemsize, name)


def _check_layout(shape, strides, item, name: str) -> None:
    """``strides`` in bytes; raises the non-contiguous ValueError (strides shown in elements)."""
    if not _c_contiguous(shape, strides, item):
        strides = tuple(s // item if s % item == 0 else s / item for s in strides)
        raise ValueError(
            f"argument '{name}': expected a C-contiguous array (row-major, unit stride in the "
            f"last dim), got strides {strides} (in elements) for shape {tuple(shape)}; "
            f"make it contiguous first (e.g. .contiguous() / np.ascontiguousarray)"
        )


class _StreamHandle:
    """A raw cudaStream_t exposed through the CUDA stream protocol (``__cuda_stream__``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_STREAMS: dict = {}  # (device, handle) -> cupy stream object wrapping it (it owns nothing)


def _cupy_stream(stream: int | None, device: int):
    """CuPy stream object for a raw handle (0/1 = legacy default, 2 = per-thread default)."""
    cupy = _cupy()
    if stream in (None, 0, 1):
        return cupy.cuda.Stream.null
    if stream == 2:
        return cupy.cuda.Stream.ptds
    key = (int(device), int(stream))
    s = _STREAMS.get(key)
    if s is None:
        if len(_STREAMS) > 256:
            _STREAMS.clear()
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        with cupy.cuda.Device(key[0]):
            if from_external is not None:  # CuPy >= 14
                s = from_external(_StreamHandle(key[1]))
            else:
                s = cupy.cuda.ExternalStream(key[1], key[0])
        _STREAMS[key] = s
    return s


_TORCH_STORAGE = {FLOAT8: "uint8", BFLOAT16: "int16", "uint16": "int16"}
#: Import torch CUDA tensors through cupy.from_dlpack instead of wrapping data_ptr() (tests flip
#: it to check that both paths agree).
_TORCH_VIA_DLPACK = False


def _import_numpy(x, name):
    arr = x if type(x) is np.ndarray else x.view(np.ndarray)
    return arr, "cpu", None


_torch_raw_stream = None  # torch's current-stream getter, resolved on first use


def _torch_stream(ordinal: int) -> int:
    """The cudaStream_t of torch's current stream on device ``ordinal``.

    ``torch._C._cuda_getCurrentRawStream`` (what torch.compile's generated code calls) is one C
    call; ``torch.cuda.current_stream(i).cuda_stream``, the fallback, builds a Stream object
    first (several microseconds, once per argument and call)."""
    global _torch_raw_stream
    get = _torch_raw_stream
    if get is None:
        import torch

        get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if get is None:
            def get(i):
                return torch.cuda.current_stream(i).cuda_stream
        _torch_raw_stream = get
    return int(get(ordinal))


def _check_torch_layout(x, torch, name):
    if x.layout != torch.strided:
        raise TypeError(f"argument '{name}': expected a dense (strided) tensor, got {x.layout}")


def _import_torch_cuda(x, name, logical):
    """A plain strided CUDA tensor as a CuPy array of the *physical* dtype, its layout checked.

    The hot path of every call with torch inputs: a handful of C-level attribute reads and a
    CuPy array over ``data_ptr()`` owned by the tensor (kept alive by the CuPy memory object).
    Same semantics as DLPack consumed on the caller's own stream, where the stream handshake is
    a no-op, without the capsule, the detach/view of the dtype and torch's Stream object.
    """
    ordinal = x.get_device()
    stream = _torch_stream(ordinal)
    shape = tuple(x.shape)
    if not x.is_contiguous():  # torch's rule is _c_contiguous's: size-1 dims ignored
        item = x.element_size()
        _check_layout(shape, tuple(st * item for st in x.stride()), item, name)
    phys = physical_dtype(logical)  # same itemsize as the tensor's (resolve_logical)
    cupy = _cupy()
    nbytes = x.nbytes
    if nbytes == 0:
        with cupy.cuda.Device(ordinal):
            return cupy.empty(shape, dtype=phys), ordinal, stream
    mem = cupy.cuda.UnownedMemory(x.data_ptr(), nbytes, x, ordinal)
    return cupy.ndarray(shape, phys, cupy.cuda.MemoryPointer(mem, 0)), ordinal, stream


def _import_torch(x, name, logical):
    import torch

    _check_torch_layout(x, torch, name)
    t = x.detach()
    storage = _TORCH_STORAGE.get(logical)
    if storage is not None and t.element_size() == physical_dtype(logical).itemsize:
        t = t.view(getattr(torch, storage))
    dev = t.device
    if dev.type == "cpu":
        return t.numpy(), "cpu", None
    if dev.type != "cuda":
        raise ValueError(
            f"argument '{name}': expected a CPU or CUDA tensor, got one on device '{dev}'"
        )
    ordinal = dev.index if dev.index is not None else torch.cuda.current_device()
    if not _TORCH_VIA_DLPACK:  # (import_array sends CUDA tensors to _import_torch_cuda itself)
        return _import_torch_cuda(x, name, logical)
    stream = _torch_stream(ordinal)
    cupy = _cupy()
    shape = tuple(t.shape)
    phys = _np_of_torch(t.dtype)
    item = t.element_size()
    _check_layout(shape, tuple(st * item for st in t.stride()), item, name)
    if t.numel() == 0:
        with cupy.cuda.Device(ordinal):
            return cupy.empty(shape, dtype=phys), ordinal, stream
    # DLPack consumed on the caller's own stream: torch records no event, nothing waits.
    # (torch compares with the current stream of its *current* device: switch to ours.)
    with torch.cuda.device(ordinal):
        data = cupy.from_dlpack(_dl.DLPackView(t, stream=_dl.dlpack_stream_arg(stream)))
    return data, ordinal, stream


_NP_OF_TORCH: dict = {}


def _np_of_torch(tdtype) -> np.dtype:
    """NumPy dtype of a torch storage dtype (after the fp8/bf16 views)."""
    if not _NP_OF_TORCH:
        import torch

        _NP_OF_TORCH.update({
            torch.uint8: np.dtype(np.uint8),
            torch.int16: np.dtype(np.int16),
            torch.float16: np.dtype(np.float16),
            torch.float32: np.dtype(np.float32),
            torch.int32: np.dtype(np.int32),
            torch.int64: np.dtype(np.int64),
        })
    return _NP_OF_TORCH[tdtype]


def _jax_stream(device) -> int:
    """The stream JAX orders external buffers on (0 = legacy default if JAX does not say)."""
    try:
        s = device.get_stream_for_external_ready_events()
        return int(s) if s else 0
    except Exception:
        return 0


def _jax_retype(src: str):
    return {FLOAT8: _dl.TO_UINT8, BFLOAT16: _dl.TO_UINT16}.get(src)


def _import_jax(x, name, src):
    import jax

    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        is_tracer = tracer is not None and isinstance(x, tracer)
    if is_tracer or not hasattr(x, "addressable_data"):
        raise TypeError(
            f"argument '{name}': got a JAX tracer ({type(x).__name__}); hisa_cupy functions "
            "take concrete arrays and cannot be called inside jax.jit/vmap/grad"
        )
    if x.is_deleted():
        raise ValueError(f"argument '{name}': the JAX array was deleted (donated?)")
    devices = x.devices()
    if len(devices) != 1:
        raise ValueError(
            f"argument '{name}': expected a single-device JAX array, got one sharded over "
            f"{len(devices)} devices"
        )
    (dev,) = devices
    retype = _jax_retype(src)
    if dev.platform == "cpu":
        data = np.from_dlpack(_dl.DLPackView(x, stream=None, retype=retype))
        return data, "cpu", None
    if dev.platform not in ("gpu", "cuda", "rocm"):
        raise ValueError(
            f"argument '{name}': expected a CPU or GPU JAX array, got one on {dev.platform}"
        )
    ordinal = int(dev.local_hardware_id)
    stream = _jax_stream(dev)
    cupy = _cupy()
    with cupy.cuda.Device(ordinal):
        if x.size == 0:
            phys = physical_dtype(src) if src in (FLOAT8, BFLOAT16) else np.dtype(x.dtype)
            data = cupy.empty(tuple(x.shape), dtype=phys)
        else:
            # JAX makes `stream` wait for the array's definition event (no host sync).
            data = cupy.from_dlpack(
                _dl.DLPackView(x, stream=_dl.dlpack_stream_arg(stream), retype=retype)
            )
    return data, ordinal, stream


def _import_cupy(x, name):
    cupy = _cupy()
    ordinal = int(x.device.id)
    if ordinal == cupy.cuda.runtime.getDevice():
        stream = int(cupy.cuda.get_current_stream().ptr)
    else:
        with cupy.cuda.Device(ordinal):
            stream = int(cupy.cuda.get_current_stream().ptr)
    return x, ordinal, stream


def _import_generic(x, name):
    dev_type, dev_id = x.__dlpack_device__()
    dev_type = int(dev_type)
    try:
        if dev_type in (_dl.DL_CPU, _dl.DL_CUDA_HOST):
            return np.from_dlpack(x), "cpu", None, "numpy"
        if dev_type in (_dl.DL_CUDA, _dl.DL_ROCM):
            cupy = _cupy()
            with cupy.cuda.Device(int(dev_id)):
                stream = int(cupy.cuda.get_current_stream().ptr)
                return cupy.from_dlpack(x), int(dev_id), stream, "cupy"
    except (BufferError, TypeError, RuntimeError) as e:
        raise TypeError(
            f"argument '{name}': could not import {_type_name(x)} through DLPack: {e}"
        ) from e
    raise ValueError(
        f"argument '{name}': {_type_name(x)} lives on DLPack device type {dev_type}; "
        "expected CPU or CUDA"
    )


_TORCH_NAMES: dict = {}  # torch.dtype -> its name (dtype_name parses str(dtype))


def _source_dtype(x, fw: str) -> str:
    if fw in ("numpy", "cupy", "jax"):
        return np.dtype(x.dtype).name
    if fw == "torch":
        name = _TORCH_NAMES.get(x.dtype)
        if name is None:
            name = _TORCH_NAMES[x.dtype] = dtype_name(x.dtype)
        return name
    return ""  # generic: known after import


def import_array(x, *, name: str, dtype=None, allowed: Sequence[str] | None = None) -> Tensor:
    """Describe the caller's array ``x`` (argument ``name``) as a ``Tensor``, zero-copy.

    ``dtype``: reinterpret uint8 storage as ``"float8_e4m3fn"`` or uint16/int16 storage as
    ``"bfloat16"``; for any other array it must equal the array's own dtype.  ``allowed``:
    optional tuple of logical dtypes this argument accepts (``check_dtype``).

    Raises TypeError (unknown object type, unsupported dtype, impossible ``dtype=``) and
    ValueError (non-C-contiguous, unsupported device, sharded JAX array), naming ``name``.
    """
    if isinstance(x, Tensor):
        t = x
        if dtype is not None:
            logical = resolve_logical(t.dtype, dtype, name=name)
            if logical != t.dtype:
                t = Tensor(t.data.view(physical_dtype(logical)), logical, t.framework,
                           t.device, t.stream, t.source, name, t.origin)
        if allowed is not None:
            check_dtype(t, name, allowed)
        return t

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.is_cuda and not _TORCH_VIA_DLPACK:
        # the hot path (torch CUDA inputs): data in the physical dtype, layout checked
        _check_torch_layout(x, torch, name)
        logical = resolve_logical(_source_dtype(x, "torch"), dtype, name=name)
        data, device, stream = _import_torch_cuda(x, name, logical)
        t = Tensor(data, logical, "torch", device, stream, x, name)
        if allowed is not None:
            check_dtype(t, name, allowed)
        return t

    fw = _framework_of(x)
    if fw is None:
        raise TypeError(
            f"argument '{name}': expected a NumPy, PyTorch, JAX or CuPy array (or another "
            f"DLPack producer), got {_type_name(x)}"
        )
    if fw == "dlpack":
        data, device, stream, fw = _import_generic(x, name)
        src = np.dtype(data.dtype).name
        logical = resolve_logical(src, dtype, name=name)
    else:
        src = _source_dtype(x, fw)
        logical = resolve_logical(src, dtype, name=name)
        if fw == "numpy":
            data, device, stream = _import_numpy(x, name)
        elif fw == "torch":
            data, device, stream = _import_torch(x, name, logical)
        elif fw == "jax":
            data, device, stream = _import_jax(x, name, src)
        else:
            data, device, stream = _import_cupy(x, name)

    phys = physical_dtype(logical)
    if data.dtype != phys:
        data = data.view(phys)  # same itemsize: fp8 -> uint8, bf16/int16 -> uint16
    _check_contiguous(data, name)
    t = Tensor(data, logical, fw, device, stream, x, name)
    if allowed is not None:
        check_dtype(t, name, allowed)
    return t


# --------------------------------------------------------------------------------------------
# devices and streams


def _present(tensors, names=None):
    tensors = list(tensors)
    if names is None:
        names = [getattr(t, "name", "") for t in tensors]
    return [(t, n) for t, n in zip(tensors, names) if t is not None]


def check_same_device(tensors: Iterable[Tensor | None], names: Sequence[str] | None = None) -> None:
    """Raise ValueError unless every (non-None) tensor lives on the same device.

    Message: ``argument 'k' is on cuda:1, expected cuda:0 like 'q'``.
    """
    present = _present(tensors, names)
    if not present:
        return
    ref, ref_name = present[0]
    for t, n in present[1:]:
        if t.device != ref.device:
            raise ValueError(
                f"argument '{n}' is on {device_str(t.device)}, expected "
                f"{device_str(ref.device)} like '{ref_name}'"
            )


def caller_stream(tensors: Iterable[Tensor | None]) -> int | None:
    """Stream of the first device tensor (None entries skipped); None if all are on the host."""
    for t in tensors:
        if t is not None and t.is_device:
            return t.stream
    return None


class device_scope:
    """``with device_scope(t) as s``: make ``t``'s device and stream CuPy's current ones
    (``s`` is the cupy stream).

    Everything CuPy allocates, launches or exports through DLPack inside the scope is ordered
    on the caller's stream.  No-op (gives None) for host tensors and None.  Only what differs
    is entered: when ``t``'s device and stream already are CuPy's current ones (torch's default
    stream is CuPy's null stream), entering and leaving cost two look-ups.
    """

    __slots__ = ("_t", "_device", "_stream")

    def __init__(self, t: Tensor | None):
        self._t = t
        self._device = self._stream = None

    def __enter__(self):
        t = self._t
        if t is None or not t.is_device:
            return None
        cupy = _cupy()
        if cupy.cuda.runtime.getDevice() != t.device:
            dev = cupy.cuda.Device(t.device)
            dev.__enter__()
            self._device = dev
        cur = cupy.cuda.get_current_stream()
        want = t.stream
        if cur.ptr == (0 if want in (None, 1) else want):  # 0 and 1: the legacy default stream
            return cur
        s = _cupy_stream(want, t.device)
        s.__enter__()
        self._stream = s
        return s

    def __exit__(self, *exc):
        s, dev = self._stream, self._device
        self._stream = self._device = None
        try:
            if s is not None:
                s.__exit__(*exc)
        finally:
            if dev is not None:
                dev.__exit__(*exc)
        return False


def to_device(t: Tensor, device: int | None = 0) -> Tensor:
    """Copy a host Tensor to GPU ``device`` (None = CuPy's current device).

    The copy keeps ``framework``/``dtype``/``source`` and records the caller's Tensor in
    ``origin``, so ``export_array(..., like=copy)`` returns results on the caller's device.
    Its stream is CuPy's current stream on that device.  Device tensors are returned as they
    are when already on ``device``.
    """
    cupy = _cupy()
    if device is None:
        device = int(cupy.cuda.Device().id)
    if t.is_device:
        if t.device == device:
            return t
        raise ValueError(
            f"argument '{t.name}' is on {device_str(t.device)}, cannot move it to "
            f"{device_str(device)}"
        )
    with cupy.cuda.Device(device):
        s = cupy.cuda.get_current_stream()
        data = cupy.empty(t.data.shape, dtype=t.data.dtype)
        if data.size:
            data.set(np.ascontiguousarray(t.data), stream=s)
        return Tensor(data, t.dtype, t.framework, device, int(s.ptr), t.source, t.name, t.caller)


def _device_to_host(data, stream_of: Tensor | None):
    """Blocking copy of a cupy array to a new NumPy array, ordered on ``stream_of``'s stream
    (CuPy's current stream when ``stream_of`` is None or on the host)."""
    cupy = _cupy()
    out = np.empty(data.shape, dtype=data.dtype)
    if data.size == 0:
        return out
    with cupy.cuda.Device(data.device.id):
        if stream_of is not None and stream_of.is_device:
            s = _cupy_stream(stream_of.stream, stream_of.device)
        else:
            s = cupy.cuda.get_current_stream()
        data.get(stream=s, out=out)
        s.synchronize()
    return out


def to_host(t: Tensor) -> Tensor:
    """Copy a device Tensor to the host (blocking, ordered on its stream)."""
    if not t.is_device:
        return t
    data = _device_to_host(t.data, t)
    return Tensor(data, t.dtype, t.framework, "cpu", None, t.source, t.name, t.caller)


def allocate(shape, *, dtype: str, like: Tensor):
    """Uninitialised array of logical ``dtype`` (physical storage) where ``like`` lives:
    NumPy on the host, CuPy on ``like``'s device, allocated on its stream."""
    phys = physical_dtype(dtype)
    if not like.is_device:
        return np.empty(tuple(shape), dtype=phys)
    with device_scope(like):
        return _cupy().empty(tuple(shape), dtype=phys)


_TORCH_DEVICES: dict = {}  # CUDA ordinal -> torch.device


def allocate_result(shape, *, dtype: str, like: Tensor) -> Tensor | None:
    """A fresh result allocated by the caller's own framework, or None where that is not the
    cheaper way back: ``source`` is the caller's array, to be returned as it is (no export),
    ``data`` its zero-copy view in the physical dtype for the backend to write.

    Today that is torch on a GPU: ``torch.empty`` on ``like``'s device, from torch's caching
    allocator on torch's current stream -- the stream ``like`` was imported on, so the memory is
    ordered with the caller's work exactly like an ``export_array`` of a CuPy result on that
    stream, without CuPy's allocation and the DLPack export (torch's ``from_dlpack`` alone looks
    up the current stream and wraps a capsule: ~10x the cost of this).  ``like`` must be the
    caller's own Tensor (not a ``to_device``/``to_host`` copy); None for every other case,
    where the caller allocates with CuPy/NumPy and uses ``export_array``.
    """
    if like.framework != "torch" or not like.is_device or like.origin is not None:
        return None
    import torch

    dev = _TORCH_DEVICES.get(like.device)
    if dev is None:
        dev = _TORCH_DEVICES[like.device] = torch.device("cuda", like.device)
    shape = tuple(shape)
    x = torch.empty(shape, dtype=_torch_dtype(dtype), device=dev)
    cupy = _cupy()
    nbytes = x.nbytes
    if nbytes == 0:
        data, _, _ = _import_torch_cuda(x, "out", dtype)
    else:  # fresh, contiguous, on like.device: wrap it as _import_torch_cuda would
        mem = cupy.cuda.UnownedMemory(x.data_ptr(), nbytes, x, like.device)
        data = cupy.ndarray(shape, physical_dtype(dtype), cupy.cuda.MemoryPointer(mem, 0))
    return Tensor(data, dtype, "torch", like.device, like.stream, x, "out")


def result_allocator(shape, *, dtype: str, like: Tensor):
    """A maker of fresh results like :func:`allocate_result`'s for callers that only need the
    address (a bound launch plan): ``make() -> (the caller's array, its device address)``, the
    shape, dtype and device resolved once. None wherever ``allocate_result`` gives None."""
    if like.framework != "torch" or not like.is_device or like.origin is not None:
        return None
    import torch

    shape = tuple(int(n) for n in shape)
    tdtype = _torch_dtype(dtype)
    dev = _TORCH_DEVICES.get(like.device)
    if dev is None:
        dev = _TORCH_DEVICES[like.device] = torch.device("cuda", like.device)

    def make():
        x = torch.empty(shape, dtype=tdtype, device=dev)
        return x, x.data_ptr()

    return make


_device_getter = (None, None)  # (the _cupy it came from, its runtime.getDevice)


def _current_device() -> int:
    """CuPy's (the CUDA runtime's) current device: one C call."""
    global _device_getter
    src, get = _device_getter
    if src is not _cupy:  # first use, or _cupy was replaced (the CPU tests' stand-in)
        get = _cupy().cuda.runtime.getDevice
        _device_getter = (_cupy, get)
    return get()


def call_signature(arrays: Sequence):
    """What the arrays of a call are, read cheaply, for a per-signature call cache.

    ``arrays``: caller objects, None where absent. Returns ``(signature, addresses, device,
    stream)`` when every one present is a plain strided torch CUDA tensor and all live on CuPy's
    current device (the hot path); else None (the caller takes the full path: imports, checks,
    scopes). ``signature`` holds per array ``(type, torch dtype, shape, is_contiguous)`` (None
    where absent): everything ``import_array`` decides from -- which errors it raises, the
    logical dtype, the view it builds -- besides the address, so two calls with equal signatures
    on one device import alike. ``addresses`` is a list of ``data_ptr()`` (0 where absent),
    ``stream`` torch's current stream on that device (what ``import_array`` records).
    """
    torch = sys.modules.get("torch")
    if torch is None or _TORCH_VIA_DLPACK:
        return None
    base, strided = torch.Tensor, torch.strided
    sig, ptrs = [], []
    device = None
    try:
        for x in arrays:
            if x is None:
                sig.append(None)
                ptrs.append(0)
                continue
            if not isinstance(x, base) or not x.is_cuda or x.layout is not strided:
                return None
            d = x.get_device()
            if d != device:
                if device is not None:
                    return None
                device = d
            sig.append((type(x), x.dtype, x.shape, x.is_contiguous()))
            ptrs.append(x.data_ptr())
        if device is None or device != _current_device():
            return None
        return tuple(sig), ptrs, device, _torch_stream(device)
    except Exception:  # whatever it is, the full path says so in its own words
        return None


# --------------------------------------------------------------------------------------------
# export


def _is_cupy(data) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(data, cupy.ndarray)


_TORCH_DTYPES: dict = {}  # logical dtype name -> torch.dtype


def _torch_dtype(dtype: str):
    t = _TORCH_DTYPES.get(dtype)
    if t is None:
        import torch

        t = _TORCH_DTYPES[dtype] = getattr(torch, dtype)
    return t


def _wrap_host(data: np.ndarray, dtype: str, root: Tensor):
    fw = root.framework
    if fw == "numpy":
        return data.view(host_logical_dtype(dtype))
    if fw == "torch":
        import torch

        if not data.flags.writeable:  # torch.from_numpy would warn and alias read-only memory
            data = data.copy()
        if dtype in (BFLOAT16, "uint16"):
            return torch.from_numpy(data.view(np.int16)).view(_torch_dtype(dtype))
        t = torch.from_numpy(data)
        return t.view(_torch_dtype(dtype)) if dtype == FLOAT8 else t
    if fw == "jax":
        import jax.dlpack

        if not data.flags.writeable:  # NumPy refuses DLPack 0.x export of read-only arrays
            data = data.copy()
        if data.size == 0:
            return _jax_empty(data.shape, dtype, None)
        retype = {FLOAT8: _dl.TO_FLOAT8, BFLOAT16: _dl.TO_BFLOAT16}.get(dtype)
        return jax.dlpack.from_dlpack(_dl.DLPackView(data, retype=retype))
    raise ValueError(f"export_array: cannot return host data to a {fw} caller on the host")


def _jax_empty(shape, dtype, ordinal):
    import jax

    if ordinal is None:
        dev = jax.devices("cpu")[0]
    else:
        dev = next(d for d in jax.devices() if d.platform != "cpu" and d.local_hardware_id == ordinal)
    return jax.device_put(np.zeros(shape, dtype=host_logical_dtype(dtype)), dev)


def _wrap_device(data, dtype: str, root: Tensor):
    """Inside device_scope(root): wrap a cupy array (physical dtype) as root's framework."""
    fw = root.framework
    if fw == "cupy":
        return data
    if fw == "torch":
        import torch

        if data.size == 0:
            return torch.empty(data.shape, dtype=_torch_dtype(dtype), device=f"cuda:{root.device}")
        if dtype in (BFLOAT16, "uint16"):
            return torch.from_dlpack(data.view(np.int16)).view(_torch_dtype(dtype))
        t = torch.from_dlpack(data)
        return t.view(_torch_dtype(dtype)) if dtype == FLOAT8 else t
    if fw == "jax":
        import jax.dlpack

        if data.size == 0:
            return _jax_empty(data.shape, dtype, root.device)
        retype = {FLOAT8: _dl.TO_FLOAT8, BFLOAT16: _dl.TO_BFLOAT16}.get(dtype)
        return jax.dlpack.from_dlpack(_dl.DLPackView(data, retype=retype))
    if fw == "numpy":  # a host caller whose root says device: cannot happen, be explicit
        return data.get()
    raise ValueError(f"export_array: unknown framework {fw!r}")


def export_array(data, *, dtype: str, like: Tensor):
    """Return ``data`` (NumPy or CuPy array holding logical ``dtype``) as the caller's array.

    ``like`` is a Tensor of the call (the caller's own, or a ``to_device``/``to_host`` copy of
    it, whose ``origin`` leads back to the caller).  The result has the caller's framework, the
    caller's device and is ordered on the caller's stream; views are used wherever possible:

    * host data, host caller: NumPy as is (logical view), torch via ``torch.from_numpy``, JAX via
      DLPack (zero-copy when 64-byte aligned) -- no copy;
    * device data, device caller: CuPy as is, torch/JAX via DLPack on the caller's stream -- no
      copy, no host sync;
    * device data, host caller: one blocking device-to-host copy, ordered on ``like``'s stream
      (the stream the data was computed on) when ``like`` is a device tensor;
    * host data, device caller: one host-to-device copy on the caller's stream.

    ``data`` may be in physical dtype or, on the host, in the ml_dtypes logical dtype.
    fp8/bf16 results for CuPy callers stay uint8/uint16 (CuPy has no such dtypes).
    """
    root = like.caller
    if _is_cupy(data):
        data = as_physical(data, dtype)
        if not root.is_device:
            return _wrap_host(_device_to_host(data, like), dtype, root)
        if data.device.id != root.device:
            raise ValueError(
                f"export_array: result is on cuda:{data.device.id}, caller is on "
                f"{device_str(root.device)}"
            )
        with device_scope(root):
            return _wrap_device(data, dtype, root)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"export_array: expected a NumPy or CuPy array, got {_type_name(data)}")
    data = as_physical(data, dtype)
    if not root.is_device:
        return _wrap_host(data, dtype, root)
    with device_scope(root) as s:
        dev = _cupy().empty(data.shape, dtype=data.dtype)
        if dev.size:
            dev.set(np.ascontiguousarray(data), stream=s)
        return _wrap_device(dev, dtype, root)


# --------------------------------------------------------------------------------------------
# out=


def import_out(out, *, name: str = "out", shape, dtype: str = "int32",
               like: Tensor | None = None, like_name: str | None = None) -> Tensor:
    """Validate a caller-provided output buffer and describe it as a Tensor.

    Checks, each raising with expected vs got and the argument name: an array type we know
    (TypeError), not a JAX array (immutable, TypeError), logical ``dtype`` (TypeError; uint8 /
    uint16 storage is accepted for fp8 / bf16), ``shape`` (ValueError), C-contiguous and
    writable (ValueError), same device as ``like`` (ValueError).  Write results into
    ``t.data`` (directly, or with ``copy_into``) and return ``t.source``.
    """
    fw = _framework_of(out)
    if fw == "jax":
        raise TypeError(
            f"argument '{name}': JAX arrays are immutable, so out= cannot be a JAX array; "
            "omit out= and use the returned array"
        )
    t = import_array(out, name=name)
    if t.dtype != dtype:
        try:
            logical = resolve_logical(t.dtype, dtype, name=name)
        except TypeError:
            logical = None
        if logical != dtype:
            raise TypeError(f"argument '{name}': expected dtype {dtype}, got {t.dtype}")
        t = import_array(t, name=name, dtype=dtype)
    shape = tuple(int(n) for n in shape)
    if t.shape != shape:
        raise ValueError(f"argument '{name}': expected shape {shape}, got {t.shape}")
    if isinstance(t.data, np.ndarray) and not t.data.flags.writeable:
        raise ValueError(f"argument '{name}': expected a writable array, got a read-only one")
    if like is not None and like.device != t.device:
        ref = like_name if like_name is not None else like.name
        raise ValueError(
            f"argument '{name}' is on {device_str(t.device)}, expected "
            f"{device_str(like.device)} like '{ref}'"
        )
    return t


def copy_into(dst: Tensor, src, *, like: Tensor | None = None):
    """Copy ``src`` (NumPy/CuPy, physical or host-logical dtype) into ``dst.data``; return
    ``dst.source`` (the caller's out= object).

    Device destination: ordered on ``dst``'s stream, no host sync.  Host destination from a
    device ``src``: blocking copy ordered on ``like``'s stream (the stream ``src`` was computed
    on; CuPy's current stream when ``like`` is None or on the host).
    """
    if _is_cupy(src):
        src = as_physical(src, dst.dtype)
    elif isinstance(src, np.ndarray):
        src = as_physical(src, dst.dtype)
    else:
        raise TypeError(f"copy_into: expected a NumPy or CuPy array, got {_type_name(src)}")
    if tuple(src.shape) != dst.shape:
        raise ValueError(f"copy_into: expected shape {dst.shape}, got {tuple(src.shape)}")
    if dst.is_device:
        with device_scope(dst) as s:
            if _is_cupy(src):
                if src.device.id != dst.device:
                    raise ValueError(
                        f"copy_into: source is on cuda:{src.device.id}, destination on "
                        f"{device_str(dst.device)}"
                    )
                _cupy().copyto(dst.data, src)
            elif src.size:
                dst.data.set(np.ascontiguousarray(src), stream=s)
    else:
        if _is_cupy(src):
            src = _device_to_host(src, like)
        np.copyto(dst.data, src)
    return dst.source
