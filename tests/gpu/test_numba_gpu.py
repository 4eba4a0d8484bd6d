"""Numba backend (kernels/numba_backend.py) on a real GPU with CuPy arrays and a CuPy stream.

The same checks as tests/test_numba_sim.py at larger sizes (bit-exact vs the NumPy reference on
SPEC §9 inputs), results on a non-default stream, and equality with the CuPy backend through the
public API (``backend="numba"`` vs ``backend="cupy"``). Run with ``pytest -m gpu`` on an H100/H200.
Numba compiles each kernel variant on first use (seconds each), so the first tests are slower.
"""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn"]
POOLS = ["bfloat16", "float32", "float8_e4m3fn"]
RANGES = {"causal": {}, "ragged": {"ragged": True}, "packed": {"packed": True}}


@pytest.fixture(scope="module")
def env(cuda_device):
    import cupy
    import ml_dtypes

    from hisa_cupy import reference as ref
    from hisa_cupy.kernels import numba_backend as nb
    from hisa_cupy.testing import exact_inputs

    assert not nb.SIMULATOR, "GPU tests must not run under NUMBA_ENABLE_CUDASIM=1"
    stream = cupy.cuda.Stream(non_blocking=True)

    def dev(x):
        """Logical NumPy array -> physical CuPy array (uint8 fp8 bits, uint16 bf16 bits)."""
        if x is None:
            return None
        if x.dtype == np.dtype(ml_dtypes.bfloat16):
            x = x.view(np.uint16)
        elif x.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            x = x.view(np.uint8)
        with stream:
            return cupy.asarray(x)

    def host(x):
        stream.synchronize()
        assert isinstance(x, cupy.ndarray)
        return x.get()

    def inputs(T, S, H, D, dtype, B, ranges="causal", seed=0):
        d = exact_inputs(T, S, H, D, dtype=dtype, seed=seed, block_size=B, **RANGES[ranges])
        return d, {name: dev(val) for name, val in d.items()}

    def empty(shape, dtype):
        with stream:
            return cupy.full(shape, 77, dtype=dtype)

    return dict(cupy=cupy, ml=ml_dtypes, ref=ref, nb=nb, stream=stream, s=stream.ptr, dev=dev,
                host=host, inputs=inputs, empty=empty)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_keys(env, dtype, pool):
    nb, ref = env["nb"], env["ref"]
    d, g = env["inputs"](1, 4096 + 40, 1, 128, dtype, 128, seed=1)  # partial last block
    got, gscale = nb.pool_keys(g["k"], g["k_scale"], block_size=128, pool_dtype=pool, stream=env["s"])
    want, wscale = ref.pool_keys(d["k"], d["k_scale"], block_size=128, pool_dtype=pool)
    got = env["host"](got)
    np.testing.assert_array_equal(got, want.view(got.dtype))
    if pool == "float8_e4m3fn":
        np.testing.assert_array_equal(env["host"](gscale), wscale)


@pytest.mark.parametrize("ranges", list(RANGES))
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_blocks(env, dtype, pool, ranges):
    nb, ref = env["nb"], env["ref"]
    T, S, H, D, B, m = 64, 4096, 32, 64, 64, 9
    d, g = env["inputs"](T, S, H, D, dtype, B, ranges, seed=2)
    pooled, pscale = ref.pool_keys(d["k"], None, block_size=B, pool_dtype=pool)
    out = env["empty"]((T, m), np.int32)
    res = nb.select_blocks(g["q"], env["dev"](pooled), g["weights"], env["dev"](pscale), g["ks"], g["ke"],
                           seq_len=S, block_size=B, block_topk=m, out=out, stream=env["s"])
    assert res is out
    want = ref.select_blocks(d["q"], pooled, d["weights"], pooled_scale=pscale, ks=d["ks"], ke=d["ke"],
                             block_size=B, block_topk=m, seq_len=S)
    np.testing.assert_array_equal(env["host"](out), want)


@pytest.mark.parametrize("ranges", list(RANGES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_refine(env, dtype, ranges):
    nb, ref = env["nb"], env["ref"]
    T, S, H, D, B, m, k = 48, 2048, 64, 128, 64, 8, 300
    d, g = env["inputs"](T, S, H, D, dtype, B, ranges, seed=3)
    pooled, _ = ref.pool_keys(d["k"], None, block_size=B, pool_dtype="bfloat16")
    blocks = ref.select_blocks(d["q"], pooled, d["weights"], ks=d["ks"], ke=d["ke"], block_size=B,
                               block_topk=m, seq_len=S)
    for index_base in ("relative", "absolute"):
        for order in ("position", "score"):
            out = env["empty"]((T, k), np.int32)
            nb.refine(g["q"], g["k"], g["weights"], g["k_scale"], env["dev"](blocks), g["ks"], g["ke"],
                      block_size=B, topk=k, index_base=index_base, order=order, out=out, stream=env["s"])
            want = ref.refine(d["q"], d["k"], d["weights"], blocks, k_scale=d["k_scale"], ks=d["ks"],
                              ke=d["ke"], block_size=B, topk=k, index_base=index_base, order=order)
            np.testing.assert_array_equal(env["host"](out), want, err_msg=f"{index_base} {order}")


@pytest.mark.parametrize("ranges", list(RANGES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense(env, dtype, ranges):
    nb, ref = env["nb"], env["ref"]
    T, S, H, D, k = 40, 3000, 64, 128, 256
    d, g = env["inputs"](T, S, H, D, dtype, 128, ranges, seed=4)
    for order in ("position", "score"):
        out = env["empty"]((T, k), np.int32)
        nb.dense_select(g["q"], g["k"], g["weights"], None, g["ks"], g["ke"], topk=k, index_base="relative",
                        order=order, out=out, stream=env["s"])
        want = ref.dense_select(d["q"], d["k"], d["weights"], ks=d["ks"], ke=d["ke"], topk=k, order=order)
        np.testing.assert_array_equal(env["host"](out), want, err_msg=order)


def test_dense_chunked_workspace(env, monkeypatch):
    nb, ref = env["nb"], env["ref"]
    T, S, H, D, k = 33, 5000, 16, 64, 512
    d, g = env["inputs"](T, S, H, D, "bfloat16", 128, "ragged", seed=5)
    monkeypatch.setattr(nb, "WORKSPACE_BYTES", 5 * 4 * (S + k))  # 5 rows per launch
    out = env["empty"]((T, k), np.int32)
    nb.dense_select(g["q"], g["k"], g["weights"], None, g["ks"], g["ke"], topk=k, index_base="absolute",
                    order="score", out=out, stream=env["s"])
    want = ref.dense_select(d["q"], d["k"], d["weights"], ks=d["ks"], ke=d["ke"], topk=k,
                            index_base="absolute", order="score")
    np.testing.assert_array_equal(env["host"](out), want)


@pytest.mark.parametrize("pool", ["bfloat16", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hisa_select(env, dtype, pool):
    nb, ref = env["nb"], env["ref"]
    T, S, H, D, B, m, k = 64, 4096, 64, 128, 128, 8, 512
    d, g = env["inputs"](T, S, H, D, dtype, B, "packed", seed=6)
    out = env["empty"]((T, k), np.int32)
    nb.hisa_select(g["q"], g["k"], g["weights"], g["k_scale"], g["ks"], g["ke"], block_size=B, block_topk=m,
                   topk=k, pool_dtype=pool, index_base="relative", order="position", out=out, stream=env["s"])
    want = ref.hisa_select(d["q"], d["k"], d["weights"], k_scale=d["k_scale"], ks=d["ks"], ke=d["ke"],
                           block_size=B, block_topk=m, topk=k, pool_dtype=pool)
    np.testing.assert_array_equal(env["host"](out), want)


def test_nan_scores(env):
    nb, ref, ml = env["nb"], env["ref"], env["ml"]
    T, S, H, D, k = 16, 1024, 8, 64, 128
    d, _ = env["inputs"](T, S, H, D, "float8_e4m3fn", 64, seed=7)
    q8, k8 = d["q"].view(np.uint8).copy(), d["k"].view(np.uint8).copy()
    k8[::37, 5] = 0x7F
    q8[3, 1, 7] = 0xFF
    out = env["empty"]((T, k), np.int32)
    nb.dense_select(env["dev"](q8), env["dev"](k8), env["dev"](d["weights"]), None, None, None, topk=k,
                    index_base="relative", order="score", out=out, stream=env["s"])
    want = ref.dense_select(q8.view(ml.float8_e4m3fn), k8.view(ml.float8_e4m3fn), d["weights"], topk=k,
                            order="score")
    np.testing.assert_array_equal(env["host"](out), want)


def test_topk(env):
    nb, ref = env["nb"], env["ref"]
    rng = np.random.default_rng(8)
    R, N, k = 37, 20000, 2048
    scores = (rng.integers(-50, 50, (R, N)) / 4).astype(np.float32)
    scores[rng.random((R, N)) < 0.01] = np.nan
    scores[0] = -0.0
    lengths = rng.integers(-10, N + 10, R).astype(np.int32)
    vals, idx = nb.topk(env["dev"](scores), env["dev"](lengths), k=k,
                        out_values=env["empty"]((R, k), np.float32), out_indices=env["empty"]((R, k), np.int32),
                        stream=env["s"])
    wv, wi = ref.topk(scores, k, lengths=lengths)
    np.testing.assert_array_equal(env["host"](idx), wi)
    np.testing.assert_array_equal(env["host"](vals).view(np.uint32), wv.view(np.uint32))


def test_outputs_are_cupy_on_the_stream(env):
    """Allocated outputs are CuPy arrays; work is ordered on the given stream (no host sync)."""
    cupy, nb = env["cupy"], env["nb"]
    d, g = env["inputs"](8, 512, 4, 32, "bfloat16", 64, seed=9)
    pooled, pscale = nb.pool_keys(g["k"], None, block_size=64, pool_dtype="float8_e4m3fn", stream=env["s"])
    assert isinstance(pooled, cupy.ndarray) and pooled.dtype == np.uint8 and isinstance(pscale, cupy.ndarray)
    blocks = nb.select_blocks(g["q"], pooled, g["weights"], pscale, None, None, seq_len=512, block_size=64,
                              block_topk=3, stream=env["s"])
    idx = nb.refine(g["q"], g["k"], g["weights"], None, blocks, None, None, block_size=64, topk=64,
                    index_base="relative", order="position", stream=env["s"])
    vals, ind = nb.topk(g["weights"], None, k=2, stream=env["s"])
    for a in (blocks, idx, vals, ind):
        assert isinstance(a, cupy.ndarray)
    env["stream"].synchronize()
    assert int((idx >= 0).sum()) > 0


# ---------------------------------------------------------------------------------------------
# public API: backend="numba" vs backend="cupy"
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_numba_equals_cupy(env, dtype):
    import hisa_cupy

    cupy = env["cupy"]
    d, _ = env["inputs"](64, 4096, 64, 128, dtype, 128, "ragged", seed=10)
    q, k = d["q"], d["k"]
    extra = {}
    phys = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8}.get(dtype)
    if phys is not None:  # CuPy has no bf16 / fp8 dtypes: bit patterns + dtype=
        q, k, extra = q.view(phys), k.view(phys), {"dtype": dtype}
    q, k = cupy.asarray(q), cupy.asarray(k)
    dev = lambda x: None if x is None else cupy.asarray(x)  # noqa: E731
    args = (q, k, dev(d["weights"]))
    kw = dict(k_scale=dev(d["k_scale"]), ks=dev(d["ks"]), ke=dev(d["ke"]), **extra)
    for order in ("position", "score"):
        for pool in POOLS:
            a = hisa_cupy.hisa_select(*args, **kw, block_size=128, block_topk=8, topk=512, pool_dtype=pool,
                                      order=order, backend="numba")
            b = hisa_cupy.hisa_select(*args, **kw, block_size=128, block_topk=8, topk=512, pool_dtype=pool,
                                      order=order, backend="cupy")
            assert type(a) is type(b)
            np.testing.assert_array_equal(_np(a), _np(b), err_msg=f"hisa {order} {pool}")
        a = hisa_cupy.dense_select(*args, **kw, topk=700, order=order, backend="numba")
        b = hisa_cupy.dense_select(*args, **kw, topk=700, order=order, backend="cupy")
        np.testing.assert_array_equal(_np(a), _np(b), err_msg=f"dense {order}")
    a = hisa_cupy.block_sparse_select(*args, **kw, block_size=128, topk=512, backend="numba")
    b = hisa_cupy.block_sparse_select(*args, **kw, block_size=128, topk=512, backend="cupy")
    np.testing.assert_array_equal(_np(a), _np(b), err_msg="block_sparse")


def test_public_api_general_inputs_equivalent(env):
    """Random fp8 inputs (not exact): numba and cupy selections are equivalent under SPEC §9."""
    import hisa_cupy
    from hisa_cupy import testing

    cupy, ref = env["cupy"], env["ref"]
    rng = np.random.default_rng(11)
    T, S, H, D = 32, 4096, 64, 128
    q = rng.integers(0, 256, (T, H, D), dtype=np.uint8) & 0x77  # finite e4m3 codes, +-[0, 240]
    k = rng.integers(0, 256, (S, D), dtype=np.uint8) & 0x77
    w = rng.standard_normal((T, H)).astype(np.float32)
    k_scale = (rng.random(S) + 0.5).astype(np.float32)
    args = (cupy.asarray(q), cupy.asarray(k), cupy.asarray(w))
    kw = dict(k_scale=cupy.asarray(k_scale), dtype="float8_e4m3fn", topk=512)
    a = hisa_cupy.dense_select(*args, **kw, backend="numba")
    b = hisa_cupy.dense_select(*args, **kw, backend="cupy")
    scores = ref.token_scores(q.view(env["ml"].float8_e4m3fn), k.view(env["ml"].float8_e4m3fn), w, k_scale)
    testing.assert_selection_equivalent(_np(a), _np(b), scores)
    a = hisa_cupy.hisa_select(*args, **kw, block_size=128, block_topk=16, backend="numba")
    b = hisa_cupy.hisa_select(*args, **kw, block_size=128, block_topk=16, backend="cupy")
    got, want = _np(a), _np(b)
    assert ((got >= 0).sum(1) == (want >= 0).sum(1)).all()
    overlap = np.mean([np.intersect1d(x[x >= 0], y[y >= 0]).size / max(1, (y >= 0).sum())
                       for x, y in zip(got, want)])
    assert overlap > 0.95, overlap  # block choices may differ at near-ties; tokens mostly agree


def _np(x):
    from hisa_cupy import testing

    return np.asarray(testing.to_numpy(x))


def test_numba_device_arrays_and_variant(env):
    """Plain Numba device arrays in -> Numba device arrays out; the docs/numba.md variant runs."""
    from numba import cuda

    from hisa_cupy.kernels import numba_variants as nv

    nb, ref = env["nb"], env["ref"]
    d, g = env["inputs"](16, 1024, 8, 64, "float32", 64, seed=12)
    q, k, w = (cuda.to_device(d[n]) for n in ("q", "k", "weights"))
    got = nb.dense_select(q, k, w, None, None, None, topk=64, index_base="relative", order="position")
    assert cuda.is_cuda_array(got) and not isinstance(got, env["cupy"].ndarray)
    np.testing.assert_array_equal(got.copy_to_host(), ref.dense_select(d["q"], d["k"], d["weights"], topk=64))
    pooled = nv.max_pool_keys(g["k"], None, block_size=64, stream=env["s"])
    want = d["k"].reshape(16, 64, 64).max(axis=1)
    np.testing.assert_array_equal(env["host"](pooled), want)
    idx = nv.hisa_select_maxpool(g["q"], g["k"], g["weights"], None, None, None, block_size=64, block_topk=4,
                                 topk=128, stream=env["s"])
    assert env["host"](idx).shape == (16, 128)
