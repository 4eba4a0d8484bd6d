"""Device-array stand-ins for the CPU tests of the CuPy backend: NumPy arrays that also carry
CuPy's ``.data.ptr`` (their own host address), which is all the backend reads from a CuPy array
when it builds kernel arguments. Imported by test modules (``tests/`` is on ``sys.path`` under
pytest's default import mode)."""
import types

import numpy as np


class PointerArray(np.ndarray):
    """NumPy array with CuPy's ``.data.ptr``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def pointer_array(shape, dtype):
    """Zeros of ``shape`` and ``dtype`` as a :class:`PointerArray`."""
    return np.zeros(shape, dtype).view(PointerArray)
