"""Logical vs physical dtypes (docs/internals.md, "Physical vs logical dtypes").

A *logical* dtype is a plain string naming what the numbers mean; the *physical* dtype is the
NumPy/CuPy dtype the bits are stored in.  Only fp8 e4m3 and bf16 differ: they are stored as their
bit patterns (``uint8`` / ``uint16``) on the device and in adapter-internal host arrays, and
``host_logical`` reinterprets host storage as the ``ml_dtypes`` type for the NumPy reference.
Nothing here converts values: every change of dtype is a zero-copy view of the same bytes.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

FLOAT8 = "float8_e4m3fn"
BFLOAT16 = "bfloat16"

#: Every logical dtype ``import_array`` accepts.  Callers narrow this per argument with
#: ``check_dtype`` (``uint8``/``uint16``/``int64`` exist so that callers can reject them with a
#: precise message, or convert index arrays themselves).
SUPPORTED_DTYPES = (FLOAT8, BFLOAT16, "float16", "float32", "int32", "int64", "uint8", "uint16")
#: The dtypes SPEC.md allows for ``q`` and ``k``.
FLOAT_DTYPES = (FLOAT8, BFLOAT16, "float16", "float32")
#: The dtype of ``ks``, ``ke`` and every index output.
INDEX_DTYPES = ("int32",)

_PHYSICAL = {
    FLOAT8: np.dtype(np.uint8),
    BFLOAT16: np.dtype(np.uint16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
}
_HOST_LOGICAL = dict(_PHYSICAL)
_HOST_LOGICAL[FLOAT8] = np.dtype(ml_dtypes.float8_e4m3fn)
_HOST_LOGICAL[BFLOAT16] = np.dtype(ml_dtypes.bfloat16)

# Storage a ``dtype=`` argument may reinterpret (same itemsize, bits taken as they are).
_STORAGE_FOR = {FLOAT8: ("uint8",), BFLOAT16: ("uint16", "int16")}


def physical_dtype(dtype: str) -> np.dtype:
    """NumPy dtype that stores logical ``dtype`` (``uint8`` for fp8, ``uint16`` for bf16)."""
    return _PHYSICAL[dtype]


def host_logical_dtype(dtype: str) -> np.dtype:
    """NumPy dtype of the logical view (``ml_dtypes`` types for fp8 and bf16)."""
    return _HOST_LOGICAL[dtype]


def dtype_name(d) -> str:
    """Canonical name of a dtype given as a string, NumPy/ml_dtypes/JAX dtype or torch.dtype.

    Returns the name even when it is not supported (``"float64"``, ``"bool"``, ...), so that
    error messages can say what was received.
    """
    if isinstance(d, str):
        if d in _PHYSICAL or d == "int16":
            return d
        try:
            return np.dtype(d).name
        except TypeError:
            return d
    mod = type(d).__module__ or ""
    if mod.startswith("torch"):
        return str(d).removeprefix("torch.")
    try:
        return np.dtype(d).name
    except TypeError:
        return str(d)


def normalize_dtype(dtype, *, name: str) -> str:
    """Validate a user-facing ``dtype=`` argument belonging to argument ``name``."""
    s = dtype_name(dtype)
    if s not in _PHYSICAL:
        raise TypeError(
            f"argument '{name}': dtype= expected one of ({', '.join(SUPPORTED_DTYPES)}), "
            f"got {dtype!r}"
        )
    return s


def resolve_logical(src: str, want, *, name: str) -> str:
    """Logical dtype of an argument whose storage dtype is ``src`` and whose ``dtype=`` is ``want``.

    Raises TypeError naming the argument for unsupported storage or an impossible ``dtype=``.
    """
    if want is None:
        if src not in _PHYSICAL:
            raise TypeError(
                f"argument '{name}': expected dtype one of ({', '.join(SUPPORTED_DTYPES)}), "
                f"got {src}"
            )
        return src
    want = normalize_dtype(want, name=name)
    if want == src or src in _STORAGE_FOR.get(want, ()):
        return want
    raise TypeError(
        f"argument '{name}': dtype='{want}' does not match the array's dtype {src} "
        f"(dtype= only reinterprets uint8 storage as float8_e4m3fn and uint16/int16 storage "
        f"as bfloat16)"
    )


def check_dtype(t, name: str, allowed) -> None:
    """Raise TypeError unless ``t.dtype`` (a Tensor's logical dtype) is one of ``allowed``."""
    allowed = tuple(allowed)
    if t.dtype in allowed:
        return
    expected = allowed[0] if len(allowed) == 1 else f"one of ({', '.join(allowed)})"
    msg = f"argument '{name}': expected dtype {expected}, got {t.dtype}"
    if t.dtype == "uint8" and FLOAT8 in allowed:
        msg += " (pass dtype='float8_e4m3fn' to reinterpret uint8 storage as fp8 e4m3)"
    elif t.dtype == "uint16" and BFLOAT16 in allowed:
        msg += " (pass dtype='bfloat16' to reinterpret uint16 storage as bf16)"
    raise TypeError(msg)


def as_physical(arr, dtype: str):
    """View a NumPy/CuPy array holding logical ``dtype`` in its physical dtype (zero-copy).

    Accepts the physical dtype itself or, for host arrays, the ml_dtypes logical dtype (what the
    NumPy reference returns).  Anything else is a TypeError.
    """
    phys = _PHYSICAL[dtype]
    if arr.dtype == phys:
        return arr
    if arr.dtype == _HOST_LOGICAL[dtype] or (
        dtype == BFLOAT16 and arr.dtype == np.dtype(np.int16)
    ):
        return arr.view(phys)
    raise TypeError(
        f"expected an array of {dtype} (stored as {phys.name}), got dtype {arr.dtype}"
    )


def host_logical(t, dtype: str | None = None) -> np.ndarray:
    """Logical NumPy view of host data (ml_dtypes float8_e4m3fn / bfloat16), zero-copy.

    ``t`` is a host Tensor, or a NumPy array in physical dtype together with ``dtype``.
    """
    if dtype is None:
        if getattr(t, "is_device", False):
            raise ValueError(
                f"host_logical: argument '{t.name}' lives on cuda:{t.device}; "
                "use to_host() first"
            )
        arr, dtype = t.data, t.dtype
    else:
        arr = t
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"host_logical: expected a NumPy array, got {type(arr).__name__}")
    return as_physical(arr, dtype).view(_HOST_LOGICAL[dtype])
