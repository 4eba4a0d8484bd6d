"""hisa_cupy.testing (inputs, assertions, to_numpy) and hisa_cupy.metrics (IoU, recall)."""
import ml_dtypes
import numpy as np
import pytest

from hisa_cupy import metrics
from hisa_cupy.testing import (assert_selection_equal, assert_selection_equivalent, assert_values_identical,
                               exact_inputs, to_numpy, to_torch)

I32 = np.int32


# --------------------------------------------------------------------------------------------
# exact_inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_exact_inputs_values_and_dtypes(dtype):
    inp = exact_inputs(5, 64, 3, 8, dtype=dtype, seed=1)
    assert set(inp) == {"q", "k", "weights", "k_scale", "ks", "ke"}
    assert inp["q"].shape == (5, 3, 8) and inp["k"].shape == (64, 8)
    assert inp["q"].dtype == inp["k"].dtype == np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    assert inp["weights"].dtype == np.float32 and inp["weights"].shape == (5, 3)
    assert inp["k_scale"].dtype == np.float32 and (inp["k_scale"] == 1).all()
    assert inp["ks"] is None and inp["ke"] is None
    allowed = {-1.0, -0.5, 0.0, 0.5, 1.0}
    for name in ("q", "k", "weights"):
        assert set(np.unique(inp[name].astype(np.float32)).tolist()) <= allowed
    # same seed, same values whatever the dtype
    base = exact_inputs(5, 64, 3, 8, seed=1)
    np.testing.assert_array_equal(inp["q"].astype(np.float32), base["q"])
    np.testing.assert_array_equal(inp["k"].astype(np.float32), base["k"])


def test_exact_inputs_have_ties():
    inp = exact_inputs(4, 256, 4, 16, seed=0)
    assert np.unique(inp["k"], axis=0).shape[0] < 256 * 0.9  # duplicated key rows
    assert abs((inp["q"] == 0).mean() - 0.3) < 0.05


def test_exact_inputs_ragged():
    inp = exact_inputs(50, 64, 2, 4, ragged=True, seed=3)
    ks, ke = inp["ks"], inp["ke"]
    assert ks.dtype == ke.dtype == np.int32 and ks.shape == ke.shape == (50,)
    assert ((0 <= ks) & (ks <= 64) & (0 <= ke) & (ke <= 64)).all()
    assert (ke <= ks).any() and (ke < ks).any() and (ke > ks).sum() > 10


@pytest.mark.parametrize("T,S", [(12, 64), (3, 100), (1, 10), (8, 8)])
def test_exact_inputs_packed(T, S):
    inp = exact_inputs(T, S, 2, 4, packed=True, seed=T + S)
    ks, ke = inp["ks"].astype(int), inp["ke"].astype(int)
    assert ks.shape == (T,) and ((0 <= ks) & (ks < ke) & (ke <= S)).all()
    # rows of one sequence share ks and have consecutive causal ends; sequences are disjoint
    starts = sorted(set(ks.tolist()))
    for i, s in enumerate(starts):
        rows = np.nonzero(ks == s)[0]
        assert (np.diff(rows) == 1).all() and (np.diff(ke[rows]) == 1).all()
        if i + 1 < len(starts):
            assert ke[rows].max() <= starts[i + 1]
    if T >= 4:
        assert len(starts) >= 2


# --------------------------------------------------------------------------------------------
# to_numpy
# --------------------------------------------------------------------------------------------
def test_to_numpy_numpy_and_lists():
    a = np.arange(6, dtype=I32).reshape(2, 3)
    assert to_numpy(a) is a
    assert to_numpy([[1, 2]]).tolist() == [[1, 2]]


def test_to_numpy_torch():
    torch = pytest.importorskip("torch")
    x = torch.tensor([[1.5, -2.0]], requires_grad=True)
    assert to_numpy(x).tolist() == [[1.5, -2.0]]
    b = to_numpy(torch.tensor([1.0, 0.5, -3.0], dtype=torch.bfloat16))
    assert b.dtype == ml_dtypes.bfloat16 and b.astype(np.float32).tolist() == [1.0, 0.5, -3.0]
    f8 = to_numpy(torch.tensor([448.0, -0.25, 0.0]).to(torch.float8_e4m3fn))
    assert f8.dtype == ml_dtypes.float8_e4m3fn
    assert f8.astype(np.float32).tolist() == [448.0, -0.25, 0.0]
    i = to_numpy(torch.arange(4, dtype=torch.int32)[::2])
    assert i.dtype == np.int32 and i.tolist() == [0, 2]


def test_to_torch_keeps_logical_dtypes_and_bits():
    torch = pytest.importorskip("torch")
    f8 = np.array([448.0, -0.25, 0.0, 2.0 ** -9], dtype=ml_dtypes.float8_e4m3fn)
    t = to_torch(f8[::-1], device="cpu")  # a strided view: copied contiguous
    assert t.dtype == torch.float8_e4m3fn and t.view(torch.uint8).tolist() == f8[::-1].view(np.uint8).tolist()
    b = np.array([[1.0, -3.5]], dtype=ml_dtypes.bfloat16)
    t = to_torch(b, device="cpu")
    assert t.dtype == torch.bfloat16 and t.shape == (1, 2) and t.float().tolist() == [[1.0, -3.5]]
    t = to_torch(np.arange(3, dtype=np.int32), device="cpu")
    assert t.dtype == torch.int32 and t.tolist() == [0, 1, 2]
    assert to_torch(None) is None
    for x in (f8, b):  # and back
        assert to_numpy(to_torch(x, device="cpu")).tobytes() == x.tobytes()


def test_to_numpy_jax():
    jnp = pytest.importorskip("jax.numpy")
    b = to_numpy(jnp.array([1.0, -0.5], dtype=jnp.bfloat16))
    assert b.dtype == ml_dtypes.bfloat16 and b.astype(np.float32).tolist() == [1.0, -0.5]
    assert to_numpy(jnp.arange(3, dtype=jnp.int32)).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# assert_selection_equal
# --------------------------------------------------------------------------------------------
def test_selection_equal_passes_and_fails():
    a = np.array([[3, 5, -1], [0, 1, 2]], I32)
    assert_selection_equal(a, a.copy())
    assert_selection_equal(a, a.astype(np.int64))  # expected may be any integer dtype
    with pytest.raises(AssertionError, match=r"1 of 2 rows[\s\S]*row 1[\s\S]*only in actual \[7\]"):
        assert_selection_equal(np.array([[3, 5, -1], [0, 1, 7]], I32), a, err_msg="ctx")
    with pytest.raises(AssertionError, match="same set, different order"):
        assert_selection_equal(np.array([[5, 3, -1], [0, 1, 2]], I32), a)
    with pytest.raises(AssertionError, match="shape"):
        assert_selection_equal(a[:, :2], a)
    with pytest.raises(AssertionError, match="int32"):
        assert_selection_equal(a.astype(np.int64), a)
    with pytest.raises(AssertionError, match="ctx"):
        assert_selection_equal(np.array([[3, -1, -1], [0, 1, 2]], I32), a, err_msg="ctx")


def test_values_identical_compares_bits():
    # == would pass each failing pair below: signed zeros, NaN payloads
    v = np.array([[1.5, -0.0, np.nan], [np.inf, -np.inf, 0.0]], np.float32)
    assert_values_identical(v, v.copy())
    flipped = v.copy()
    flipped[0, 1] = 0.0
    with pytest.raises(AssertionError, match=r"ctx: 1 values differ[\s\S]*\(0, 1\)[\s\S]*0\.0 \(0x00000000\) vs -0\.0 \(0x80000000\)"):
        assert_values_identical(flipped, v, err_msg="ctx")
    other_nan = v.copy()
    other_nan.view(np.uint32)[0, 2] = 0x7FC00001
    with pytest.raises(AssertionError, match="1 values differ"):
        assert_values_identical(other_nan, v)
    with pytest.raises(AssertionError, match="float32"):
        assert_values_identical(v.astype(np.float64), v)
    with pytest.raises(AssertionError, match="shapes"):
        assert_values_identical(v[:, :2], v)


def test_selection_equal_accepts_torch():
    torch = pytest.importorskip("torch")
    a = np.array([[1, 2, -1]], I32)
    assert_selection_equal(torch.from_numpy(a.copy()), a)
    with pytest.raises(AssertionError):
        assert_selection_equal(torch.tensor([[1, 3, -1]], dtype=torch.int32), a)


# --------------------------------------------------------------------------------------------
# assert_selection_equivalent
# --------------------------------------------------------------------------------------------
SCORES = np.array([[9.0, 8.0, 5.0, 5.0005, 4.99, 1.0, np.nan, np.nan]], np.float32)


def test_equivalent_tolerable_swap_passes():
    expected = np.array([[0, 1, 3, -1]], I32)  # k-th score 5.0005
    assert_selection_equivalent(np.array([[2, 0, 1, -1]], I32), expected, SCORES,
                                index_base="absolute")  # 5.0 vs 5.0005: within rtol=1e-3
    assert_selection_equivalent(np.array([[1, 3, 0, -1]], I32), expected, SCORES)  # order-free


def test_equivalent_real_mismatch_fails():
    expected = np.array([[0, 1, 2, -1]], I32)
    with pytest.raises(AssertionError, match="row 0"):  # 1.0 is far below the k-th score 5.0
        assert_selection_equivalent(np.array([[0, 1, 5, -1]], I32), expected, SCORES)
    with pytest.raises(AssertionError, match="valid indices"):
        assert_selection_equivalent(np.array([[0, 1, -1, -1]], I32), expected, SCORES)
    with pytest.raises(AssertionError, match="tolerance|row 0"):  # 4.99 off by 2e-3 relative
        assert_selection_equivalent(np.array([[0, 1, 4, -1]], I32), expected, SCORES)
    assert_selection_equivalent(np.array([[0, 1, 4, -1]], I32), expected, SCORES, rtol=3e-3)
    with pytest.raises(AssertionError, match="duplicate"):
        assert_selection_equivalent(np.array([[0, 0, 1, -1]], I32), expected, SCORES)
    with pytest.raises(AssertionError, match="outside"):
        assert_selection_equivalent(np.array([[0, 1, 8, -1]], I32), expected, SCORES)


def test_equivalent_nan_kth():
    expected = np.array([[0, 1, 2, 3, 4, 5, 6]], I32)  # every non-NaN plus one NaN: k-th is NaN
    assert_selection_equivalent(np.array([[0, 1, 2, 3, 4, 5, 7]], I32), expected, SCORES)
    with pytest.raises(AssertionError):  # dropping a real score for a NaN is a mismatch
        assert_selection_equivalent(np.array([[0, 1, 2, 3, 4, 6, 7]], I32), expected, SCORES)


def test_equivalent_relative_indices_use_ks():
    scores = np.array([[0, 0, 7, 6, 6, 1], [3, 2, 1, 0, 0, 0]], np.float32)
    ks = np.array([2, 0], I32)
    expected = np.array([[0, 1], [0, 1]], I32)  # row 0: positions 2, 3 (scores 7, 6)
    assert_selection_equivalent(np.array([[0, 2], [1, 0]], I32), expected, scores, ks=ks)
    with pytest.raises(AssertionError, match="row 0"):  # without ks the scores are wrong
        assert_selection_equivalent(np.array([[0, 3], [1, 0]], I32), expected, scores, ks=ks)
    with pytest.raises(AssertionError, match="row 0"):
        assert_selection_equivalent(np.array([[0, 2], [1, 0]], I32), expected, scores,
                                    index_base="absolute")


def test_equivalent_on_reference_outputs():
    from hisa_cupy import reference as R

    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 4, 8)).astype(np.float32)
    k = rng.standard_normal((64, 8)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    ks = np.array([0, 5, 10, 0, 30, 64], I32)
    ke = np.array([64, 40, 11, 0, 64, 64], I32)
    ref = R.dense_select(q, k, w, ks=ks, ke=ke, topk=8)
    scores = R.token_scores(q, k, w)
    assert_selection_equivalent(ref, ref, scores, ks=ks)
    # a perturbed computation that swaps the boundary pair (k-th vs (k+1)-th) is tolerated only
    # when their scores are close
    t = 0
    order = R.rank_order(scores[t])
    swapped = ref.copy()
    swapped[t, np.nonzero(ref[t] == order[7])[0][0]] = order[8]
    gap = abs(scores[t, order[8]] - scores[t, order[7]]) / abs(scores[t, order[7]])
    assert_selection_equivalent(swapped, ref, scores, ks=ks, rtol=gap * 1.01 + 1e-7, atol=0)
    with pytest.raises(AssertionError):
        assert_selection_equivalent(swapped, ref, scores, ks=ks, rtol=gap * 0.5, atol=0)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def test_iou_hand_cases():
    a = np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [5, 6, -1, -1], [0, 1, 2, 3], [9, 9, -1, -1]], I32)
    b = np.array([[3, 2, 4, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [3, 2, 1, 0], [9, -1, -1, -1]], I32)
    got = metrics.iou(a, b)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [2 / 4, 1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(metrics.iou(b, a), got)
    assert metrics.mean_iou(a, b) == pytest.approx((0.5 + 1 + 0 + 1 + 1) / 5)


def test_iou_different_widths_and_torch():
    torch = pytest.importorskip("torch")
    a = torch.tensor([[0, 10, 20]], dtype=torch.int32)
    b = np.array([[20, 30, -1, -1, -1]], I32)
    np.testing.assert_allclose(metrics.iou(a, b), [1 / 4])


def test_recall_hand_cases():
    sel = np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [4, -1, -1, -1], [7, 8, -1, -1]], I32)
    ref = np.array([[3, 4, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [8, 7, 6, 5]], I32)
    got = metrics.recall(sel, ref)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0, 0.5])


def test_metrics_match_python_sets():
    rng = np.random.default_rng(4)
    a = rng.integers(-1, 30, size=(40, 12)).astype(I32)
    b = rng.integers(-1, 30, size=(40, 9)).astype(I32)
    want_iou, want_rec = [], []
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = set(ra) - {-1}, set(rb) - {-1}
        want_iou.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        want_rec.append(len(sa & sb) / len(sb) if sb else 1.0)
    np.testing.assert_allclose(metrics.iou(a, b), want_iou)
    np.testing.assert_allclose(metrics.recall(a, b), want_rec)


def test_metrics_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.iou(np.zeros((2, 3), I32), np.zeros((3, 3), I32))


def test_score_keys_rank_like_the_reference():
    # the kernels' ranking keys: by key descending, then position, the order is SPEC §3's
    # (reference.rank_order): -0.0 == +0.0, NaN below -inf, ties by position; key 0 never produced
    from hisa_cupy import reference
    from hisa_cupy.testing import score_keys

    specials = np.array([np.nan, -np.inf, -2.0, -0.0, 0.0, 1e-30, -1e-45, 3.0, np.inf, np.nan, 0.0, -2.0], np.float32)
    rng = np.random.default_rng(1)
    scores = np.concatenate([specials, np.round(rng.standard_normal(500), 1).astype(np.float32),
                             rng.standard_normal(500).astype(np.float32)])
    keys = score_keys(scores)
    assert keys.dtype == np.uint32 and keys.shape == scores.shape and keys.min() >= 1
    assert keys[0] == 1 and keys[3] == keys[4] == 0x80000000 and keys[6] == 0x7FFFFFFE  # -1e-45: bits 0x80000001
    order = np.lexsort((np.arange(len(scores)), -keys.astype(np.int64)))
    np.testing.assert_array_equal(order, reference.rank_order(scores))
    assert score_keys(specials.reshape(3, 4)).shape == (3, 4)
