"""Shared pytest configuration.

GPU tests carry the registered ``gpu`` marker. ``make test`` (CI, no GPU) deselects them with
``-m "not gpu"``; on the device machine ``pytest -m gpu`` runs them. A ``gpu`` test that is
selected on a machine without a usable CUDA device fails instead of silently skipping.
"""
import os

import pytest


def pytest_sessionstart(session):
    """In CI the optional frameworks are installed by `make test`; a missing one would turn the
    adapter round-trip tests into silent skips, so fail loudly instead."""
    if os.environ.get("CI"):
        import importlib.util

        missing = [m for m in ("torch", "jax", "matplotlib") if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(f"CI run without test dependencies {missing}: install '.[test]' torch jax")


def _cuda_available() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.fixture(scope="session")
def cuda_device():
    """Fixture for GPU tests: fails (never skips) when no CUDA device is usable."""
    if not _cuda_available():
        pytest.fail("this test needs a CUDA GPU; deselect GPU tests with -m 'not gpu'")
    import cupy

    return cupy.cuda.Device(0)


@pytest.fixture
def launched_kernels(monkeypatch):
    """The names of the CuPy backend's kernels fetched during the test, in launch order (a list
    that fills as they launch): tests check which path a parameter took."""
    from hisa_cupy.kernels import cupy_backend

    launched = []
    kernel = cupy_backend._kernel

    def recording_kernel(filename, name, smem):
        launched.append(name)
        return kernel(filename, name, smem)

    monkeypatch.setattr(cupy_backend, "_kernel", recording_kernel)
    return launched
