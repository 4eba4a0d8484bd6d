"""The host path of a call with torch CUDA inputs, without a GPU (issue 5, target 5).

A torch.Tensor subclass that claims to live on cuda:0 (its bytes stay on the host) stands in for
a CUDA tensor, and the stream getter is replaced: import, output allocation and the choices
select.py makes around them run as they would on a GPU, down to the CuPy array over the
tensor's pointer (building one touches no device). The same paths on a real GPU are in
tests/gpu/test_adapters_gpu.py and tests/gpu/test_cupy_backend.py.
"""
import types

import numpy as np
import pytest

from hisa_cupy import adapters as ad
from hisa_cupy import select
from hisa_cupy.adapters import arrays

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on cuda:0 (the attributes the import reads)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0


def _gpu(x):
    return x.as_subclass(_OnGpu)


@pytest.fixture
def streams(monkeypatch):
    """torch's current stream on each device: 1000 + device (what the import must record)."""
    monkeypatch.setattr(arrays, "_torch_raw_stream", lambda device: 1000 + device)


@pytest.mark.parametrize("torch_dtype,logical,phys", [
    ("float8_e4m3fn", "float8_e4m3fn", np.uint8), ("bfloat16", "bfloat16", np.uint16),
    ("float16", "float16", np.float16), ("float32", "float32", np.float32), ("int32", "int32", np.int32)])
def test_torch_cuda_import_wraps_the_pointer(streams, torch_dtype, logical, phys):
    base = torch.zeros(6, 4, 8).to(getattr(torch, torch_dtype))
    x = _gpu(base[1:4])  # a storage offset
    t = ad.import_array(x, name="q")
    assert isinstance(t.data, cupy.ndarray) and t.data.dtype == phys and t.data.shape == (3, 4, 8)
    assert t.ptr == x.data_ptr() and t.data.data.mem.size == x.nbytes
    assert t.dtype == logical and t.framework == "torch" and t.device == 0 and t.stream == 1000
    assert t.source is x and t.data.data.mem._owner is x  # the tensor stays alive with the view


def test_torch_cuda_import_dtype_argument_and_errors(streams):
    t = ad.import_array(_gpu(torch.zeros(4, dtype=torch.uint8)), name="k", dtype="float8_e4m3fn")
    assert t.dtype == "float8_e4m3fn" and t.data.dtype == np.uint8
    t = ad.import_array(_gpu(torch.zeros(4, dtype=torch.int16)), name="k", dtype="bfloat16")
    assert t.dtype == "bfloat16" and t.data.dtype == np.uint16
    with pytest.raises(ValueError, match=r"argument 'k': expected a C-contiguous array .* got strides \(1, 6\)"):
        ad.import_array(_gpu(torch.zeros(4, 6)).t(), name="k")
    with pytest.raises(ValueError, match=r"argument 'k': expected a C-contiguous array"):
        ad.import_array(_gpu(torch.zeros(4, 6)[:, ::2]), name="k")
    ad.import_array(_gpu(torch.zeros(4, 1, 6)[:, :, :]), name="k")  # size-1 dims: any stride
    with pytest.raises(TypeError, match=r"argument 'q': expected dtype one of .*got float64"):
        ad.import_array(_gpu(torch.zeros(3, dtype=torch.float64)), name="q")
    with pytest.raises(TypeError, match=r"argument 'ks': expected dtype int32, got int64"):
        ad.import_array(_gpu(torch.zeros(3, dtype=torch.int64)), name="ks", allowed=("int32",))


def test_torch_stream_getter_prefers_the_raw_one_and_falls_back(monkeypatch):
    monkeypatch.setattr(arrays, "_torch_raw_stream", None)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 500 + device, raising=False)
    assert arrays._torch_stream(2) == 502
    monkeypatch.setattr(arrays, "_torch_raw_stream", None)
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=77 + device))
    assert arrays._torch_stream(1) == 78


@pytest.fixture
def torch_empty_on_gpu(monkeypatch):
    """torch.empty(device=cuda) gives a tensor that claims to be on cuda:0."""
    empty = torch.empty
    calls = []

    def fake(*shape, dtype=None, device=None):
        calls.append(device)
        return _gpu(empty(*shape, dtype=dtype))

    monkeypatch.setattr(torch, "empty", fake)
    return calls


def test_allocate_result_for_torch_on_a_gpu(streams, torch_empty_on_gpu):
    like = ad.import_array(_gpu(torch.zeros(3, 4)), name="q")
    r = ad.allocate_result((5, 6), dtype="int32", like=like)
    assert isinstance(r.source, torch.Tensor) and r.source.dtype == torch.int32 and r.source.shape == (5, 6)
    assert isinstance(r.data, cupy.ndarray) and r.data.dtype == np.int32 and r.data.shape == (5, 6)
    assert r.ptr == r.source.data_ptr() and r.data.data.mem._owner is r.source
    assert r.device == 0 and r.stream == like.stream and r.framework == "torch"
    assert torch_empty_on_gpu == [torch.device("cuda", 0)]
    fp8 = ad.allocate_result((2, 3), dtype="float8_e4m3fn", like=like)
    assert fp8.source.dtype == torch.float8_e4m3fn and fp8.data.dtype == np.uint8


def test_allocate_result_is_none_elsewhere(streams):
    host = ad.import_array(torch.zeros(3), name="q")
    assert ad.allocate_result((2,), dtype="int32", like=host) is None  # torch on the host: export as before
    assert ad.allocate_result((2,), dtype="int32", like=ad.import_array(np.zeros(3, np.float32), name="q")) is None
    fake_cupy = ad.Tensor(np.zeros(3, np.float32), "float32", "cupy", 0, 0, None, "q")
    assert ad.allocate_result((2,), dtype="int32", like=fake_cupy) is None
    copy = ad.Tensor(np.zeros(3, np.float32), "float32", "torch", 0, 0, None, "q", origin=host)
    assert ad.allocate_result((2,), dtype="int32", like=copy) is None  # a to_device copy: not the caller's


def test_exec_hands_back_the_native_output_without_export(streams, torch_empty_on_gpu, monkeypatch):
    q = ad.import_array(_gpu(torch.zeros(3, 4)), name="q")
    k = ad.import_array(_gpu(torch.zeros(5, 4)), name="k")
    ex = select._Exec("cupy", [q, k, None], ["q", "k", "out"])
    assert ex.backend == "cupy" and not ex.host and ex.stream == 1000
    assert ex.arg(q) is q.data  # device tensors go to the backend as they are
    buf = ex.output(None, (3, 2))
    assert isinstance(buf, cupy.ndarray) and buf.shape == (3, 2) and buf.dtype == np.int32

    def no_export(*a, **kw):
        raise AssertionError("export_array called")

    monkeypatch.setattr(ad, "export_array", no_export)
    res = ex.finish(buf, "int32")
    assert isinstance(res, torch.Tensor) and res.data_ptr() == buf.data.ptr and res.shape == (3, 2)


def test_exec_device_mismatch_still_names_the_argument():
    q = ad.Tensor(np.zeros(3, np.float32), "float32", "torch", 0, 5, None, "q")
    k = ad.Tensor(np.zeros(3, np.float32), "float32", "torch", 1, 5, None, "k")
    with pytest.raises(ValueError, match=r"^argument 'k' is on cuda:1, expected cuda:0 like 'q'$"):
        select._Exec("cupy", [q, None, k], ["q", "k_scale", "k"])
    h = ad.import_array(np.zeros(3, np.float32), name="w")
    with pytest.raises(ValueError, match=r"^argument 'w' is on cpu, expected cuda:0 like 'q'$"):
        select._Exec("auto", [q, h], ["q", "w"])


class _FakeStream:
    def __init__(self, ptr, log):
        self.ptr, self.log = ptr, log

    def __enter__(self):
        self.log.append(("enter stream", self.ptr))

    def __exit__(self, *exc):
        self.log.append(("exit stream", self.ptr))


def test_device_scope_enters_only_what_differs(monkeypatch):
    log = []
    state = {"device": 0, "stream": _FakeStream(0, log)}

    class Device:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            log.append(("enter device", self.d))

        def __exit__(self, *exc):
            log.append(("exit device", self.d))

    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: state["device"]), Device=Device,
                                 get_current_stream=lambda: state["stream"])
    monkeypatch.setattr(arrays, "_cupy", lambda: types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(arrays, "_cupy_stream", lambda stream, device: _FakeStream(stream, log))

    def tensor(device, stream):
        return ad.Tensor(np.zeros(1), "float32", "torch", device, stream, None, "q")

    for stream in (0, 1, None):  # the legacy default stream, as CuPy's current one: nothing to enter
        with ad.device_scope(tensor(0, stream)) as s:
            assert s is state["stream"]
    assert log == []
    with ad.device_scope(tensor(0, 1234)) as s:
        assert s.ptr == 1234
    assert log == [("enter stream", 1234), ("exit stream", 1234)]
    log.clear()
    with ad.device_scope(tensor(1, 0)):
        pass
    assert log == [("enter device", 1), ("exit device", 1)]  # the null stream is current there too
    log.clear()
    with pytest.raises(KeyError):
        with ad.device_scope(tensor(1, 99)):
            raise KeyError("inside")
    assert log == [("enter device", 1), ("enter stream", 99), ("exit stream", 99), ("exit device", 1)]
