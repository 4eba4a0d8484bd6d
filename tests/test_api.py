"""Public API on the CPU: results equal the reference, the caller's array type comes back, and
every SPEC §8 error path raises the documented exception naming the argument."""
import ml_dtypes
import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import reference, testing


@pytest.fixture(scope="module")
def inp():
    return testing.exact_inputs(12, 512, 16, 32, dtype="float8_e4m3fn", seed=3, block_size=32, ragged=True)


def call(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"], ke=inp["ke"], **kw)


HISA = dict(block_size=32, block_topk=4, topk=64)


def test_numpy_results_equal_reference(inp):
    for order in ("position", "score"):
        for base in ("relative", "absolute"):
            got = call(hisa_cupy.hisa_select, inp, order=order, index_base=base, **HISA)
            assert isinstance(got, np.ndarray) and got.dtype == np.int32 and got.shape == (12, 64)
            testing.assert_selection_equal(got, call(reference.hisa_select, inp, order=order, index_base=base, **HISA))
            got = call(hisa_cupy.dense_select, inp, topk=64, order=order, index_base=base)
            testing.assert_selection_equal(got, call(reference.dense_select, inp, topk=64, order=order, index_base=base))
    got = call(hisa_cupy.block_sparse_select, inp, block_size=32, topk=64)
    testing.assert_selection_equal(got, call(reference.block_sparse_select, inp, block_size=32, topk=64))


def test_stages_compose_to_hisa(inp):
    pooled, scale = hisa_cupy.pool_keys(inp["k"], k_scale=inp["k_scale"], block_size=32)
    assert pooled.dtype == ml_dtypes.bfloat16 and scale is None
    blocks = hisa_cupy.select_blocks(inp["q"], pooled, inp["weights"], ks=inp["ks"], ke=inp["ke"], block_size=32,
                                     block_topk=4, seq_len=512)
    got = hisa_cupy.refine(inp["q"], inp["k"], inp["weights"], blocks, k_scale=inp["k_scale"], ks=inp["ks"],
                           ke=inp["ke"], block_size=32, topk=64)
    testing.assert_selection_equal(got, call(hisa_cupy.hisa_select, inp, **HISA))


def test_uint8_with_dtype_equals_fp8(inp):
    got = hisa_cupy.hisa_select(inp["q"].view(np.uint8), inp["k"].view(np.uint8), inp["weights"], ks=inp["ks"],
                                ke=inp["ke"], dtype="float8_e4m3fn", **HISA)
    testing.assert_selection_equal(got, call(hisa_cupy.hisa_select, inp, **HISA))


def test_out_is_filled_and_returned(inp):
    out = np.full((12, 64), -7, np.int32)
    res = call(hisa_cupy.hisa_select, inp, out=out, **HISA)
    assert res is out
    testing.assert_selection_equal(out, call(reference.hisa_select, inp, **HISA))


def test_torch_cpu_in_torch_out(inp):
    torch = pytest.importorskip("torch")
    tq = torch.from_numpy(inp["q"].view(np.uint8)).view(torch.float8_e4m3fn)
    tk = torch.from_numpy(inp["k"].view(np.uint8)).view(torch.float8_e4m3fn)
    got = hisa_cupy.hisa_select(tq, tk, torch.from_numpy(inp["weights"]), ks=torch.from_numpy(inp["ks"]),
                                ke=torch.from_numpy(inp["ke"]), **HISA)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32 and got.device.type == "cpu"
    testing.assert_selection_equal(got, call(reference.hisa_select, inp, **HISA))
    pooled, _ = hisa_cupy.pool_keys(tk, block_size=32)
    assert isinstance(pooled, torch.Tensor) and pooled.dtype == torch.bfloat16
    vals, idx = hisa_cupy.topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert idx.tolist() == [[1, 2]] and vals.tolist() == [[3.0, 2.0]]


def test_jax_cpu_in_jax_out(inp):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    got = hisa_cupy.hisa_select(jnp.asarray(inp["q"]), jnp.asarray(inp["k"]), jnp.asarray(inp["weights"]),
                                ks=jnp.asarray(inp["ks"]), ke=jnp.asarray(inp["ke"]), **HISA)
    assert isinstance(got, jax.Array) and got.dtype == jnp.int32
    testing.assert_selection_equal(np.asarray(got), call(reference.hisa_select, inp, **HISA))


def test_topk_matches_reference():
    rng = np.random.default_rng(0)
    s = rng.integers(-3, 3, size=(5, 40)).astype(np.float32)
    s[1, 3] = np.nan
    lengths = np.array([40, 10, 0, 39, 5], np.int32)
    vals, idx = hisa_cupy.topk(s, 8, lengths=lengths)
    rv, ri = reference.topk(s, 8, lengths=lengths)
    testing.assert_selection_equal(idx, ri)
    np.testing.assert_array_equal(vals, rv)


# ------------------------------------------------------------------------------------------
# SPEC §8 errors

def _bad(fn, inp, exc, match, **over):
    args = dict(q=inp["q"], k=inp["k"], weights=inp["weights"])
    kw = dict(k_scale=inp["k_scale"], ks=inp["ks"], ke=inp["ke"], **HISA)
    for name in ("q", "k", "weights"):
        if name in over:
            args[name] = over.pop(name)
    kw.update(over)
    with pytest.raises(exc, match=match):
        fn(args["q"], args["k"], args["weights"], **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=np.zeros((12, 16, 32), np.float64)), TypeError, "'q'.*float64"),
    (dict(q=np.zeros((12, 16, 32), np.int64)), TypeError, "'q'"),
    (dict(k="not an array"), TypeError, "'k'"),
    (dict(k=np.zeros((512, 32), np.float32)), TypeError, "'k'.*float8_e4m3fn"),
    (dict(q=np.zeros((12, 32), ml_dtypes.float8_e4m3fn)), ValueError, "'q'.*\\[T, H, D\\]"),
    (dict(k=np.zeros((512, 16), ml_dtypes.float8_e4m3fn)), ValueError, "'k'.*\\(S, 32\\)"),
    (dict(weights=np.zeros((12, 16), np.float16)), TypeError, "'weights'"),
    (dict(weights=np.zeros((12, 8), np.float32)), ValueError, "'weights'.*\\(12, 16\\)"),
    (dict(k_scale=np.ones(511, np.float32)), ValueError, "'k_scale'.*\\(512,\\)"),
    (dict(k_scale=np.ones(512, np.float64)), TypeError, "'k_scale'"),
    (dict(ks=np.zeros(12, np.int64)), TypeError, "'ks'"),
    (dict(ke=np.zeros(11, np.int32)), ValueError, "'ke'.*\\(12,\\)"),
    (dict(ks=None), ValueError, "'ks' and 'ke'"),
    (dict(ks=np.full(12, -1, np.int32)), ValueError, "'ks'.*\\[0, S=512\\]"),
    (dict(ke=np.full(12, 513, np.int32)), ValueError, "'ke'.*\\[0, S=512\\]"),
    (dict(k_scale=np.zeros(512, np.float32)), ValueError, "'k_scale'.*> 0"),
    (dict(k_scale=np.full(512, np.inf, np.float32)), ValueError, "'k_scale'.*finite"),
    (dict(block_size=0), ValueError, "'block_size'"),
    (dict(block_size=32.0), TypeError, "'block_size'"),
    (dict(block_topk=1), ValueError, "'block_topk'.*>= 2"),
    (dict(topk=-5), ValueError, "'topk'"),
    (dict(topk=True), TypeError, "'topk'"),
    (dict(block_topk=2, topk=65), ValueError, "block_topk \\* block_size must be >= topk"),
    (dict(pool_dtype="float16"), ValueError, "'pool_dtype'"),
    (dict(index_base="rel"), ValueError, "'index_base'"),
    (dict(order="desc"), ValueError, "'order'"),
    (dict(backend="tpu"), ValueError, "'backend'"),
    (dict(validate=1), TypeError, "'validate'"),
    (dict(dtype="int4"), (TypeError, ValueError), "'q'|dtype"),
    (dict(out=np.zeros((12, 63), np.int32)), ValueError, "'out'"),
    (dict(out=np.zeros((12, 64), np.int64)), TypeError, "'out'"),
])
def test_hisa_errors(inp, over, exc, match):
    _bad(hisa_cupy.hisa_select, inp, exc, match, **over)


def test_non_contiguous_rejected(inp):
    k2 = np.repeat(inp["k"], 2, axis=0)[::2]
    with pytest.raises(ValueError, match="'k'.*contiguous"):
        hisa_cupy.hisa_select(inp["q"], k2, inp["weights"], **HISA)


def test_validate_false_clamps_like_reference(inp):
    ks = np.full(12, -50, np.int32)
    ke = np.full(12, 9999, np.int32)
    got = hisa_cupy.hisa_select(inp["q"], inp["k"], inp["weights"], ks=ks, ke=ke, validate=False, **HISA)
    ref = reference.hisa_select(inp["q"], inp["k"], inp["weights"], ks=np.zeros(12, np.int32),
                                ke=np.full(12, 512, np.int32), **HISA)
    testing.assert_selection_equal(got, ref)


def test_stage_errors(inp):
    pooled, _ = hisa_cupy.pool_keys(inp["k"], block_size=32)
    with pytest.raises(ValueError, match="'pooled_scale'"):
        hisa_cupy.select_blocks(inp["q"], pooled.astype(ml_dtypes.float8_e4m3fn), inp["weights"], ks=inp["ks"],
                                ke=inp["ke"], block_size=32, block_topk=4)
    with pytest.raises(ValueError, match="'seq_len'"):
        hisa_cupy.select_blocks(inp["q"], pooled, inp["weights"], block_size=32, block_topk=4, seq_len=100)
    with pytest.raises(ValueError, match="'pooled'"):
        hisa_cupy.select_blocks(inp["q"], pooled[:, :16], inp["weights"], block_size=32, block_topk=4)
    blocks = hisa_cupy.select_blocks(inp["q"], pooled, inp["weights"], ks=inp["ks"], ke=inp["ke"], block_size=32,
                                     block_topk=4)
    for bad, match in [(np.array([[3, 1, -1, -1]] * 12, np.int32), "ascending"),
                       (np.array([[0, -1, 2, -1]] * 12, np.int32), "padding"),
                       (np.array([[0, 16, -1, -1]] * 12, np.int32), "\\[0, 16\\)"),
                       (np.array([[-2, -1, -1, -1]] * 12, np.int32), "-1"),
                       (blocks[:5], "\\(12, m\\)"),
                       (blocks.astype(np.int64), "'blocks'")]:
        with pytest.raises((ValueError, TypeError), match=match):
            hisa_cupy.refine(inp["q"], inp["k"], inp["weights"], bad, ks=inp["ks"], ke=inp["ke"], block_size=32,
                             topk=64)
    with pytest.raises(ValueError, match="topk // block_size >= 2"):
        hisa_cupy.block_sparse_select(inp["q"], inp["k"], inp["weights"], block_size=64, topk=64)
    with pytest.raises(TypeError, match="'scores'"):
        hisa_cupy.topk(np.zeros((2, 3), np.float64), 1)
    with pytest.raises(ValueError, match="'lengths'"):
        hisa_cupy.topk(np.zeros((2, 3), np.float32), 1, lengths=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="'k'"):
        hisa_cupy.topk(np.zeros((2, 3), np.float32), 0)
