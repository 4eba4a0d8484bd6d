"""hisa_cupy.workloads: determinism, shapes and dtypes, quantisation, planted structure."""
import time

import ml_dtypes
import numpy as np
import pytest

from hisa_cupy import reference
from hisa_cupy.metrics import mean_iou
from hisa_cupy.workloads import WORKLOAD_DTYPES, WORKLOAD_KINDS, Workload, make_workload

SMALL = dict(seq_len=1024, num_queries=48, num_heads=8, head_dim=32)
NP_DTYPES = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
ARRAYS = ("q", "k", "weights", "k_scale", "ks", "ke")


def _same(a: Workload, b: Workload) -> bool:
    return all(np.array_equal(getattr(a, n).view(np.uint8), getattr(b, n).view(np.uint8))
               for n in ARRAYS)


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_deterministic_per_seed(kind):
    a = make_workload(kind, seed=3, **SMALL)
    b = make_workload(kind, seed=3, **SMALL)
    c = make_workload(kind, seed=4, **SMALL)
    assert _same(a, b)
    assert not np.array_equal(a.q.view(np.uint8), c.q.view(np.uint8))
    assert not np.array_equal(a.k.view(np.uint8), c.k.view(np.uint8))
    for key, value in a.info.items():
        assert np.array_equal(np.asarray(value), np.asarray(b.info[key])), key


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
@pytest.mark.parametrize("dtype", WORKLOAD_DTYPES)
def test_shapes_and_dtypes(kind, dtype):
    S, T, H, D = 640, 40, 4, 64
    wl = make_workload(kind, seq_len=S, num_queries=T, num_heads=H, head_dim=D, dtype=dtype)
    assert wl.kind == kind and wl.dtype == dtype
    assert wl.q.shape == (T, H, D) and wl.q.dtype == NP_DTYPES[dtype]
    assert wl.k.shape == (S, D) and wl.k.dtype == NP_DTYPES[dtype]
    assert wl.weights.shape == (T, H) and wl.weights.dtype == np.float32
    assert wl.k_scale.shape == (S,) and wl.k_scale.dtype == np.float32
    assert wl.ks.dtype == np.int32 and wl.ke.dtype == np.int32
    # The T queries are the last T positions of one causal sequence (SPEC §1 default).
    np.testing.assert_array_equal(wl.ks, np.zeros(T))
    np.testing.assert_array_equal(wl.ke, np.arange(S - T + 1, S + 1))
    assert (wl.seq_len, wl.num_queries, wl.num_heads, wl.head_dim) == (S, T, H, D)
    for name in ARRAYS[:4]:
        values = getattr(wl, name).astype(np.float32)
        assert np.isfinite(values).all(), name
        assert np.count_nonzero(values) > 0.9 * values.size, name  # never zeros
    assert (wl.k_scale > 0).all()
    if dtype != "float8_e4m3fn":
        np.testing.assert_array_equal(wl.k_scale, np.ones(S, np.float32))
    phys = wl.physical()
    if dtype in ("float8_e4m3fn", "bfloat16"):
        assert phys["q"].dtype == (np.uint8 if dtype == "float8_e4m3fn" else np.uint16)
        assert np.shares_memory(phys["k"], wl.k)  # a view, not a copy


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_fp8_scales_dequantise_to_latent_values(kind):
    """Same seed, fp8 vs fp32: k_fp8 * k_scale recovers the fp32 keys to fp8 precision, the row
    amax maps to 448, and the query scale folded into the weights recovers weights * q."""
    f8 = make_workload(kind, dtype="float8_e4m3fn", seed=7, **SMALL)
    f32 = make_workload(kind, dtype="float32", seed=7, **SMALL)
    k8 = f8.k.astype(np.float32)
    np.testing.assert_array_equal(np.abs(k8).max(axis=1), np.full(f8.seq_len, 448.0, np.float32))
    np.testing.assert_allclose(f8.k_scale, np.abs(f32.k).max(axis=1) / 448.0, rtol=1e-6)
    deq = k8 * f8.k_scale[:, None]
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2**-4 for normal values; values
    # far below the row amax may be subnormal, bounded absolutely by half the smallest step.
    err = np.abs(deq - f32.k)
    bound = np.maximum(np.abs(f32.k) * 2.0 ** -4, f8.k_scale[:, None] * 2.0 ** -10) * 1.0001
    assert (err <= bound).all()
    assert np.linalg.norm(deq - f32.k) / np.linalg.norm(f32.k) < 0.04
    # Queries: weights * q_fp8 approximates the fp32 workload's weights * q.
    q8 = f8.q.astype(np.float32)
    np.testing.assert_array_equal(np.abs(q8).max(axis=2), np.full(f8.weights.shape, 448.0))
    lhs = f8.weights[:, :, None] * q8
    rhs = f32.weights[:, :, None] * f32.q
    assert np.linalg.norm(lhs - rhs) / np.linalg.norm(rhs) < 0.04
    # And therefore the SPEC §2 token scores agree to fp8 precision.
    s8 = reference.token_scores(f8.q, f8.k, f8.weights, f8.k_scale)
    s32 = reference.token_scores(f32.q, f32.k, f32.weights, f32.k_scale)
    assert np.linalg.norm(s8 - s32) / np.linalg.norm(s32) < 0.08


def test_bf16_is_a_rounding_of_the_same_latent_values():
    b = make_workload("segments", dtype="bfloat16", seed=2, **SMALL)
    f = make_workload("segments", dtype="float32", seed=2, **SMALL)
    np.testing.assert_array_equal(b.k, f.k.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(b.q, f.q.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(b.weights, f.weights)


def test_needles_share_the_segments_background():
    seg = make_workload("segments", seed=5, **SMALL)
    ndl = make_workload("needles", seed=5, **SMALL)
    planted = ndl.info["needle_positions"]
    assert planted.shape[0] >= 1
    untouched = np.setdiff1d(np.arange(seg.seq_len), planted)
    np.testing.assert_array_equal(seg.k[untouched].view(np.uint8), ndl.k[untouched].view(np.uint8))
    np.testing.assert_array_equal(seg.info["segment_bounds"], ndl.info["segment_bounds"])


def test_segments_info_describes_the_document():
    wl = make_workload("segments", seq_len=20000, num_queries=100, num_heads=8, head_dim=32)
    bounds = wl.info["segment_bounds"]
    assert bounds[0] == 0 and bounds[-1] == wl.seq_len and (np.diff(bounds) > 0).all()
    lengths = np.diff(bounds)
    assert lengths.std() > 0.2 * lengths.mean()  # varied lengths
    assert len(bounds) - 1 > wl.info["num_topics"]  # topics recur
    topics = wl.info["segment_topics"]
    assert (topics[1:] != topics[:-1]).all()
    assert wl.info["query_topics"].shape == (wl.num_queries, 4)


STRUCTURE_SHAPE = dict(seq_len=4096, num_queries=64, num_heads=16, head_dim=64)


def _hisa_vs_dense_iou(wl, *, B=64, m=16, topk=128):
    args = wl.arrays()
    dense = reference.dense_select(**args, topk=topk)
    hisa = reference.hisa_select(**args, block_size=B, block_topk=m, topk=topk)
    return mean_iou(hisa, dense)


def test_segments_have_block_structure_random_does_not():
    """HISA keeping 16 of 64 blocks finds most of dense's top-k on segments, little on random."""
    seg = np.mean([_hisa_vs_dense_iou(make_workload("segments", seed=s, **STRUCTURE_SHAPE))
                   for s in (0, 1)])
    rnd = np.mean([_hisa_vs_dense_iou(make_workload("random", seed=s, **STRUCTURE_SHAPE))
                   for s in (0, 1)])
    assert rnd < 0.3, rnd
    assert seg > 0.6, seg
    assert seg > rnd + 0.3, (seg, rnd)


def test_segments_have_sink_and_recency():
    """Position 0 and the most recent keys are over-represented in the dense top-k."""
    wl = make_workload("segments", seed=1, **STRUCTURE_SHAPE)
    dense = reference.dense_select(**wl.arrays(), topk=128)
    assert dense.min() >= 0  # every row has more than topk visible keys
    assert np.mean(dense[:, 0] == 0) > 0.9  # the sink is picked by (nearly) every row
    qpos = wl.query_start + np.arange(wl.num_queries)
    back = qpos[:, None] - dense
    # The last 256 of ~4000 visible keys are ~6% of the context; recency makes them far more
    # popular, and the rest of the selection still reaches far back.
    recent = np.mean(back < 256)
    assert recent > 3 * 256 / 4096, recent
    assert np.mean(back > 1024) > 0.3


def test_random_has_no_sink_or_recency():
    wl = make_workload("random", seed=1, **STRUCTURE_SHAPE)
    dense = reference.dense_select(**wl.arrays(), topk=128)
    qpos = wl.query_start + np.arange(wl.num_queries)
    assert np.mean(dense[:, 0] == 0) < 0.2
    assert np.mean((qpos[:, None] - dense) < 256) < 2 * 256 / 4096


def test_needles_are_found_by_dense():
    wl = make_workload("needles", seq_len=2048, num_queries=64, num_heads=8, head_dim=32, seed=1)
    pairs = wl.info["needle_pairs"]
    assert pairs.shape[1] == 2 and pairs.shape[0] >= 4
    qpos = wl.query_start + pairs[:, 0]
    assert (pairs[:, 1] < qpos).all() and (pairs[:, 1] >= 1).all()
    assert (pairs[:, 1] < 0.75 * wl.query_start + 1).all()  # far back
    dense = reference.dense_select(**wl.arrays(), topk=64)
    hits = [p in dense[t] for t, p in pairs]  # ks = 0: relative index == position
    assert np.mean(hits) == 1.0


def test_slice_queries_keeps_the_causal_layout():
    wl = make_workload("needles", seq_len=2048, num_queries=64, num_heads=4, head_dim=32)
    sub = wl.slice_queries(16)
    assert sub.num_queries == 16 and sub.query_start == 2048 - 16
    np.testing.assert_array_equal(sub.ke, np.arange(2048 - 16 + 1, 2049))
    np.testing.assert_array_equal(sub.q.view(np.uint8), wl.q[-16:].view(np.uint8))
    pairs = sub.info["needle_pairs"]
    assert ((pairs[:, 0] >= 0) & (pairs[:, 0] < 16)).all()
    full = {(int(t), int(p)) for t, p in wl.info["needle_pairs"]}
    assert {(int(t) + 48, int(p)) for t, p in pairs} <= full


def test_tiny_and_degenerate_sizes():
    for kind in WORKLOAD_KINDS:
        wl = make_workload(kind, seq_len=1, num_queries=1, num_heads=1, head_dim=1)
        assert wl.q.shape == (1, 1, 1) and np.isfinite(wl.k_scale).all() and wl.ke[0] == 1
        wl = make_workload(kind, seq_len=300, num_queries=300, num_heads=2, head_dim=8)
        assert wl.ks.shape == (300,) and wl.ke[0] == 1


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="zipf"), "kind"),
    (dict(seq_len=0), "seq_len"),
    (dict(seq_len=1.5), "seq_len"),
    (dict(num_queries=0), "num_queries"),
    (dict(num_queries=2000), "num_queries"),
    (dict(num_heads=0), "num_heads"),
    (dict(head_dim=-1), "head_dim"),
    (dict(dtype="int8"), "dtype"),
    (dict(seed=-1), "seed"),
    (dict(seed="x"), "seed"),
    (dict(num_heads=True), "num_heads"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    args = dict(kind="segments", seq_len=1024, num_queries=16, num_heads=4, head_dim=16)
    args.update(kwargs)
    kind = args.pop("kind")
    with pytest.raises(ValueError, match=rf"^{name}:"):
        make_workload(kind, **args)


def test_deepseek_scale_generates_in_seconds():
    """S = 128K, T = 4096, H = 64, D = 128 in fp8: a few seconds of vectorised NumPy."""
    t0 = time.perf_counter()
    wl = make_workload("segments", seq_len=131072, num_queries=4096)
    elapsed = time.perf_counter() - t0
    assert wl.q.shape == (4096, 64, 128) and wl.k.shape == (131072, 128)
    assert elapsed < 20.0, f"{elapsed:.1f} s"
