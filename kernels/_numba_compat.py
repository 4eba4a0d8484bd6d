"""The one guarded place where hisa_cupy imports Numba (CUDA target or CUDA simulator).

Why this module exists
----------------------
NumPy 2.5 removed ``np.row_stack`` (deprecated alias of ``np.vstack`` since NumPy 2.0).
numba-cuda 0.30.4 still registers an overload for it when its array-function module is
imported (``numba/cuda/np/arrayobj.py``: ``if numpy_version >= (2, 0):
overload(np.row_stack)(...)``), which raises ``AttributeError`` on NumPy >= 2.5 the first time a
kernel is compiled. Numba itself (0.68.1) already guards the same line with a version check.

The fix below restores the alias *only when it is missing*, before ``numba.cuda`` is imported, so
the overload registration finds a function and nothing else changes (``np.row_stack`` and
``np.vstack`` are the same operation). Remove it once the minimum numba-cuda in pyproject.toml
guards that registration itself (check ``numba/cuda/np/arrayobj.py`` of the pinned release for a
``numpy_version < (2, 5)`` condition, as numba 0.68.1 has in ``numba/np/arrayobj.py``).
Verified: with NumPy 2.5.2 + numba-cuda 0.30.4 on an H200 every backend kernel compiles and runs.

Every hisa_cupy module that needs Numba imports it from here:
``from ._numba_compat import numba, cuda, SIMULATOR``. If another library imports and compiles
with ``numba.cuda`` before hisa_cupy is imported, the alias is still set in time as long as no
CUDA kernel was compiled yet (``numba/cuda/np/arrayobj.py`` is imported lazily, when the CUDA
target is first initialised for a compilation, not by ``import numba.cuda``).

Under the simulator this module also makes static ``cuda.shared.array`` allocation thread-safe
(a race in numba-cuda 0.30.4's simulator, see ``_make_simulator_shared_arrays_thread_safe``).

``SIMULATOR`` is True when Numba runs its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` at the time
``numba.cuda`` was first imported): kernels then run as Python on host NumPy arrays.
"""
from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):  # NumPy >= 2.5: see the module docstring
    np.row_stack = np.vstack

import numba  # noqa: E402  (must come after the alias above)
from numba import cuda  # noqa: E402

try:  # numba-cuda keeps its own copy of the configuration
    from numba.cuda.core import config as _config
except ImportError:  # pragma: no cover - Numba's built-in CUDA target
    from numba.core import config as _config

SIMULATOR = bool(_config.ENABLE_CUDASIM)


def _make_simulator_shared_arrays_thread_safe():
    """Fix a race in the CUDA simulator of numba-cuda 0.30.4 (only used when SIMULATOR).

    The simulator runs every CUDA thread of a block as a Python thread. ``cuda.shared.array``
    (static size) looks its array up in a per-launch dict keyed by the calling source line and
    creates it when missing, without a lock: two threads can both miss, each create an array and
    one of them then computes on a private copy of "shared" memory. Kernels that are correct on a
    GPU then give wrong, non-deterministic results under the simulator (seen in the hisa_cupy
    simulator tests about once per few hundred launches with a short GIL switch interval).
    The replacement below does the same lookup under a lock (and without the original's costly
    ``traceback.extract_stack``). Applied only when the installed simulator has the unlocked
    implementation; remove when the pinned numba-cuda locks it itself.
    """
    import inspect
    import sys
    import threading

    try:
        from numba.cuda.simulator import kernelapi
        from numba.cuda.np import numpy_support
        from numba.cuda import types as _types
    except ImportError:  # pragma: no cover - another simulator layout: leave it alone
        return
    cls = kernelapi.FakeCUDAShared
    original = cls.array
    if getattr(original, "_hisa_thread_safe", False):
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):  # pragma: no cover
        return
    if "self._allocations.get(caller)" not in source or "Lock" in source:
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # errors and dynamic shared memory: unchanged
            return original(self, shape, dtype, alignment)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)  # the key the original uses
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                if isinstance(dtype, _types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    array._hisa_thread_safe = True
    array.__doc__ = original.__doc__
    cls.array = array


if SIMULATOR:
    _make_simulator_shared_arrays_thread_safe()

__all__ = ["numba", "cuda", "SIMULATOR"]
