"""hisa_cupy.adapters: interop between caller arrays and the kernels' physical arrays.

NumPy, PyTorch, JAX, CuPy (and any DLPack producer) in; the caller's own array type, device and
stream out; zero-copy wherever a view suffices.  Adapters know nothing about kernels.
See ``arrays.py`` for the import/export tables and ``dtypes.py`` for logical vs physical dtypes.
"""
from .arrays import (
    Tensor,
    allocate,
    allocate_result,
    call_signature,
    caller_stream,
    check_same_device,
    copy_into,
    device_scope,
    device_str,
    export_array,
    import_array,
    import_out,
    result_allocator,
    to_device,
    to_host,
)
from .dtypes import (
    BFLOAT16,
    FLOAT8,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    SUPPORTED_DTYPES,
    as_physical,
    check_dtype,
    host_logical,
    host_logical_dtype,
    normalize_dtype,
    physical_dtype,
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
    "check_dtype",
    "host_logical",
    "host_logical_dtype",
    "physical_dtype",
    "as_physical",
    "normalize_dtype",
    "FLOAT8",
    "BFLOAT16",
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "SUPPORTED_DTYPES",
]
