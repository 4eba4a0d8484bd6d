"""CPU tests of hisa_cupy.adapters: zero-copy import, export back to the caller's type, errors.

GPU paths (torch CUDA, JAX GPU, CuPy) are in tests/gpu/test_adapters_gpu.py.
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisa_cupy import adapters as ad
from hisa_cupy.adapters import dlpack as dl

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

CPU = jax.devices("cpu")[0]
FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16

# logical dtype -> (ml_dtypes/numpy dtype, physical numpy dtype, torch dtype)
CASES = {
    "float8_e4m3fn": (np.dtype(FP8), np.uint8, torch.float8_e4m3fn),
    "bfloat16": (np.dtype(BF16), np.uint16, torch.bfloat16),
    "float16": (np.dtype(np.float16), np.float16, torch.float16),
    "float32": (np.dtype(np.float32), np.float32, torch.float32),
    "int32": (np.dtype(np.int32), np.int32, torch.int32),
}


def _values(shape, logical, seed=0):
    """Exactly representable values (so fp8/bf16 round trips are bit-exact)."""
    rng = np.random.default_rng(seed)
    v = np.asarray(rng.integers(-8, 9, size=shape)).astype(np.float32) / 2
    return np.asarray(v).astype(CASES[logical][0])


def _jcpu(a):
    """A JAX array on the CPU (the default device may be a GPU on the device machine)."""
    return jax.device_put(np.asarray(a), CPU)


def _ptr(a):
    return a.__array_interface__["data"][0]


# ----------------------------------------------------------------------------------- NumPy


@pytest.mark.parametrize("logical", list(CASES))
def test_numpy_import_is_zero_copy_and_round_trips(logical):
    a = _values((3, 4, 5), logical)
    t = ad.import_array(a, name="q")
    assert t.dtype == logical
    assert t.framework == "numpy" and t.device == "cpu" and t.stream is None
    assert not t.is_device
    assert t.shape == (3, 4, 5) and t.ndim == 3 and t.size == 60
    assert t.data.dtype == CASES[logical][1]  # physical
    assert np.shares_memory(t.data, a) and t.ptr == _ptr(a)
    assert t.source is a
    lv = ad.host_logical(t)
    assert lv.dtype == CASES[logical][0]
    assert np.shares_memory(lv, a)
    np.testing.assert_array_equal(lv.astype(np.float32), a.astype(np.float32))
    out = ad.export_array(t.data, dtype=logical, like=t)
    assert type(out) is np.ndarray and out.dtype == CASES[logical][0]
    assert np.shares_memory(out, a)
    np.testing.assert_array_equal(out.astype(np.float32), a.astype(np.float32))


def test_numpy_uint8_with_dtype_is_fp8_view():
    a = _values((4, 8), "float8_e4m3fn").view(np.uint8)
    t = ad.import_array(a, name="k", dtype="float8_e4m3fn")
    assert t.dtype == "float8_e4m3fn" and t.data.dtype == np.uint8
    assert t.data is a or np.shares_memory(t.data, a)
    np.testing.assert_array_equal(ad.host_logical(t).view(np.uint8), a)
    out = ad.export_array(t.data, dtype=t.dtype, like=t)
    assert out.dtype == FP8 and np.shares_memory(out, a)
    # without dtype= it stays uint8 and callers can reject it with a hint
    t8 = ad.import_array(a, name="k")
    assert t8.dtype == "uint8"
    with pytest.raises(TypeError, match=r"argument 'k': expected dtype one of .*got uint8 .*dtype='float8_e4m3fn'"):
        ad.check_dtype(t8, "k", ad.FLOAT_DTYPES)


@pytest.mark.parametrize("storage", [np.uint16, np.int16])
def test_numpy_16bit_storage_with_dtype_is_bf16_view(storage):
    a = _values((5, 3), "bfloat16").view(storage)
    t = ad.import_array(a, name="q", dtype="bfloat16")
    assert t.dtype == "bfloat16" and t.data.dtype == np.uint16 and np.shares_memory(t.data, a)
    np.testing.assert_array_equal(ad.host_logical(t).astype(np.float32),
                                  a.view(BF16).astype(np.float32))


def test_dtype_argument_accepts_dtype_objects():
    a = _values((2, 2), "float8_e4m3fn")
    assert ad.import_array(a, name="q", dtype=FP8).dtype == "float8_e4m3fn"
    assert ad.import_array(a.view(np.uint8), name="q", dtype=torch.float8_e4m3fn).dtype == "float8_e4m3fn"
    assert ad.import_array(np.zeros(2, np.float32), name="w", dtype=np.float32).dtype == "float32"
    assert ad.import_array(np.zeros(2, np.float32), name="w", dtype="float32").dtype == "float32"


def test_numpy_subclass_and_zero_size_and_scalar_shapes():
    class Sub(np.ndarray):
        pass

    m = np.zeros((2, 3), np.float32).view(Sub)
    t = ad.import_array(m, name="w")
    assert type(t.data) is np.ndarray and np.shares_memory(t.data, m)
    z = np.zeros((0, 64, 128), np.float32)
    tz = ad.import_array(z, name="q")
    assert tz.shape == (0, 64, 128) and tz.size == 0
    z2 = np.zeros((4, 0), np.float32)[:, ::2]  # odd strides but empty: fine
    assert ad.import_array(z2, name="k").shape == (4, 0)
    s = ad.import_array(np.ones((), np.float32), name="s")
    assert s.shape == () and s.ndim == 0


def test_size_one_dims_with_any_stride_are_contiguous():
    base = np.zeros((4, 6), np.float32)
    col = base[:, 2:3]  # shape (4, 1), strides (24, 4): not contiguous (rows 24 bytes apart)
    with pytest.raises(ValueError, match="C-contiguous"):
        ad.import_array(col, name="k")
    row = base[1:2, :]  # shape (1, 6): contiguous whatever the first stride
    assert ad.import_array(row, name="k").shape == (1, 6)
    one = np.lib.stride_tricks.as_strided(base, shape=(1, 6), strides=(999 * 4, 4))
    assert ad.import_array(one, name="k").shape == (1, 6)


# ----------------------------------------------------------------------------------- torch


@pytest.mark.parametrize("logical", list(CASES))
def test_torch_cpu_import_is_zero_copy_and_round_trips(logical):
    ref = _values((3, 4, 5), logical)
    x = torch.from_numpy(ref.astype(np.float32)).to(CASES[logical][2])
    t = ad.import_array(x, name="q")
    assert t.dtype == logical and t.framework == "torch" and t.device == "cpu"
    assert t.stream is None and t.source is x
    assert isinstance(t.data, np.ndarray) and t.data.dtype == CASES[logical][1]
    assert t.ptr == x.data_ptr()
    np.testing.assert_array_equal(ad.host_logical(t).astype(np.float32), ref.astype(np.float32))
    y = ad.export_array(t.data, dtype=logical, like=t)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(y.float(), x.float())


@pytest.mark.parametrize("logical", ["float8_e4m3fn", "bfloat16", "int32"])
def test_torch_cpu_export_of_fresh_numpy_result(logical):
    x = torch.zeros(2, dtype=CASES[logical][2])
    t = ad.import_array(x, name="q")
    res = _values((6, 7), logical)  # NumPy reference result in the logical dtype
    y = ad.export_array(res, dtype=logical, like=t)
    assert isinstance(y, torch.Tensor) and y.dtype == CASES[logical][2]
    assert y.data_ptr() == _ptr(res)  # torch.from_numpy: zero-copy
    np.testing.assert_array_equal(y.float().numpy(), res.astype(np.float32))


def test_torch_uint8_with_dtype_and_requires_grad():
    x = torch.tensor([0, 56, 64, 200], dtype=torch.uint8)
    t = ad.import_array(x, name="k", dtype="float8_e4m3fn")
    assert t.dtype == "float8_e4m3fn" and t.ptr == x.data_ptr()
    y = ad.export_array(t.data, dtype=t.dtype, like=t)
    assert y.dtype == torch.float8_e4m3fn and torch.equal(y.view(torch.uint8), x)
    w = torch.ones(3, 4, requires_grad=True)
    tw = ad.import_array(w, name="weights")
    assert tw.ptr == w.data_ptr() and tw.dtype == "float32"
    i16 = torch.zeros(3, dtype=torch.int16)
    assert ad.import_array(i16, name="q", dtype="bfloat16").data.dtype == np.uint16


def test_torch_storage_offset_view_is_shared():
    base = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    x = base[2:5]  # contiguous view with a storage offset
    t = ad.import_array(x, name="k")
    assert t.ptr == x.data_ptr() and t.shape == (3, 5)
    t.data[0, 0] = -1.0
    assert base[2, 0].item() == -1.0


def test_torch_int64_is_imported_but_rejectable():
    ks = torch.arange(4)
    t = ad.import_array(ks, name="ks")
    assert t.dtype == "int64"
    with pytest.raises(TypeError, match=r"argument 'ks': expected dtype int32, got int64"):
        ad.check_dtype(t, "ks", ("int32",))
    with pytest.raises(TypeError, match=r"argument 'ks': expected dtype int32, got int64"):
        ad.import_array(ks, name="ks", allowed=("int32",))


# ----------------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("logical", list(CASES))
def test_jax_cpu_import_is_zero_copy_and_round_trips(logical):
    ref = _values((3, 4, 5), logical)
    x = _jcpu(ref)
    assert x.dtype == CASES[logical][0]
    t = ad.import_array(x, name="q")
    assert t.dtype == logical and t.framework == "jax" and t.device == "cpu" and t.stream is None
    assert t.data.dtype == CASES[logical][1]
    assert t.ptr == x.unsafe_buffer_pointer()  # DLPack view, fp8/bf16 retyped in the capsule
    np.testing.assert_array_equal(ad.host_logical(t).astype(np.float32), ref.astype(np.float32))
    y = ad.export_array(t.data, dtype=logical, like=t)
    assert isinstance(y, jax.Array) and y.dtype == x.dtype
    assert list(y.devices())[0].platform == "cpu"
    np.testing.assert_array_equal(np.asarray(y).astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("logical", ["float8_e4m3fn", "bfloat16", "int32"])
def test_jax_cpu_export_of_aligned_result_is_zero_copy(logical):
    t = ad.import_array(_jcpu(np.zeros(2, CASES[logical][0])), name="q")
    n = 64
    buf = np.empty(4096 + n * 4, np.uint8)
    off = (-_ptr(buf)) % 4096
    res = buf[off:off + n * np.dtype(CASES[logical][1]).itemsize].view(CASES[logical][1])
    res[...] = _values((n,), logical).view(CASES[logical][1])
    y = ad.export_array(res, dtype=logical, like=t)
    assert y.dtype == CASES[logical][0]
    assert y.unsafe_buffer_pointer() == _ptr(res)
    np.testing.assert_array_equal(np.asarray(y).view(CASES[logical][1]), res)


def test_jax_readonly_and_misaligned_results_still_export():
    t = ad.import_array(_jcpu(np.zeros(2, np.int32)), name="q")
    res = np.arange(10, dtype=np.int32)[1:]
    res.flags.writeable = False
    y = ad.export_array(res, dtype="int32", like=t)
    np.testing.assert_array_equal(np.asarray(y), res)


def test_jax_uint16_with_dtype_bfloat16():
    bits = _values((4,), "bfloat16").view(np.uint16)
    x = _jcpu(bits)
    t = ad.import_array(x, name="k", dtype="bfloat16")
    assert t.dtype == "bfloat16" and t.ptr == x.unsafe_buffer_pointer()
    y = ad.export_array(t.data, dtype="bfloat16", like=t)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), bits)


def test_jax_tracer_is_rejected():
    seen = {}

    def f(x):
        with pytest.raises(TypeError, match=r"argument 'q': got a JAX tracer"):
            ad.import_array(x, name="q")
        seen["ok"] = True
        return x

    jax.jit(f)(_jcpu(np.zeros(3, np.float32)))
    assert seen["ok"]


# ----------------------------------------------------------------------------------- DLPack


def test_retype_capsule_rejects_width_mismatch():
    cap = np.zeros(3, np.uint16).__dlpack__()
    assert dl.capsule_dtype(cap) == (dl.DL_UINT, 16, 1)
    with pytest.raises(BufferError, match="cannot reinterpret"):
        dl.retype_capsule(cap, dl.TO_FLOAT8)  # 16-bit storage is not fp8
    dl.retype_capsule(cap, dl.TO_BFLOAT16)
    assert dl.capsule_dtype(cap) == (dl.DL_BFLOAT, 16, 1)


def test_retype_versioned_capsule():
    cap = np.zeros(3, np.uint8).__dlpack__(max_version=(1, 0))
    dl.retype_capsule(cap, dl.TO_FLOAT8)
    assert dl.capsule_dtype(cap) == (dl.DL_FLOAT8_E4M3FN, 8, 1)


def test_dlpack_view_overrides_stream():
    calls = []

    class P:
        def __dlpack_device__(self):
            return (dl.DL_CPU, 0)

        def __dlpack__(self, stream=None, max_version=None):
            calls.append(stream)
            return np.zeros(2, np.float32).__dlpack__()

    np.from_dlpack(dl.DLPackView(P(), stream=None))
    assert calls == [None]
    assert dl.dlpack_stream_arg(0) == 1 and dl.dlpack_stream_arg(None) is None
    assert dl.dlpack_stream_arg(1234) == 1234


def test_generic_dlpack_producer_is_imported_as_numpy():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)

    class Producer:
        def __dlpack__(self, stream=None, max_version=None, **kw):
            return base.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return base.__dlpack_device__()

    p = Producer()
    t = ad.import_array(p, name="k")
    assert t.framework == "numpy" and t.dtype == "float32" and t.source is p
    assert np.shares_memory(t.data, base)
    out = ad.export_array(t.data, dtype="float32", like=t)
    assert type(out) is np.ndarray


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("obj,tname", [([1, 2, 3], "list"), ("abc", "str"), (None, "NoneType"),
                                       (3.0, "float")])
def test_unknown_type_raises_type_error_naming_argument_and_type(obj, tname):
    with pytest.raises(TypeError, match=rf"argument 'q': expected a NumPy, PyTorch, JAX or CuPy array.*got {tname}$"):
        ad.import_array(obj, name="q")


@pytest.mark.parametrize("arr,got", [
    (np.zeros(3, np.float64), "float64"),
    (np.zeros(3, bool), "bool"),
    (np.zeros(3, np.complex64), "complex64"),
    (np.zeros(3, np.int16), "int16"),
    (np.zeros(3, ml_dtypes.float8_e5m2), "float8_e5m2"),
    (torch.zeros(3, dtype=torch.float64), "float64"),
    (torch.zeros(3, dtype=torch.bool), "bool"),
    (torch.zeros(3, dtype=torch.complex64), "complex64"),
    (torch.zeros(3, dtype=torch.float8_e5m2), "float8_e5m2"),
])
def test_unsupported_dtype_raises(arr, got):
    with pytest.raises(TypeError, match=rf"^argument 'q': expected dtype one of \(float8_e4m3fn, bfloat16, .*\), got {got}$"):
        ad.import_array(arr, name="q")


def test_check_dtype_messages():
    t = ad.import_array(np.zeros(3, np.int64), name="q")
    with pytest.raises(TypeError, match=r"^argument 'q': expected dtype one of \(float8_e4m3fn, bfloat16, float16, float32\), got int64$"):
        ad.check_dtype(t, "q", ad.FLOAT_DTYPES)
    ad.check_dtype(ad.import_array(np.zeros(3, np.float32), name="w"), "w", ("float32",))
    with pytest.raises(TypeError, match=r"argument 'w': expected dtype float32, got float16"):
        ad.import_array(np.zeros(3, np.float16), name="w", allowed=("float32",))


@pytest.mark.parametrize("arr,dtype", [
    (np.zeros(3, np.float32), "float8_e4m3fn"),
    (np.zeros(3, np.float32), "bfloat16"),
    (np.zeros(3, np.uint8), "bfloat16"),
    (np.zeros(3, np.uint16), "float8_e4m3fn"),
    (np.zeros(3, FP8), "bfloat16"),
    (np.zeros(3, np.float16), "float32"),
    (torch.zeros(3, dtype=torch.float32), "float8_e4m3fn"),
    (torch.zeros(3, dtype=torch.bfloat16), "float16"),
    (_jcpu(np.zeros(3, np.float32)), "bfloat16"),
])
def test_dtype_argument_mismatch_raises(arr, dtype):
    with pytest.raises(TypeError, match=rf"^argument 'k': dtype='{dtype}' does not match the array's dtype"):
        ad.import_array(arr, name="k", dtype=dtype)


def test_unknown_dtype_argument_raises():
    with pytest.raises(TypeError, match=r"argument 'q': dtype= expected one of .*got 'float64'"):
        ad.import_array(np.zeros(3, np.float64), name="q", dtype="float64")
    with pytest.raises(TypeError, match=r"argument 'q': dtype= expected one of .*got 'fp8'"):
        ad.import_array(np.zeros(3, np.uint8), name="q", dtype="fp8")


@pytest.mark.parametrize("make", [
    lambda: np.zeros((4, 6), np.float32).T,
    lambda: np.zeros((4, 6), np.float32)[:, ::2],
    lambda: np.zeros((4, 6), np.float32)[::-1],
    lambda: np.zeros((4, 6), FP8)[:, 1:],
    lambda: np.broadcast_to(np.zeros(6, np.float32), (4, 6)),
    lambda: torch.zeros(4, 6).t(),
    lambda: torch.zeros(4, 6, dtype=torch.float8_e4m3fn)[:, ::2],
    lambda: torch.zeros(4, 6, dtype=torch.bfloat16).t(),
    lambda: torch.zeros(6).expand(4, 6),
])
def test_non_contiguous_raises_value_error(make):
    x = make()
    with pytest.raises(ValueError, match=r"^argument 'k': expected a C-contiguous array \(row-major, unit stride in the last dim\), got strides \("):
        ad.import_array(x, name="k")


def test_non_contiguous_message_gives_element_strides():
    with pytest.raises(ValueError, match=r"got strides \(1, 6\) \(in elements\) for shape \(6, 4\)"):
        ad.import_array(np.zeros((4, 6), np.float32).T, name="k")


def test_sparse_and_meta_torch_tensors_rejected():
    with pytest.raises(TypeError, match=r"argument 'k': expected a dense \(strided\) tensor"):
        ad.import_array(torch.zeros(3, 3).to_sparse(), name="k")
    with pytest.raises(ValueError, match=r"argument 'k': expected a CPU or CUDA tensor, got one on device 'meta'"):
        ad.import_array(torch.zeros(3, device="meta"), name="k")


# ----------------------------------------------------------------------------------- out=


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_import_out_ok_and_writes_reach_caller(framework):
    out = np.full((3, 4), 7, np.int32) if framework == "numpy" else torch.full((3, 4), 7, dtype=torch.int32)
    t = ad.import_out(out, shape=(3, 4), dtype="int32")
    assert t.dtype == "int32" and t.framework == framework
    res = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert ad.copy_into(t, res) is out
    np.testing.assert_array_equal(np.asarray(out), res)


def test_import_out_wrong_shape():
    with pytest.raises(ValueError, match=r"^argument 'out': expected shape \(3, 4\), got \(3, 5\)$"):
        ad.import_out(np.zeros((3, 5), np.int32), shape=(3, 4), dtype="int32")


@pytest.mark.parametrize("out,got", [(np.zeros((3, 4), np.int64), "int64"),
                                     (torch.zeros(3, 4), "float32"),
                                     (np.zeros((3, 4), np.uint32), "uint32")])
def test_import_out_wrong_dtype(out, got):
    kind = TypeError
    with pytest.raises(kind, match=rf"argument 'out': expected dtype (int32|one of .*), got {got}"):
        ad.import_out(out, shape=(3, 4), dtype="int32")


def test_import_out_non_contiguous_readonly_jax_and_device():
    with pytest.raises(ValueError, match="C-contiguous"):
        ad.import_out(np.zeros((4, 3), np.int32).T, shape=(3, 4), dtype="int32")
    ro = np.zeros((3, 4), np.int32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"argument 'out': expected a writable array"):
        ad.import_out(ro, shape=(3, 4), dtype="int32")
    with pytest.raises(TypeError, match=r"argument 'out': JAX arrays are immutable"):
        ad.import_out(_jcpu(np.zeros((3, 4), np.int32)), shape=(3, 4), dtype="int32")
    with pytest.raises(TypeError, match=r"argument 'out': expected a NumPy"):
        ad.import_out([[0] * 4] * 3, shape=(3, 4), dtype="int32")
    fake_dev = _fake_device_tensor("q", device=0)
    with pytest.raises(ValueError, match=r"^argument 'out' is on cpu, expected cuda:0 like 'q'$"):
        ad.import_out(np.zeros((3, 4), np.int32), shape=(3, 4), dtype="int32", like=fake_dev)


def test_import_out_uint8_storage_for_fp8_output():
    out = np.zeros((2, 8), np.uint8)
    t = ad.import_out(out, name="pooled", shape=(2, 8), dtype="float8_e4m3fn")
    assert t.dtype == "float8_e4m3fn" and np.shares_memory(t.data, out)


# ----------------------------------------------------------------------------------- devices


def _fake_device_tensor(name, device, stream=1234):
    """A Tensor that claims to be on a GPU (only metadata is used by the checks under test)."""
    return ad.Tensor(np.zeros(3, np.float32), "float32", "torch", device, stream, None, name)


def test_check_same_device_messages():
    q = _fake_device_tensor("q", 0)
    k = _fake_device_tensor("k", 1)
    with pytest.raises(ValueError, match=r"^argument 'k' is on cuda:1, expected cuda:0 like 'q'$"):
        ad.check_same_device([q, k], ["q", "k"])
    h = ad.import_array(np.zeros(3, np.float32), name="weights")
    with pytest.raises(ValueError, match=r"^argument 'weights' is on cpu, expected cuda:0 like 'q'$"):
        ad.check_same_device([q, None, h], ["q", "k_scale", "weights"])
    with pytest.raises(ValueError, match=r"^argument 'q' is on cuda:0, expected cpu like 'weights'$"):
        ad.check_same_device([h, q])  # names default to Tensor.name
    ad.check_same_device([q, None, _fake_device_tensor("ks", 0)], ["q", "k", "ks"])
    ad.check_same_device([h, ad.import_array(torch.zeros(2), name="k")])
    ad.check_same_device([])


def test_caller_stream_and_host_scope():
    h = ad.import_array(np.zeros(3, np.float32), name="w")
    assert ad.caller_stream([h, None]) is None
    assert ad.caller_stream([None, h, _fake_device_tensor("q", 0, stream=77),
                             _fake_device_tensor("k", 0, stream=88)]) == 77
    with ad.device_scope(h) as s:
        assert s is None
    with ad.device_scope(None) as s:
        assert s is None


def test_to_host_is_identity_on_host_and_tensor_is_frozen():
    t = ad.import_array(np.zeros(3, np.float32), name="w")
    assert ad.to_host(t) is t
    assert ad.import_array(t, name="w") is t
    with pytest.raises(AttributeError):
        t.dtype = "int32"
    assert "name='w'" in repr(t) and "device=cpu" in repr(t)
    assert t.caller is t


def test_import_tensor_again_with_dtype():
    t = ad.import_array(np.zeros(3, np.uint8), name="k")
    t2 = ad.import_array(t, name="k", dtype="float8_e4m3fn")
    assert t2.dtype == "float8_e4m3fn" and np.shares_memory(t2.data, t.data)
    with pytest.raises(TypeError, match="does not match"):
        ad.import_array(t, name="k", dtype="bfloat16")


def test_export_uses_origin_to_find_the_caller():
    x = torch.zeros(3, dtype=torch.int32)
    t = ad.import_array(x, name="q")
    # a copy that lives elsewhere still exports to the caller's framework/device
    copy = ad.Tensor(t.data.copy(), t.dtype, t.framework, "cpu", None, x, "q", origin=t)
    assert copy.caller is t
    y = ad.export_array(np.arange(3, dtype=np.int32), dtype="int32", like=copy)
    assert isinstance(y, torch.Tensor) and y.tolist() == [0, 1, 2]


def test_export_errors():
    t = ad.import_array(np.zeros(3, np.float32), name="q")
    with pytest.raises(TypeError, match=r"expected an array of bfloat16 \(stored as uint16\), got dtype float32"):
        ad.export_array(np.zeros(3, np.float32), dtype="bfloat16", like=t)
    with pytest.raises(TypeError, match=r"export_array: expected a NumPy or CuPy array, got list"):
        ad.export_array([1, 2], dtype="int32", like=t)


def test_allocate_host_and_physical_helpers():
    t = ad.import_array(torch.zeros(2), name="q")
    a = ad.allocate((3, 5), dtype="bfloat16", like=t)
    assert type(a) is np.ndarray and a.shape == (3, 5) and a.dtype == np.uint16
    assert ad.physical_dtype("float8_e4m3fn") == np.uint8
    assert ad.host_logical_dtype("bfloat16") == BF16
    assert ad.host_logical(np.zeros(2, np.uint8), "float8_e4m3fn").dtype == FP8
    with pytest.raises(ValueError, match="use to_host"):
        ad.host_logical(_fake_device_tensor("q", 0))


# ----------------------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None)
@given(
    logical=st.sampled_from(list(CASES)),
    framework=st.sampled_from(["numpy", "torch", "jax"]),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(logical, framework, shape, seed):
    ref = _values(tuple(shape), logical, seed)
    if framework == "numpy":
        x = ref
    elif framework == "torch":
        x = torch.from_numpy(ref.astype(np.float32)).to(CASES[logical][2])
    else:
        x = _jcpu(ref)
    t = ad.import_array(x, name="q")
    assert t.shape == tuple(shape) and t.dtype == logical
    np.testing.assert_array_equal(ad.host_logical(t).astype(np.float32), ref.astype(np.float32))
    y = ad.export_array(ad.host_logical(t).copy(), dtype=logical, like=t)
    assert type(y).__module__.split(".")[0] == type(x).__module__.split(".")[0]
    if framework == "torch":
        got = y.float().numpy()
    else:
        got = np.asarray(y).astype(np.float32)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
