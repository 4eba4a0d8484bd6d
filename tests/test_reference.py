"""The NumPy reference against an independent brute-force restatement of SPEC.md §2-§7.

The brute force below is written straight from the SPEC text with pure-Python loops and
``sorted()`` on explicit keys; scores are evaluated in float64 with ``np.einsum`` (exact on the
§9 exact-arithmetic inputs used here). It shares no code with ``hisa_cupy.reference``.
"""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hisa_cupy import reference as R
from hisa_cupy.testing import assert_selection_equal, exact_inputs

# --------------------------------------------------------------------------------------------
# brute force restatement of the SPEC
# --------------------------------------------------------------------------------------------
POOL = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
        "float8_e4m3fn": ml_dtypes.float8_e4m3fn}


def bf_scores(q, k, w, scale):
    """§2: scale[s] * sum_h w[t,h] * relu(q[t,h].k[s]); relu(NaN) = NaN."""
    q64 = np.asarray(q).astype(np.float32).astype(np.float64)
    k64 = np.asarray(k).astype(np.float32).astype(np.float64)
    dots = np.einsum("thd,sd->ths", q64, k64)
    relu = np.where(np.isnan(dots) | (dots > 0), dots, 0.0)
    with np.errstate(invalid="ignore"):
        head_sum = np.einsum("th,ths->ts", np.asarray(w, np.float64), relu).astype(np.float32)
    if scale is not None:
        head_sum = head_sum * np.asarray(scale, np.float32)[None, :]
    return head_sum


def bf_rank(cands, score):
    """§3 as a sort key: NaN last, then score descending (-0.0 == +0.0), then position."""
    def key(p):
        s = float(score[p])
        return (1, 0.0, p) if math.isnan(s) else (0, -s, p)
    return sorted(cands, key=key)


def bf_ranges(ks, ke, T, S):
    ks = [0] * T if ks is None else [int(x) for x in ks]
    ke = [S - T + t + 1 for t in range(T)] if ke is None else [int(x) for x in ke]
    clamp = lambda v: max(0, min(S, v))  # noqa: E731
    return [clamp(v) for v in ks], [clamp(v) for v in ke]


def bf_pool(k, scale, B, pool_dtype):
    """§5.2: per-block mean of k[s]*scale[s], stored in pool_dtype (fp8: per-block scale)."""
    k = np.asarray(k).astype(np.float32)
    S, D = k.shape
    nb = -(-S // B)
    means = np.zeros((nb, D), np.float32)
    for b in range(nb):
        toks = range(b * B, min((b + 1) * B, S))
        for d in range(D):
            total = sum(float(k[s, d]) * (1.0 if scale is None else float(scale[s])) for s in toks)
            means[b, d] = np.float32(total / len(toks))
    if pool_dtype != "float8_e4m3fn":
        return means.astype(POOL[pool_dtype]), None
    pscale = np.zeros(nb, np.float32)
    out = np.zeros((nb, D), ml_dtypes.float8_e4m3fn)
    for b in range(nb):
        amax = max(abs(float(v)) for v in means[b])
        pscale[b] = max(np.float32(amax) / np.float32(448.0), np.float32(1e-10))
        for d in range(D):
            v = np.float32(means[b, d]) / pscale[b]
            out[b, d] = np.float32(min(448.0, max(-448.0, float(v))))
    return out, pscale


def bf_format(chosen, width, ks_t, index_base, order):
    if order == "position":
        chosen = sorted(chosen)
    shift = ks_t if index_base == "relative" else 0
    row = [p - shift for p in chosen]
    return row + [-1] * (width - len(row))


def bf_blocks(J, ks_t, ke_t, B, m):
    """§5.4 eligible / forced / best m-2 blocks of one row (ascending)."""
    if ke_t <= ks_t:
        return []
    eligible = list(range(ks_t // B, (ke_t - 1) // B + 1))
    if len(eligible) <= m:
        return eligible
    first, last = eligible[0], eligible[-1]
    best = bf_rank(eligible[1:-1], J)[: m - 2]
    return sorted([first, last] + best)


def bf_candidates(blocks, ks_t, ke_t, B, S):
    return [p for b in blocks for p in range(b * B, min((b + 1) * B, S)) if ks_t <= p < ke_t]


def bf_hisa(inp, *, B, m, topk, pool_dtype="bfloat16", index_base="relative", order="position",
            sparse=False):
    q, k, w, scale = inp["q"], inp["k"], inp["weights"], inp["k_scale"]
    T, S = q.shape[0], k.shape[0]
    ks, ke = bf_ranges(inp["ks"], inp["ke"], T, S)
    pooled, pscale = bf_pool(k, scale, B, pool_dtype)
    J = bf_scores(q, pooled, w, pscale)
    I = bf_scores(q, k, w, scale)
    out = []
    for t in range(T):
        blocks = bf_blocks(J[t], ks[t], ke[t], B, topk // B if sparse else m)
        cands = bf_candidates(blocks, ks[t], ke[t], B, S)
        chosen = bf_rank(cands, I[t])
        if not sparse:
            chosen = chosen[:topk]
        out.append(bf_format(chosen, topk, ks[t], index_base, order))
    return np.array(out, dtype=np.int64).reshape(T, topk)


def bf_dense(inp, *, topk, index_base="relative", order="position"):
    q, k = inp["q"], inp["k"]
    T, S = q.shape[0], k.shape[0]
    ks, ke = bf_ranges(inp["ks"], inp["ke"], T, S)
    I = bf_scores(q, k, inp["weights"], inp["k_scale"])
    out = [bf_format(bf_rank(list(range(ks[t], ke[t])), I[t])[:topk], topk, ks[t], index_base,
                     order) for t in range(T)]
    return np.array(out, dtype=np.int64).reshape(T, topk)


def ref_kwargs(inp):
    return dict(k_scale=inp["k_scale"], ks=inp["ks"], ke=inp["ke"])


def run_hisa(inp, **kw):
    return R.hisa_select(inp["q"], inp["k"], inp["weights"], **ref_kwargs(inp), **kw)


def run_dense(inp, **kw):
    return R.dense_select(inp["q"], inp["k"], inp["weights"], **ref_kwargs(inp), **kw)


def run_sparse(inp, **kw):
    return R.block_sparse_select(inp["q"], inp["k"], inp["weights"], **ref_kwargs(inp), **kw)


RANGES = ["causal", "ragged", "packed"]


def make(T, S, H, D, ranges="causal", **kw):
    return exact_inputs(T, S, H, D, ragged=ranges == "ragged", packed=ranges == "packed", **kw)


# --------------------------------------------------------------------------------------------
# end-to-end selections vs brute force on exact inputs (ties everywhere)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranges", RANGES)
@pytest.mark.parametrize("pool_dtype", ["bfloat16", "float32", "float8_e4m3fn"])
@pytest.mark.parametrize("order", ["position", "score"])
@pytest.mark.parametrize("index_base", ["relative", "absolute"])
def test_hisa_matches_bruteforce(ranges, pool_dtype, order, index_base):
    seed = 10 * RANGES.index(ranges) + len(pool_dtype)
    inp = make(24, 128, 4, 8, ranges, seed=seed, zero_frac=0.4)
    kw = dict(block_size=8, block_topk=4, topk=16, pool_dtype=pool_dtype, index_base=index_base,
              order=order)
    got = run_hisa(inp, **kw)
    want = bf_hisa(inp, B=8, m=4, topk=16, pool_dtype=pool_dtype, index_base=index_base,
                   order=order)
    assert_selection_equal(got, want)


@pytest.mark.parametrize("ranges", RANGES)
@pytest.mark.parametrize("order", ["position", "score"])
@pytest.mark.parametrize("index_base", ["relative", "absolute"])
def test_dense_matches_bruteforce(ranges, order, index_base):
    inp = make(20, 96, 3, 8, ranges, seed=7)
    got = run_dense(inp, topk=24, index_base=index_base, order=order)
    assert_selection_equal(got, bf_dense(inp, topk=24, index_base=index_base, order=order))


@pytest.mark.parametrize("ranges", RANGES)
@pytest.mark.parametrize("pool_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("order", ["position", "score"])
@pytest.mark.parametrize("index_base", ["relative", "absolute"])
def test_block_sparse_matches_bruteforce(ranges, pool_dtype, order, index_base):
    inp = make(20, 128, 4, 8, ranges, seed=3)
    kw = dict(block_size=8, topk=32, pool_dtype=pool_dtype, index_base=index_base, order=order)
    got = run_sparse(inp, **kw)
    want = bf_hisa(inp, B=8, m=None, topk=32, pool_dtype=pool_dtype, index_base=index_base,
                   order=order, sparse=True)
    assert_selection_equal(got, want)


def test_block_sparse_outputs_whole_blocks():
    # m = topk // B = 3 blocks of 8: far from the diagonal every row outputs 24 positions made of
    # 3 complete blocks including block 0 and the query's own block.
    inp = make(4, 256, 4, 8, seed=5)
    got = run_sparse(inp, block_size=8, topk=24, index_base="absolute")
    for t in range(4):
        row = got[t][got[t] != -1]
        blocks = sorted(set((row // 8).tolist()))
        assert len(blocks) == 3 and blocks[0] == 0 and blocks[-1] == (256 - 4 + t) // 8
        want = [p for b in blocks for p in range(b * 8, (b + 1) * 8) if p <= 256 - 4 + t]
        assert row.tolist() == want


@pytest.mark.parametrize("pool_dtype", ["float32", "bfloat16"])
def test_partial_last_block(pool_dtype):
    inp = make(16, 100, 4, 8, "ragged", seed=11)  # 13 blocks of 8, the last holds 4 tokens
    for ranges in [(None, None), (inp["ks"], inp["ke"])]:
        inp["ks"], inp["ke"] = ranges
        got = run_hisa(inp, block_size=8, block_topk=3, topk=12, pool_dtype=pool_dtype)
        assert_selection_equal(got, bf_hisa(inp, B=8, m=3, topk=12, pool_dtype=pool_dtype))
        got = run_sparse(inp, block_size=8, topk=24, pool_dtype=pool_dtype, order="score")
        want = bf_hisa(inp, B=8, m=None, topk=24, pool_dtype=pool_dtype, order="score",
                       sparse=True)
        assert_selection_equal(got, want)
    pooled, scale = R.pool_keys(inp["k"], inp["k_scale"], block_size=8, pool_dtype="float32")
    assert scale is None and pooled.shape == (13, 8)
    np.testing.assert_array_equal(pooled, bf_pool(inp["k"], None, 8, "float32")[0])
    # the partial block's mean divides by its 4 tokens
    np.testing.assert_array_equal(pooled[-1], inp["k"][96:].sum(0) / np.float32(4))


def test_single_query_row():
    inp = make(1, 64, 2, 8, seed=2)
    for kw in [dict(block_size=8, block_topk=3, topk=8), dict(block_size=16, block_topk=2, topk=8)]:
        got = run_hisa(inp, **kw)
        assert got.shape == (1, 8)
        assert_selection_equal(got, bf_hisa(inp, B=kw["block_size"], m=kw["block_topk"], topk=8))
    assert_selection_equal(run_dense(inp, topk=5), bf_dense(inp, topk=5))


def test_topk_larger_than_candidates():
    inp = make(10, 40, 2, 4, seed=4)  # rows see 31..40 keys; 64 slots
    got = run_hisa(inp, block_size=8, block_topk=8, topk=64)
    assert_selection_equal(got, bf_hisa(inp, B=8, m=8, topk=64))
    assert_selection_equal(run_dense(inp, topk=64), bf_dense(inp, topk=64))
    counts = (got != -1).sum(1)
    np.testing.assert_array_equal(counts, np.arange(31, 41))


def test_empty_and_inverted_rows():
    inp = make(6, 64, 2, 4, seed=6)
    inp["ks"] = np.array([5, 10, 64, 0, 30, -7], np.int32)
    inp["ke"] = np.array([5, 3, 64, 0, 31, 100], np.int32)  # clamped: row 5 sees [0, 64)
    for got, want in [
        (run_hisa(inp, block_size=8, block_topk=2, topk=8), bf_hisa(inp, B=8, m=2, topk=8)),
        (run_dense(inp, topk=8), bf_dense(inp, topk=8)),
        (run_sparse(inp, block_size=8, topk=16),
         bf_hisa(inp, B=8, m=None, topk=16, sparse=True)),
    ]:
        assert_selection_equal(got, want)
        assert (got[:4] == -1).all()
        assert got[4].tolist()[:2] == [0, -1]


# --------------------------------------------------------------------------------------------
# special values
# --------------------------------------------------------------------------------------------
def nan_inputs(seed=0):
    inp = make(12, 64, 3, 4, "ragged", seed=seed)
    inp["k"][[5, 20, 21, 40]] = np.nan  # NaN token scores in every row (and NaN pooled blocks)
    inp["weights"][3, 1] = -np.inf  # row 3: -inf where head 1 fires, NaN (=-inf*0) elsewhere
    inp["weights"][7, 0] = np.nan  # row 7: all NaN
    inp["q"][9, 2, 0] = np.inf  # row 9: +inf / NaN mix
    return inp


@pytest.mark.parametrize("order", ["position", "score"])
def test_nan_and_inf_scores(order):
    inp = nan_inputs()
    I = bf_scores(inp["q"], inp["k"], inp["weights"], None)
    assert np.isnan(I[:, 5]).all() and np.isneginf(I[3]).any() and np.isnan(I[7]).all()
    np.testing.assert_array_equal(R.token_scores(inp["q"], inp["k"], inp["weights"]), I)
    assert_selection_equal(run_dense(inp, topk=16, order=order),
                           bf_dense(inp, topk=16, order=order))
    for pool in ["bfloat16", "float32"]:
        got = run_hisa(inp, block_size=8, block_topk=3, topk=16, pool_dtype=pool, order=order)
        assert_selection_equal(got, bf_hisa(inp, B=8, m=3, topk=16, pool_dtype=pool, order=order))


def test_nan_ranks_below_minus_inf():
    scores = np.array([np.nan, -np.inf, 1.0, np.nan, -np.inf, -0.0, 0.0], np.float32)
    assert R.rank_order(scores).tolist() == [2, 5, 6, 1, 4, 0, 3]
    # dense row with NaN and -inf candidates keeps every candidate when topk allows
    inp = make(1, 8, 1, 1, seed=0)
    inp["q"][:] = 1.0
    inp["k"][:, 0] = [np.nan, 1, 0, -1, np.nan, 1, 0, 0.5]
    inp["weights"][:] = -np.inf  # scores: NaN, -inf, NaN(-inf*0), NaN, NaN, -inf, NaN, -inf
    got = run_dense(inp, topk=8, order="score")
    assert got[0].tolist() == [1, 5, 7, 0, 2, 3, 4, 6]


def test_rank_order_of_every_float_class_without_warnings():
    # signalling and quiet NaNs of both signs, zeros, subnormals and infinities (the GPU topk tests'
    # bit-pattern rows): ranked by SPEC section 3, and no floating-point warning on the way
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x80000000, 0x00000000, 0x00000001,
                     0x80000001, 0x7F800000, 0xFF800000, 0x3F800000], np.uint32)
    with np.errstate(all="raise"):
        order = R.rank_order(bits.view(np.float32))
    assert order.tolist() == [7, 9, 5, 3, 4, 6, 8, 0, 1, 2]


def test_negative_zero_ties_with_positive_zero():
    s = np.array([-0.0, 0.0, -1.0, -0.0, 0.0, 2.0], np.float32)
    assert R.rank_order(s).tolist() == [5, 0, 1, 3, 4, 2]
    assert R.rank_order(s, positions=[9, 8, 7, 6, 5, 4]).tolist() == [5, 4, 3, 1, 0, 2]
    vals, idx = R.topk(s[None], 4)
    assert idx[0].tolist() == [5, 0, 1, 3]
    assert [math.copysign(1, v) for v in vals[0, 1:]] == [-1, 1, -1]
    # token scores of -0.0 (negative weight times relu = 0) tie by position
    inp = make(3, 16, 1, 4, seed=1)
    inp["weights"][:] = -1.0
    assert_selection_equal(run_dense(inp, topk=16, order="score"),
                           bf_dense(inp, topk=16, order="score"))


# --------------------------------------------------------------------------------------------
# block selection specifics
# --------------------------------------------------------------------------------------------
def test_m2_selects_only_forced_blocks():
    inp = make(16, 128, 4, 8, "packed", seed=9)
    blocks = R.select_blocks(inp["q"], R.pool_keys(inp["k"], block_size=8)[0], inp["weights"],
                             ks=inp["ks"], ke=inp["ke"], block_size=8, block_topk=2)
    ks, ke = inp["ks"], inp["ke"]
    for t in range(16):
        first, last = ks[t] // 8, (ke[t] - 1) // 8
        want = [first, last] if last > first else [first, -1]
        assert blocks[t].tolist() == (want if ke[t] > ks[t] else [-1, -1])
    got = run_hisa(inp, block_size=8, block_topk=2, topk=16)
    assert_selection_equal(got, bf_hisa(inp, B=8, m=2, topk=16))


def test_m1_keeps_first_eligible_block():
    inp = make(4, 64, 2, 4, seed=1)
    blocks = R.select_blocks(inp["q"], R.pool_keys(inp["k"], block_size=8)[0], inp["weights"],
                             ks=None, ke=None, block_size=8, block_topk=1)
    assert blocks[:, 0].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("ranges", RANGES)
@pytest.mark.parametrize("pool_dtype", ["bfloat16", "float32", "float8_e4m3fn"])
def test_select_blocks_matches_bruteforce(ranges, pool_dtype):
    inp = make(24, 256, 4, 8, ranges, seed=12)
    pooled, pscale = R.pool_keys(inp["k"], inp["k_scale"], block_size=16, pool_dtype=pool_dtype)
    bpooled, bscale = bf_pool(inp["k"], inp["k_scale"], 16, pool_dtype)
    assert pooled.dtype == np.dtype(POOL[pool_dtype])
    np.testing.assert_array_equal(pooled.view(np.uint8), bpooled.view(np.uint8))
    np.testing.assert_array_equal(pscale, bscale)
    J = R.block_scores(inp["q"], pooled, inp["weights"], pscale)
    np.testing.assert_array_equal(J, bf_scores(inp["q"], bpooled, inp["weights"], bscale))
    got = R.select_blocks(inp["q"], pooled, inp["weights"], pooled_scale=pscale, ks=inp["ks"],
                          ke=inp["ke"], block_size=16, block_topk=5)
    ks, ke = bf_ranges(inp["ks"], inp["ke"], 24, 256)
    want = [bf_blocks(J[t], ks[t], ke[t], 16, 5) for t in range(24)]
    want = np.array([w + [-1] * (5 - len(w)) for w in want])
    assert got.dtype == np.int32
    assert_selection_equal(got, want)


def test_select_blocks_seq_len_clamps_ranges():
    inp = make(3, 64, 2, 4, seed=3)
    pooled, _ = R.pool_keys(inp["k"], block_size=8)
    ks = np.array([0, 30, 50], np.int32)
    ke = np.array([1000, 1000, 1000], np.int32)
    got = R.select_blocks(inp["q"], pooled, inp["weights"], ks=ks, ke=ke, block_size=8,
                          block_topk=8, seq_len=40)  # ke clamps to 40: blocks up to 4
    assert got.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1], [3, 4] + [-1] * 6, [-1] * 8]


def test_refine_ignores_invalid_and_duplicate_blocks():
    inp = make(4, 64, 2, 4, seed=8)
    blocks = np.array([[1, -1, 99, 1], [-5, 2, 2, 7], [-1, -1, -1, -1], [0, 3, 8, 5]], np.int32)
    ks = np.array([0, 20, 0, 4], np.int32)
    ke = np.array([64, 60, 64, 44], np.int32)
    got = R.refine(inp["q"], inp["k"], inp["weights"], blocks, ks=ks, ke=ke, block_size=8,
                   topk=32, index_base="absolute", order="score")
    I = bf_scores(inp["q"], inp["k"], inp["weights"], None)
    for t in range(4):
        cands = bf_candidates(sorted({b for b in blocks[t] if 0 <= b < 8}), ks[t], ke[t], 8, 64)
        assert got[t].tolist() == bf_format(bf_rank(cands, I[t]), 32, 0, "absolute", "score")
    assert (got[2] == -1).all()
    assert [(row != -1).sum() for row in got] == [8, 8, 0, 16]


def test_hisa_equals_dense_when_all_blocks_fit():
    # every eligible block fits in m: exact inputs ...
    inp = make(20, 128, 4, 8, "ragged", seed=13)
    for order in ["position", "score"]:
        assert_selection_equal(run_hisa(inp, block_size=16, block_topk=8, topk=40, order=order),
                               run_dense(inp, topk=40, order=order))
    # ... and general inputs (the reference's scores do not depend on which keys are scored)
    rng = np.random.default_rng(0)
    T, S, H, D = 16, 200, 8, 32
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((S, D)).astype(np.float32)
    w = rng.standard_normal((T, H)).astype(np.float32)
    ksc = rng.uniform(0.5, 2.0, S).astype(np.float32)
    a = R.hisa_select(q, k, w, k_scale=ksc, block_size=32, block_topk=7, topk=64, order="score")
    b = R.dense_select(q, k, w, k_scale=ksc, topk=64, order="score")
    assert_selection_equal(a, b)


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------
def test_fp8_pool_scale_rule():
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((40, 16)) * 3).astype(np.float32)
    k[16:24] = 0.0  # an all-zero block: scale = 1e-10, values 0
    ksc = rng.uniform(0.5, 4.0, 40).astype(np.float32)
    pooled, scale = R.pool_keys(k, ksc, block_size=8, pool_dtype="float8_e4m3fn")
    mean, none = R.pool_keys(k, ksc, block_size=8, pool_dtype="float32")
    assert none is None and pooled.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32
    np.testing.assert_allclose(mean, (k * ksc[:, None]).reshape(5, 8, 16).mean(1), rtol=1e-6)
    amax = np.abs(mean).max(1)
    np.testing.assert_array_equal(scale, np.maximum(amax / np.float32(448), np.float32(1e-10)))
    assert scale[2] == np.float32(1e-10) and (pooled[2].astype(np.float32) == 0).all()
    want = np.clip(mean / scale[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(pooled.view(np.uint8), want.view(np.uint8))
    assert np.abs(pooled.astype(np.float32)).max(1)[[0, 1, 3, 4]].tolist() == [448.0] * 4


def test_bf16_pool_rounds_to_nearest_even():
    # blocks of one token: the mean is the key itself
    k = np.array([[1 + 2**-8], [1 + 3 * 2**-8], [1 + 2**-8 + 2**-20], [-(1 + 2**-8)]], np.float32)
    pooled, scale = R.pool_keys(k, block_size=1)
    assert scale is None and pooled.dtype == ml_dtypes.bfloat16
    assert pooled[:, 0].astype(np.float32).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, -1.0]


def test_pool_uses_k_scale_and_mean():
    k = np.arange(12, dtype=np.float32).reshape(6, 2)
    ksc = np.array([1, 2, 1, 2, 1, 4], np.float32)
    pooled, _ = R.pool_keys(k, ksc, block_size=4, pool_dtype="float32")
    assert pooled.tolist() == [[(0 + 4 + 4 + 12) / 4, (1 + 6 + 5 + 14) / 4],
                               [(8 + 40) / 2, (9 + 44) / 2]]


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("ranges", ["causal", "packed"])
def test_every_dtype_matches_fp32_on_exact_inputs(dtype, ranges):
    base = make(16, 128, 4, 16, ranges, seed=21)
    low = make(16, 128, 4, 16, ranges, seed=21, dtype=dtype)
    assert low["q"].dtype == np.dtype(POOL.get(dtype, np.float16))
    for pool in ["bfloat16", "float32"]:
        kw = dict(block_size=16, block_topk=3, topk=20, pool_dtype=pool, order="score")
        assert_selection_equal(run_hisa(low, **kw), run_hisa(base, **kw))
        assert_selection_equal(run_sparse(low, block_size=16, topk=32, pool_dtype=pool),
                               run_sparse(base, block_size=16, topk=32, pool_dtype=pool))
    assert_selection_equal(run_dense(low, topk=20), run_dense(base, topk=20))
    assert_selection_equal(run_hisa(low, block_size=16, block_topk=3, topk=20),
                           bf_hisa(base, B=16, m=3, topk=20))


def test_token_scores_k_scale_after_head_sum_and_chunking(monkeypatch):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((7, 3, 5)).astype(np.float32)
    k = rng.standard_normal((11, 5)).astype(np.float32)
    w = rng.standard_normal((7, 3)).astype(np.float32)
    ksc = rng.uniform(0.1, 3, 11).astype(np.float32)
    I = R.token_scores(q, k, w, ksc)
    assert I.dtype == np.float32 and I.shape == (7, 11)
    np.testing.assert_allclose(I, bf_scores(q, k, w, ksc), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(I, R.token_scores(q, k, w) * ksc[None, :])
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 40)  # 1-row chunks
    np.testing.assert_array_equal(R.token_scores(q, k, w, ksc), I)
    inp = make(9, 64, 3, 4, "ragged", seed=2)
    assert_selection_equal(run_dense(inp, topk=8), bf_dense(inp, topk=8))
    assert_selection_equal(run_hisa(inp, block_size=8, block_topk=3, topk=8),
                           bf_hisa(inp, B=8, m=3, topk=8))


# --------------------------------------------------------------------------------------------
# topk primitive and small helpers
# --------------------------------------------------------------------------------------------
def test_topk_with_lengths_matches_bruteforce():
    rng = np.random.default_rng(3)
    scores = rng.choice(np.array([-1, -0.0, 0.0, 0.5, 2, np.nan, -np.inf, np.inf], np.float32),
                        size=(9, 20))
    lengths = np.array([0, 1, 5, 20, 25, -3, 13, 7, 19], np.int32)
    vals, idx = R.topk(scores, 8, lengths=lengths)
    assert vals.dtype == np.float32 and idx.dtype == np.int32 and idx.shape == (9, 8)
    for r in range(9):
        n = max(0, min(20, int(lengths[r])))
        want = bf_rank(list(range(n)), scores[r])[:8]
        assert idx[r].tolist() == want + [-1] * (8 - len(want))
        np.testing.assert_array_equal(vals[r, : len(want)], scores[r, want])
        assert np.isneginf(vals[r, len(want):]).all()
    vals2, idx2 = R.topk(scores, 30)
    assert (idx2[:, 20:] == -1).all()
    assert idx2[:, :20].tolist() == [bf_rank(list(range(20)), s) for s in scores]


def test_ranges_helpers():
    ks, ke = R.default_ranges(3, 10)
    assert ks.dtype == np.int32 and ks.tolist() == [0, 0, 0] and ke.tolist() == [8, 9, 10]
    ks, ke = R.clamp_ranges(np.array([-2, 3, 12]), np.array([5, 40, -1]), 10)
    assert ks.dtype == ke.dtype == np.int32
    assert ks.tolist() == [0, 3, 10] and ke.tolist() == [5, 10, 0]


def test_bad_options_raise():
    inp = make(2, 16, 1, 2)
    with pytest.raises(ValueError, match="order"):
        run_dense(inp, topk=4, order="random")
    with pytest.raises(ValueError, match="index_base"):
        run_hisa(inp, block_size=4, block_topk=2, topk=4, index_base="zero")
    with pytest.raises(ValueError, match="pool_dtype"):
        R.pool_keys(inp["k"], pool_dtype="float16")


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------
@st.composite
def problems(draw):
    T = draw(st.integers(1, 6))
    S = draw(st.integers(1, 48))
    H = draw(st.integers(1, 3))
    D = draw(st.integers(1, 4))
    B = draw(st.sampled_from([1, 2, 4, 8]))
    m = draw(st.integers(2, 6))
    topk = draw(st.integers(1, m * B))
    seed = draw(st.integers(0, 2**16))
    inp = exact_inputs(T, S, H, D, seed=seed, zero_frac=draw(st.sampled_from([0.0, 0.3, 0.8])))
    if draw(st.booleans()):
        inp["ks"] = np.array(draw(st.lists(st.integers(-3, S + 3), min_size=T, max_size=T)), np.int32)
        inp["ke"] = np.array(draw(st.lists(st.integers(-3, S + 3), min_size=T, max_size=T)), np.int32)
    opts = dict(index_base=draw(st.sampled_from(["relative", "absolute"])),
                order=draw(st.sampled_from(["position", "score"])))
    return inp, B, m, topk, opts


def check_structure(out, inp, topk, opts, n_cands):
    T, S = inp["q"].shape[0], inp["k"].shape[0]
    ks, ke = bf_ranges(inp["ks"], inp["ke"], T, S)
    assert out.dtype == np.int32 and out.shape == (T, topk)
    for t in range(T):
        row = out[t].tolist()
        n = sum(v != -1 for v in row)
        assert n == min(topk, n_cands[t])
        assert all(v == -1 for v in row[n:])  # -1 only at the end
        pos = [v + (ks[t] if opts["index_base"] == "relative" else 0) for v in row[:n]]
        assert len(set(pos)) == n and all(ks[t] <= p < ke[t] for p in pos)
        if opts["order"] == "position":
            assert pos == sorted(pos)


@settings(max_examples=50, deadline=None)
@given(problems())
def test_property_dense(problem):
    inp, _, _, topk, opts = problem
    out = run_dense(inp, topk=topk, **opts)
    ks, ke = bf_ranges(inp["ks"], inp["ke"], inp["q"].shape[0], inp["k"].shape[0])
    check_structure(out, inp, topk, opts, [max(0, b - a) for a, b in zip(ks, ke)])
    assert_selection_equal(out, bf_dense(inp, topk=topk, **opts))


@settings(max_examples=50, deadline=None)
@given(problems())
def test_property_hisa(problem):
    inp, B, m, topk, opts = problem
    out = run_hisa(inp, block_size=B, block_topk=m, topk=topk, pool_dtype="float32", **opts)
    T, S = inp["q"].shape[0], inp["k"].shape[0]
    ks, ke = bf_ranges(inp["ks"], inp["ke"], T, S)
    pooled, _ = R.pool_keys(inp["k"], block_size=B, pool_dtype="float32")
    blocks = R.select_blocks(inp["q"], pooled, inp["weights"], ks=inp["ks"], ke=inp["ke"],
                             block_size=B, block_topk=m, seq_len=S)
    n_cands = [len(bf_candidates([b for b in blocks[t] if b >= 0], ks[t], ke[t], B, S))
               for t in range(T)]
    check_structure(out, inp, topk, opts, n_cands)
    # a row whose eligible blocks all fit keeps every in-range candidate
    for t in range(T):
        if ke[t] > ks[t] and (ke[t] - 1) // B - ks[t] // B < m:
            assert n_cands[t] == ke[t] - ks[t]
    assert_selection_equal(out, bf_hisa(inp, B=B, m=m, topk=topk, pool_dtype="float32", **opts))
