"""The CuPy backend's grow-only workspace, with NumPy standing in for CuPy (no GPU needed)."""
import numpy as np

from hisa_cupy.kernels import cupy_backend


def test_workspace_views_grow_and_reuse(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_cupy", lambda: np)
    ws = cupy_backend._Workspace()
    a = ws.get("keys", (4, 8), np.uint32)
    assert a.shape == (4, 8) and a.dtype == np.uint32 and ws.nbytes == 128
    assert ws.get("keys", (4, 8), np.uint32) is a  # same request: the cached view
    a[...] = 7
    b = ws.get("keys", (2, 8), np.uint32)  # smaller: same buffer, no growth
    assert ws.nbytes == 128 and np.shares_memory(a, b) and (b == 7).all()
    c = ws.get("keys", (2, 8), np.float32)  # another dtype: a new view of the same bytes
    assert c.dtype == np.float32 and np.shares_memory(b, c)
    d = ws.get("keys", (16, 8), np.uint32)  # larger: the buffer grows, the view is fresh
    assert d.shape == (16, 8) and ws.nbytes == 512 and not np.shares_memory(a, d)
    assert np.shares_memory(ws.get("keys", (4, 8), np.uint32), d)  # views follow the new buffer
    e = ws.get("other", (0,), np.int32)  # empty views are fine
    assert e.shape == (0,) and ws.nbytes == 513
