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


@pytest.fixture
def graph_case(cuda_device):
    """One hisa_select call to capture in a CUDA graph (GPU tests of the backend and of the call
    cache): torch CUDA tensors, fp8 SPEC §9 inputs with T = 64, S = 4096, block_topk 8, topk 512.

    ``.static`` (q, k, weights) and ``.out`` [64, 512] int32 are the graph's fixed tensors, ``.kw``
    the call's keywords (validate=False, out=.out), ``.stream`` a side stream ordered after the
    current one (capture needs a non-default stream). ``.replay_matches_reference(graph)`` copies
    two other input sets into ``.static`` in turn, replays the graph and checks ``.out`` against
    the reference each time (so a graph that kept its first inputs' results fails)."""
    import torch

    from hisa_cupy import reference, testing

    inputs = [testing.exact_inputs(64, 4096, 64, 128, dtype="float8_e4m3fn", seed=s) for s in (31, 32)]
    names = ("q", "k", "weights")
    ref_kw = dict(block_size=128, block_topk=8, topk=512)

    class Case:
        static = [testing.to_torch(inputs[0][n]) for n in names]
        out = torch.empty((64, 512), dtype=torch.int32, device="cuda")
        kw = dict(ref_kw, validate=False, out=out)
        stream = torch.cuda.Stream()

        @staticmethod
        def replay_matches_reference(graph):
            for data in (inputs[1], inputs[0]):
                for t, n in zip(Case.static, names):
                    t.copy_(testing.to_torch(data[n]))
                Case.out.fill_(-7)
                graph.replay()
                torch.cuda.synchronize()
                ref = reference.hisa_select(data["q"], data["k"], data["weights"], **ref_kw)
                testing.assert_selection_equal(Case.out, ref)

    Case.stream.wait_stream(torch.cuda.current_stream())
    return Case
