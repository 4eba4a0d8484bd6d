"""GPU tests of hisa_cupy.adapters: torch CUDA / JAX GPU / CuPy import and export, streams.

Run on the device machine with ``pytest -m gpu tests/gpu/test_adapters_gpu.py``.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hisa_cupy import adapters as ad  # noqa: E402

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
TORCH = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int32": torch.int32,
}
NP_LOGICAL = {
    "float8_e4m3fn": np.dtype(FP8),
    "bfloat16": np.dtype(BF16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
}
PHYS = {"float8_e4m3fn": np.uint8, "bfloat16": np.uint16, "float16": np.float16,
        "float32": np.float32, "int32": np.int32}


def _values(shape, logical, seed=0):
    rng = np.random.default_rng(seed)
    v = np.asarray(rng.integers(-8, 9, size=shape)).astype(np.float32) / 2
    return np.asarray(v).astype(NP_LOGICAL[logical])


def _torch_cuda(ref, logical):
    return torch.from_numpy(np.asarray(ref).astype(np.float32)).to(TORCH[logical]).cuda()


def _bits(x):
    """Host copy of a torch tensor's bit pattern, in our physical dtype."""
    if x.dtype == torch.float8_e4m3fn:
        return x.view(torch.uint8).cpu().numpy()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy()


def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        devs = jax.devices("gpu")
    except RuntimeError as e:
        pytest.skip(f"JAX has no GPU backend here: {e}")
    return jax, devs[0]


# ----------------------------------------------------------------------------------- torch


@pytest.mark.parametrize("logical", list(TORCH))
def test_torch_cuda_import_is_zero_copy(cuda_device, logical):
    ref = _values((4, 3, 8), logical)
    x = _torch_cuda(ref, logical)
    t = ad.import_array(x, name="q")
    assert isinstance(t.data, cupy.ndarray)
    assert t.data.data.ptr == x.data_ptr() and t.ptr == x.data_ptr()
    assert t.data.dtype == PHYS[logical] and t.dtype == logical
    assert t.framework == "torch" and t.device == x.device.index and t.is_device
    assert t.stream == torch.cuda.current_stream().cuda_stream
    np.testing.assert_array_equal(cupy.asnumpy(t.data), _bits(x))
    y = ad.export_array(t.data, dtype=logical, like=t)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device
    assert y.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("logical", ["float8_e4m3fn", "bfloat16", "float32", "int32"])
def test_torch_cuda_export_of_cupy_result_is_zero_copy(cuda_device, logical):
    x = _torch_cuda(np.zeros(2), logical)
    t = ad.import_array(x, name="q")
    with ad.device_scope(t):
        r = cupy.asarray(_values((5, 6), logical).view(PHYS[logical]))
    y = ad.export_array(r, dtype=logical, like=t)
    assert y.dtype == TORCH[logical] and y.data_ptr() == r.data.ptr
    np.testing.assert_array_equal(_bits(y), cupy.asnumpy(r))


def test_torch_default_stream_maps_to_cupy_null_stream(cuda_device):
    x = torch.ones(4, device="cuda")
    t = ad.import_array(x, name="q")
    assert t.stream == 0
    with ad.device_scope(t) as s:
        assert cupy.cuda.get_current_stream().ptr == 0
        assert s.ptr == 0


@pytest.fixture(params=["pointer", "dlpack"])
def torch_import_path(request, monkeypatch):
    """Both torch CUDA import paths (data_ptr wrap, the default, and cupy.from_dlpack)."""
    from hisa_cupy.adapters import arrays

    monkeypatch.setattr(arrays, "_TORCH_VIA_DLPACK", request.param == "dlpack")
    return request.param


def test_torch_cuda_import_paths_agree(cuda_device, torch_import_path):
    base = torch.arange(64, dtype=torch.float32, device="cuda").reshape(8, 8)
    x = base[2:5]  # storage offset
    t = ad.import_array(x, name="k")
    assert t.ptr == x.data_ptr() and t.shape == (3, 8) and t.data.device.id == 0
    np.testing.assert_array_equal(cupy.asnumpy(t.data), x.cpu().numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        ad.import_array(base[:, ::2], name="k")


def test_torch_cuda_import_keeps_the_memory_alive(cuda_device, torch_import_path):
    x = torch.full((1 << 20,), 5.0, device="cuda")
    t = ad.import_array(x, name="q")
    ptr = x.data_ptr()
    del x
    y = torch.full((1 << 20,), 7.0, device="cuda")  # would reuse the block if it were freed
    assert y.data_ptr() != ptr
    assert float(t.data[0]) == 5.0 and float(t.data[-1]) == 5.0


def test_torch_non_default_stream_is_honoured(cuda_device, torch_import_path):
    """Work queued on a non-blocking torch stream must be ordered with our CuPy work.

    The tensor is filled only after a long spin on the caller's stream; CuPy work on any other
    stream would read zeros (checked once by launching on the legacy stream: 3 of 3 wrong).
    """
    s = torch.cuda.Stream()
    n = 1 << 22
    with torch.cuda.stream(s):
        x = torch.zeros(n, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on s
        x.fill_(1.0)
        t = ad.import_array(x, name="q")
        assert t.stream == s.cuda_stream != 0
        with ad.device_scope(t):
            assert cupy.cuda.get_current_stream().ptr == s.cuda_stream
            r = t.data * 2 + 1
        y = ad.export_array(r, dtype="float32", like=t)
        z = y + 0
    s.synchronize()
    assert y.data_ptr() == r.data.ptr
    assert bool((z == 3).all())


def test_torch_bf16_fp8_on_non_default_stream_round_trip(cuda_device):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for logical in ("float8_e4m3fn", "bfloat16"):
            ref = _values((3, 16), logical)
            x = _torch_cuda(ref, logical)
            t = ad.import_array(x, name="k")
            assert t.stream == s.cuda_stream
            y = ad.export_array(t.data, dtype=logical, like=t)
            assert y.dtype == x.dtype and y.data_ptr() == x.data_ptr()
    s.synchronize()


def test_torch_cuda_uint8_with_dtype(cuda_device):
    x = torch.tensor([0, 56, 64, 200], dtype=torch.uint8, device="cuda")
    t = ad.import_array(x, name="k", dtype="float8_e4m3fn")
    assert t.dtype == "float8_e4m3fn" and t.ptr == x.data_ptr()
    y = ad.export_array(t.data, dtype=t.dtype, like=t)
    assert y.dtype == torch.float8_e4m3fn and torch.equal(y.view(torch.uint8), x)


def test_torch_cuda_errors(cuda_device):
    with pytest.raises(ValueError, match=r"argument 'k': expected a C-contiguous array"):
        ad.import_array(torch.zeros(4, 6, device="cuda").t(), name="k")
    with pytest.raises(TypeError, match=r"argument 'q': expected dtype one of .*got float64"):
        ad.import_array(torch.zeros(3, device="cuda", dtype=torch.float64), name="q")
    q = ad.import_array(torch.zeros(3, device="cuda"), name="q")
    k = ad.import_array(torch.zeros(3), name="k")
    with pytest.raises(ValueError, match=r"^argument 'k' is on cpu, expected cuda:0 like 'q'$"):
        ad.check_same_device([q, k], ["q", "k"])
    with pytest.raises(ValueError, match=r"^argument 'out' is on cpu, expected cuda:0 like 'q'$"):
        ad.import_out(torch.zeros(2, 2, dtype=torch.int32), shape=(2, 2), dtype="int32", like=q)


def test_torch_cuda_zero_size(cuda_device):
    x = torch.zeros(0, 8, dtype=torch.bfloat16, device="cuda")
    t = ad.import_array(x, name="k")
    assert t.shape == (0, 8) and t.data.dtype == np.uint16 and t.is_device
    y = ad.export_array(t.data, dtype="bfloat16", like=t)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16 and y.is_cuda


def test_torch_cuda_out(cuda_device):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        q = ad.import_array(torch.zeros(3, device="cuda"), name="q")
        out = torch.full((3, 4), -7, dtype=torch.int32, device="cuda")
        t = ad.import_out(out, shape=(3, 4), dtype="int32", like=q)
        assert t.ptr == out.data_ptr() and t.stream == s.cuda_stream
        res = np.arange(12, dtype=np.int32).reshape(3, 4)
        assert ad.copy_into(t, res) is out  # host -> device on the caller's stream
        got1 = out.clone()
        with ad.device_scope(t):
            ad.copy_into(t, cupy.asarray(res) * 2)
        got2 = out.clone()
    s.synchronize()
    np.testing.assert_array_equal(got1.cpu().numpy(), res)
    np.testing.assert_array_equal(got2.cpu().numpy(), res * 2)


def test_to_host_and_back_for_a_torch_cuda_caller(cuda_device):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ref = _values((4, 5), "float8_e4m3fn")
        x = _torch_cuda(ref, "float8_e4m3fn")
        t = ad.import_array(x, name="q")
        h = ad.to_host(t)
        assert not h.is_device and h.origin is t and h.framework == "torch"
        np.testing.assert_array_equal(ad.host_logical(h).astype(np.float32), ref.astype(np.float32))
        res = (ad.host_logical(h).astype(np.float32) * 2).astype(FP8)  # "numpy backend" result
        y = ad.export_array(res, dtype="float8_e4m3fn", like=h)
        assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == torch.float8_e4m3fn
        z = y.float()
    s.synchronize()
    np.testing.assert_array_equal(z.cpu().numpy(), ref.astype(np.float32) * 2)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_to_device_and_back_for_a_host_caller(cuda_device, framework):
    ref = _values((3, 7), "bfloat16")
    x = ref if framework == "numpy" else torch.from_numpy(ref.astype(np.float32)).to(torch.bfloat16)
    t = ad.import_array(x, name="k")
    d = ad.to_device(t)
    assert d.is_device and d.device == 0 and d.framework == framework and d.origin is t
    assert isinstance(d.data, cupy.ndarray) and d.data.dtype == np.uint16
    with ad.device_scope(d):
        r = d.data.copy()
    y = ad.export_array(r, dtype="bfloat16", like=d)  # goes back to the host caller
    if framework == "numpy":
        assert type(y) is np.ndarray and y.dtype == BF16
        np.testing.assert_array_equal(y.astype(np.float32), ref.astype(np.float32))
    else:
        assert isinstance(y, torch.Tensor) and y.device.type == "cpu" and y.dtype == torch.bfloat16
        np.testing.assert_array_equal(y.float().numpy(), ref.astype(np.float32))
    a = ad.allocate((2, 3), dtype="float8_e4m3fn", like=d)
    assert isinstance(a, cupy.ndarray) and a.dtype == np.uint8


def test_second_gpu_if_present(cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU only")
    x = torch.ones(3, device="cuda:1")
    t = ad.import_array(x, name="k")
    assert t.device == 1 and t.data.device.id == 1 and t.ptr == x.data_ptr()
    assert t.stream == torch.cuda.current_stream(1).cuda_stream
    q = ad.import_array(torch.ones(3, device="cuda:0"), name="q")
    with pytest.raises(ValueError, match=r"^argument 'k' is on cuda:1, expected cuda:0 like 'q'$"):
        ad.check_same_device([q, t], ["q", "k"])
    y = ad.export_array(t.data * 1, dtype="float32", like=t)
    assert y.device == x.device


# ----------------------------------------------------------------------------------- CuPy


def test_cupy_inputs_are_used_directly(cuda_device):
    x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t = ad.import_array(x, name="q")
    assert t.data is x and t.framework == "cupy" and t.device == 0
    assert t.stream == cupy.cuda.get_current_stream().ptr
    assert ad.export_array(x, dtype="float32", like=t) is x
    with cupy.cuda.Stream(non_blocking=True) as s:
        t2 = ad.import_array(x, name="q")
        assert t2.stream == s.ptr
    with ad.device_scope(t2):
        assert cupy.cuda.get_current_stream().ptr == s.ptr
    b = cupy.zeros(5, cupy.uint8)
    tb = ad.import_array(b, name="k", dtype="float8_e4m3fn")
    assert tb.dtype == "float8_e4m3fn" and tb.data is b
    out = ad.export_array(b, dtype="float8_e4m3fn", like=tb)
    assert out.dtype == np.uint8 and out.data.ptr == b.data.ptr  # CuPy has no fp8 dtype
    with pytest.raises(ValueError, match="C-contiguous"):
        ad.import_array(x.T, name="k")
    with pytest.raises(TypeError, match="got float64"):
        ad.import_array(cupy.zeros(3), name="q")


def test_cupy_out_and_numpy_export_for_cupy_caller(cuda_device):
    x = cupy.zeros((2, 3), cupy.int32)
    t = ad.import_out(x, shape=(2, 3), dtype="int32")
    assert t.data is x
    y = ad.export_array(np.ones((2, 3), np.int32), dtype="int32", like=t)  # host result
    assert isinstance(y, cupy.ndarray) and int(y.sum()) == 6


# ----------------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("logical", list(TORCH))
def test_jax_gpu_import_export_zero_copy(cuda_device, logical):
    jax, dev = _jax_gpu()
    ref = _values((4, 3, 8), logical)
    x = jax.device_put(ref, dev)
    t = ad.import_array(x, name="q")
    assert isinstance(t.data, cupy.ndarray) and t.data.dtype == PHYS[logical]
    assert t.framework == "jax" and t.device == dev.local_hardware_id
    assert t.ptr == x.unsafe_buffer_pointer()
    assert isinstance(t.stream, int)
    with ad.device_scope(t):
        got = cupy.asnumpy(t.data)
    np.testing.assert_array_equal(got, ref.view(PHYS[logical]))
    y = ad.export_array(t.data, dtype=logical, like=t)
    assert isinstance(y, jax.Array) and y.dtype == x.dtype
    assert list(y.devices())[0] == dev
    assert y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(y).astype(np.float32), ref.astype(np.float32))


def test_jax_gpu_async_producer_and_consumer_are_ordered(cuda_device):
    """A JAX result still being computed is imported, transformed by CuPy and handed back."""
    jax, dev = _jax_gpu()
    import jax.numpy as jnp

    a = jax.device_put(np.ones((2048, 2048), np.float32), dev)
    x = (a @ a @ a)[:4, :8].astype(jnp.bfloat16)  # async dispatch: likely not ready yet
    t = ad.import_array(x, name="q")
    with ad.device_scope(t):
        r = (t.data.view(cupy.uint16) & 0xFFFF).astype(cupy.uint16)  # identity on the bits
    y = ad.export_array(r, dtype="bfloat16", like=t)
    z = (y.astype(jnp.float32) + 1).block_until_ready()
    assert y.dtype == jnp.bfloat16
    assert float(z[0, 0]) == 2048.0 * 2048.0 + 1
    np.testing.assert_array_equal(np.asarray(y).astype(np.float32),
                                  np.asarray(x).astype(np.float32))


def test_jax_gpu_zero_size_and_out_rejected(cuda_device):
    jax, dev = _jax_gpu()
    x = jax.device_put(np.zeros((0, 4), FP8), dev)
    t = ad.import_array(x, name="k")
    assert t.shape == (0, 4) and t.data.dtype == np.uint8
    y = ad.export_array(t.data, dtype="float8_e4m3fn", like=t)
    assert y.shape == (0, 4) and list(y.devices())[0] == dev
    with pytest.raises(TypeError, match="JAX arrays are immutable"):
        ad.import_out(jax.device_put(np.zeros((2, 2), np.int32), dev), shape=(2, 2), dtype="int32")
