"""bench/host_profile.py on a CPU machine: its no-GPU exit and the pieces of its report (the
measurement itself runs on the device machine)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hp():
    spec = importlib.util.spec_from_file_location("bench_host_profile", ROOT / "bench" / "host_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trials_never_queue_too_many_launches(hp):
    assert hp.reps_for(6) * 6 <= hp.MAX_QUEUED_LAUNCHES and hp.reps_for(6) == hp.MAX_QUEUED_LAUNCHES // 6
    assert hp.reps_for(10_000) == 1 and hp.reps_for(0) == 2000 and hp.reps_for(0, cap=200) == 200


def test_per_call_us_and_report_rows(hp):
    calls, syncs = [], []
    med, mn = hp.per_call_us(lambda: calls.append(1), reps=5, trials=3, sync=lambda: syncs.append(1))
    assert len(calls) == 15 and len(syncs) == 4 and 0 <= mn <= med
    text = hp.format_rows([("import q", 1.5, 1.25, 0, ""), ("backend", 20.0, 19.0, 6, "note")], total_us=30.0)
    assert "import q" in text and "20.00" in text and "note" in text and "(full call)" in text


def test_without_gpu_it_says_so(hp, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would measure")
    assert hp.main(["--trials", "1"]) == 0
    assert "no usable CUDA GPU" in capsys.readouterr().out


def test_launches_are_counted_on_both_paths(hp):
    # the full path fetches each launch's kernel through _kernel; the fast path (bound plans)
    # launches through _launch_kernel: both are counted, and both are put back afterwards
    import types

    calls = []
    kernel = lambda *a: calls.append(("kernel", a)) or (lambda *b: None)  # noqa: E731
    launch = lambda *a: calls.append(("launch", a))  # noqa: E731
    cb = types.SimpleNamespace(_kernel=kernel, _launch_kernel=launch)

    def call():
        cb._kernel("pool.cu", "pool_kernel", 0)
        for _ in range(5):
            cb._launch_kernel(1, 1, 1, 1, 128, 1, 1, 0, 0, 0, 0)

    assert hp._count_launches(cb, call) == 6
    assert cb._kernel is kernel and cb._launch_kernel is launch and len(calls) == 6
    unresolved = types.SimpleNamespace(_kernel=kernel, _launch_kernel=None, _driver_launch=lambda: launch)
    assert hp._count_launches(unresolved, lambda: unresolved._launch_kernel(0)) == 1
    assert unresolved._launch_kernel is None  # left as it was (resolved on first real use)
