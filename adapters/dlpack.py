"""DLPack helpers: a producer wrapper that fixes the stream and can reinterpret the element type.

CuPy and NumPy reject DLPack capsules of fp8 (and CuPy of bf16) and JAX has no zero-copy
``view(dtype)``.  DLPack is a stable C ABI, so the element type of a capsule that has not been
consumed yet can be rewritten in place (same bit width, one lane): the consumer then imports the
same memory under another type.  Only the type code changes; the data pointer, shape, strides,
device and the producer's deleter are untouched, so ownership and lifetime stay exactly those of
the producer's capsule.

``DLPackView(obj, stream=..., retype=...)`` wraps any DLPack producer:

* ``stream``: the value passed to ``obj.__dlpack__(stream=...)`` whatever the consumer asks for
  (DLPack convention: ``None`` = no stream / host, ``1`` = legacy default stream, ``-1`` = no
  synchronisation, other ints = a ``cudaStream_t``).  Left out, the consumer's value is used.
* ``retype=(from_codes, to_code, bits)``: rewrite the capsule's dtype code when it is one of
  ``from_codes`` with ``bits`` bits and one lane; anything else raises BufferError.
"""
from __future__ import annotations

import ctypes

# DLDataTypeCode values (dlpack.h, DLPack 1.1).
DL_INT = 0
DL_UINT = 1
DL_FLOAT = 2
DL_BFLOAT = 4
DL_FLOAT8_E4M3FN = 10

# DLDeviceType values.
DL_CPU = 1
DL_CUDA = 2
DL_CUDA_HOST = 3
DL_ROCM = 10

#: import: fp8 / bf16 capsule -> unsigned integer of the same width (CuPy/NumPy accept those)
TO_UINT8 = ((DL_FLOAT8_E4M3FN,), DL_UINT, 8)
TO_UINT16 = ((DL_BFLOAT,), DL_UINT, 16)
#: export: uint8 / uint16 capsule -> fp8 e4m3fn / bf16 (JAX accepts those)
TO_FLOAT8 = ((DL_UINT, DL_INT), DL_FLOAT8_E4M3FN, 8)
TO_BFLOAT16 = ((DL_UINT, DL_INT), DL_BFLOAT, 16)

_api = ctypes.pythonapi
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

# Offset of DLTensor inside the managed struct:
#   DLManagedTensor          { DLTensor dl_tensor; ... }                          -> 0
#   DLManagedTensorVersioned { DLPackVersion (2 x u32); void *manager_ctx;
#                              void (*deleter)(...); uint64 flags; DLTensor dl_tensor } -> 32
# and of DLDataType inside DLTensor: { void *data; DLDevice (2 x i32); int32 ndim; DLDataType }
#   -> 8 + 8 + 4 = 20, DLDataType = { uint8 code; uint8 bits; uint16 lanes }.
_TENSOR_OFFSET = {b"dltensor": 0, b"dltensor_versioned": 32}
_DTYPE_OFFSET = 20

_KEEP = object()


def capsule_dtype(capsule) -> tuple[int, int, int]:
    """(code, bits, lanes) of an unconsumed DLPack capsule."""
    addr = _dtype_address(capsule)
    return (
        ctypes.c_uint8.from_address(addr).value,
        ctypes.c_uint8.from_address(addr + 1).value,
        ctypes.c_uint16.from_address(addr + 2).value,
    )


def _dtype_address(capsule) -> int:
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        raise BufferError("DLPack retyping needs a 64-bit platform")
    name = _api.PyCapsule_GetName(capsule)
    if name not in _TENSOR_OFFSET:
        raise BufferError(f"not an unconsumed DLPack capsule (name {name!r})")
    ptr = _api.PyCapsule_GetPointer(capsule, name)
    if not ptr:
        raise BufferError("DLPack capsule holds a NULL pointer")
    return ptr + _TENSOR_OFFSET[name] + _DTYPE_OFFSET


def retype_capsule(capsule, retype) -> None:
    """Rewrite the element type code of an unconsumed capsule (see module docstring)."""
    from_codes, to_code, bits = retype
    addr = _dtype_address(capsule)
    code, got_bits, lanes = capsule_dtype(capsule)
    if code not in from_codes or got_bits != bits or lanes != 1:
        raise BufferError(
            f"cannot reinterpret DLPack dtype (code={code}, bits={got_bits}, lanes={lanes}) "
            f"as (code={to_code}, bits={bits})"
        )
    ctypes.c_uint8.from_address(addr).value = to_code


class DLPackView:
    """DLPack producer wrapper: fixed ``stream`` and optional in-place dtype reinterpretation."""

    __slots__ = ("obj", "stream", "retype")

    def __init__(self, obj, *, stream=_KEEP, retype=None):
        self.obj = obj
        self.stream = stream
        self.retype = retype

    def __dlpack_device__(self):
        return self.obj.__dlpack_device__()

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        s = stream if self.stream is _KEEP else self.stream
        try:
            capsule = self.obj.__dlpack__(stream=s, max_version=max_version)
        except TypeError:  # producers older than the DLPack 1.0 Python spec
            capsule = self.obj.__dlpack__(stream=s)
        if self.retype is not None:
            retype_capsule(capsule, self.retype)
        return capsule


def dlpack_stream_arg(stream: int | None) -> int | None:
    """Map a raw ``cudaStream_t`` handle to the value the DLPack ``stream=`` argument expects
    (``0``, the legacy default stream, is spelled ``1`` in DLPack)."""
    if stream is None:
        return None
    return 1 if stream == 0 else int(stream)
