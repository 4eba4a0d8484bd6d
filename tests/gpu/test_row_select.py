"""The row top-k kernel (row_select.cuh) on a real GPU, path by path, bit-exact vs the NumPy
reference: list mode with the candidate list, with the candidate list overflowing (radix levels
over the whole row), ties split at the threshold, the bitonic fallback of the bucket sort, rows
cached in shared memory and rows read from global memory (through the ring of asynchronous
copies, or with plain loads where a row is not 16-byte aligned), the in-order mode for
large k, warp mode (one warp per short row in position order: the block top-m), register
mode (one CTA per row of at most 8192 items, the keys in registers; the refinement's on
ranking keys of every kind), and few long rows split into chunks whose top k are merged.
Run with ``pytest -m gpu``.
"""
import functools
import importlib.util
import pathlib

import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import reference, testing, workloads

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


def _randn(rng, R, N):
    return rng.standard_normal((R, N)).astype(np.float32)


def _one_bin(rng, R, N):
    # every value in [1, 1.2): one bin of the first 11-bit histogram, so the candidate list
    # (at most max(512, k) entries) overflows and the radix levels run over the whole row (list
    # mode); a narrow range of keys for register mode's levels
    return (1.0 + 0.2 * rng.random((R, N))).astype(np.float32)


def _rounded(rng, R, N):
    # ~600 distinct values: the k-th score is shared by several items (ties split at it)
    return np.round(rng.standard_normal((R, N)), 2).astype(np.float32)


def _skewed(rng, R, N):
    # one huge value and the rest packed into [1, 1.0001): one bucket of the sort holds them
    # all, which sends the row to the bitonic fallback
    x = (1.0 + 1e-4 * rng.random((R, N))).astype(np.float32)
    x[:, rng.integers(0, N, size=R)] = 1e30
    return x


CASES = [
    ("randn", _randn, 64, 8192, 2048),        # cached, candidate list
    ("randn", _randn, 4, 131072, 2048),       # global memory, candidate list
    ("randn", _randn, 8, 5000, 3000),         # k > N / 2, cached
    ("randn", _randn, 4, 40001, 3000),        # not cached, rows 16-byte aligned or not (ring / scalar loads)
    ("one_bin", _one_bin, 8, 8192, 100),      # cached, candidate list overflows
    ("one_bin", _one_bin, 2, 131072, 2048),   # global memory, candidate list overflows
    ("rounded", _rounded, 16, 8192, 2048),    # ties at the threshold, candidate path
    ("rounded", _rounded, 2, 131072, 2048),   # ties at the threshold, overflow path, global
    ("skewed", _skewed, 8, 8192, 2048),       # bitonic fallback of the sort
    ("randn", _randn, 4, 40000, 9000),        # lists of 16384 entries do not fit: in-order mode, uncached
]


def _filtered_select_kernel(reg, R, sms, wide=True):
    # the filtered top-k's select of R rows: register mode at 1024 threads where the rows fit one
    # wave (FILTER_WIDE_SELECT), else at 512, or list mode
    if reg and wide and R <= sms:
        return "topk_filtered_wide_kernel"
    return "topk_filtered_regs_kernel" if reg else "topk_filtered_kernel"


def _merge_kernel(kept):
    # the split top-k's merge of `kept` items per row: register mode where they fit
    from hisa_cupy.kernels import cupy_backend

    regs = cupy_backend.REG_SELECT and kept <= cupy_backend.REG_SELECT_ITEMS
    return "topk_merge_regs_kernel" if regs else "topk_merge_kernel"


def _check_topk(scores, k, lengths, err_msg):
    vals, idx = hisa_cupy.topk(torch.from_numpy(scores).cuda(), k,
                               lengths=None if lengths is None else torch.from_numpy(lengths).cuda(), backend="cupy")
    rv, ri = reference.topk(scores, k, lengths=lengths)
    testing.assert_selection_equal(idx, ri, err_msg=err_msg)
    testing.assert_values_identical(vals, rv, err_msg=err_msg)


@pytest.mark.parametrize("name,gen,R,N,k", CASES, ids=[f"{c[0]}-{c[2]}x{c[3]}-k{c[4]}" for c in CASES])
def test_topk_paths(cuda_device, monkeypatch, launched_kernels, name, gen, R, N, k):
    # rows of at most 8192 columns take register mode by default: the same rows with it off
    from hisa_cupy.kernels import cupy_backend

    launched = launched_kernels
    rng = np.random.default_rng(N + k)
    scores = gen(rng, R, N)
    lengths = rng.integers(0, N + 1, size=R).astype(np.int32)
    lengths[0] = N
    # few long rows are split into chunks by default (TOPK_SPLIT = 0): the same rows unsplit too;
    # long rows with k small against N take the filtered path (TOPK_FILTER) before either
    sms = cupy_backend._device_facts(cupy_backend._device_id())["sms"]
    for reg in (True, False) if N <= cupy_backend.REG_SELECT_ITEMS else (True,):
        monkeypatch.setattr(cupy_backend, "REG_SELECT", reg)
        for split in (0, 1):
            monkeypatch.setattr(cupy_backend, "TOPK_SPLIT", split)
            for lens in (None, lengths):
                launched.clear()
                _check_topk(scores, k, lens, f"{name} lengths={lens is not None} reg={reg} split={split}")
                P = cupy_backend._topk_split(R, N, k, lens is not None, sms)
                if cupy_backend._topk_filter(R, N, k, lens is not None) is not None:
                    expected = ["topk_filter_kernel", _filtered_select_kernel(reg, R, sms), "topk_rescue_kernel"]
                elif P > 1:
                    expected = ["topk_chunks_kernel", _merge_kernel(P * k)]
                elif reg and N <= cupy_backend.REG_SELECT_ITEMS:
                    expected = ["topk_regs_kernel"]
                else:
                    expected = ["topk_kernel"]
                assert launched == expected


def _all_equal(rng, R, N):
    return np.full((R, N), 0.5, np.float32)  # every item ties with the k-th


def _specials(rng, R, N):
    x = _rounded(rng, R, N)
    for v in (np.nan, np.inf, -np.inf, -0.0):  # NaN ranks last, -0.0 and 0.0 are equal scores
        x[rng.random((R, N)) < 0.05] = v
    return x


def _bit_patterns(rng, R, N):
    # loaded_score_key's edge bit patterns (common.cuh: an add of +0 turns -0 into +0, inline PTX
    # without .ftz keeps subnormals): NaNs of both signs and several payloads (all rank last, as
    # one), both zeros (equal), subnormals of both signs (distinct, ordered among the normals) and
    # both infinities, as 20% of a randn row
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000,
                     0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,
                     0x7F800000, 0xFF800000], np.uint32).view(np.float32)
    x = _randn(rng, R, N)
    at = rng.random((R, N)) < 0.2
    x[at] = rng.choice(bits, int(at.sum()))
    return x


def _masked(rng, R, N):
    # attention-style scores: a third of the row masked to -inf, the rest randn
    x = _randn(rng, R, N)
    x[rng.random((R, N)) < 0.3] = -np.inf
    return x


def _wide(rng, R, N):
    # magnitudes over 60 decades: spread linearly by value (the filtered select's one level of
    # bins), most keys would share the lowest bins, so that path gives way to the levels over key
    # bits
    return (rng.choice([-1.0, 1.0], size=(R, N)) * 10.0 ** rng.uniform(-30, 30, (R, N))).astype(np.float32)


def _past_max(rng, R, N):
    # finite scores of both signs near FLT_MAX, a few positive: the range of the filter's sample
    # and of the filtered select's candidates (which hold negatives too) exceeds FLT_MAX, so the
    # bins by value must give way (all in bin 0) rather than compute a bin from an infinite
    # difference
    x = -(1.0 + rng.random((R, N))) * 1.5e38
    pos = rng.random((R, N)) < 0.01
    x[pos] = (1.0 + rng.random(int(pos.sum()))) * 1.5e38
    return x.astype(np.float32)


def _window_edges(rng, R, N):
    # uniform [0, 1) rows whose largest score (10 to 14, and ties at it in the last rows) puts the
    # bottom of topk_regs_kernel's first window (four binades below it: 0.625 to 0.875) near the
    # k-th largest at k = N / 4 (~0.75): the k-th in the window, at its lowest bin, or below it
    # (then the levels over the row's range), with ties at the window's edge value
    x = rng.random((R, N)).astype(np.float32)
    top = np.resize(np.array([10.0, 11.0, 11.9, 12.0, 12.1, 14.0], np.float32), R)
    x[:, 0] = top
    x[R // 2:, 1:8] = top[R // 2:, None]                       # ties at the largest
    edge = (top / np.float32(16.0)).astype(np.float32)         # the window's lowest key is just above
    x[:, 8:40] = edge[:, None]
    x[:, 40:72] = np.nextafter(edge, np.float32(0))[:, None]
    return x


@pytest.mark.parametrize("N", [1025, 2047, 4097, 8191, 8192])
@pytest.mark.parametrize("gen", [_randn, _one_bin, _rounded, _skewed, _all_equal, _specials, _bit_patterns,
                                 _masked, _wide, _past_max, _window_edges])
def test_register_mode_topk(cuda_device, launched_kernels, gen, N):
    # register mode alone, by score: rows not a multiple of the 512 x 16 register layout, k from 1
    # to more than the row, NaN / inf / signed zeros, ragged lengths (empty rows included); the
    # threshold on wide (randn) and narrow (one_bin) key ranges, ties split at the threshold
    # (rounded, all_equal: in position order across warps), the sort's bitonic fallback (skewed),
    # masked rows (masked), scores too spread for bins by value (wide), and the k-th largest at the
    # edge of the first window below the row's largest (window_edges)
    launched = launched_kernels
    rng = np.random.default_rng(N)
    scores = gen(rng, 6, N)
    lengths = np.array([N, 0, 1, N // 2, N - 1, 600], np.int32)
    for k in (1, 100, 2048, 4096):  # k > N: padding
        for lens in (None, lengths):
            _check_topk(scores, k, lens, f"{gen.__name__} N={N} k={k} lengths={lens is not None}")
    assert set(launched) == {"topk_regs_kernel"}


def test_topk_matches_torch_on_distinct_values(cuda_device):
    # distinct values: the ranking is the plain order, so torch.topk must agree exactly
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.permutation(64 * 8192).reshape(64, 8192).astype(np.float32)).cuda()
    vals, idx = hisa_cupy.topk(x, 2048, backend="cupy")
    tv, ti = torch.topk(x, 2048, dim=1)
    assert torch.equal(vals, tv) and torch.equal(idx.long(), ti)


@pytest.mark.parametrize("order", ["position", "score"])
def test_long_rows_dense_and_hisa(cuda_device, order):
    # candidate rows of 65536 keys read from global memory, in both output orders
    inp = testing.exact_inputs(8, 65536, 64, 128, dtype="float8_e4m3fn", seed=5)
    for fn, kw in (("dense_select", dict(topk=2048)),
                   ("hisa_select", dict(block_size=128, block_topk=512, topk=2048))):
        ref = getattr(reference, fn)(inp["q"], inp["k"], inp["weights"], order=order, **kw)
        got = getattr(hisa_cupy, fn)(*(testing.to_torch(inp[n]) for n in ("q", "k", "weights")), order=order,
                                     backend="cupy", **kw)
        testing.assert_selection_equal(got, ref, err_msg=fn)


@pytest.mark.parametrize("S", [128, 3968, 4096, 4224, 32768, 32896, 65536, 65664, 128000, 131072, 131200])
def test_warp_mode_block_topm_and_short_rows(cuda_device, monkeypatch, launched_kernels, S):
    # rows of 1, 31, 32, 33, 256, 257, 512, 513, 1000, 1024 blocks (warp mode: 8 keys per lane up
    # to 256 blocks, 16 up to 512, then 32) and 1025 (the CTA kernel); exact inputs
    # have many equal block scores (ties at the threshold) and ragged rows have fewer eligible
    # blocks than m (-1 padding). The same selections with warp mode off, and on short dense /
    # refinement rows in position order.
    from hisa_cupy.kernels import cupy_backend

    launched = launched_kernels
    T, m = 12, 8
    inp = testing.exact_inputs(T, S, 64, 128, dtype="float8_e4m3fn", seed=S % 997, ragged=True)
    q, k, w = (testing.to_torch(inp[n]) for n in ("q", "k", "weights"))
    ks, ke = testing.to_torch(inp["ks"]), testing.to_torch(inp["ke"])
    rp, _ = reference.pool_keys(inp["k"])
    rb = reference.select_blocks(inp["q"], rp, inp["weights"], ks=inp["ks"], ke=inp["ke"], block_topk=m,
                                 seq_len=S)
    pooled, _ = hisa_cupy.pool_keys(k, backend="cupy")
    nb = -(-S // 128)
    for warp, reg in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(cupy_backend, "WARP_SELECT", warp)
        monkeypatch.setattr(cupy_backend, "REG_SELECT", reg)
        mode = f"warp={warp} reg={reg}"
        launched.clear()
        got = hisa_cupy.select_blocks(q, pooled, w, ks=ks, ke=ke, block_topk=m, seq_len=S, backend="cupy")
        testing.assert_selection_equal(got, rb, err_msg=f"select_blocks {mode}")
        short = warp and nb <= cupy_backend.WARP_SELECT_ITEMS
        warp_name = f"block_topm_warp_kernel<{cupy_backend._warp_keys_per_lane(min(nb, cupy_backend.WARP_SELECT_ITEMS))}>"
        assert (warp_name in launched) == short
        assert not [n for n in launched if n.startswith("block_topm_warp_kernel") and n != warp_name]
        assert ("block_topm_regs_kernel" in launched) == (not short and reg)
        if S <= 4224:  # rows of S keys, and m * B = 1024 candidates, in position order
            got = hisa_cupy.dense_select(q, k, w, ks=ks, ke=ke, topk=200, backend="cupy")
            ref = reference.dense_select(inp["q"], inp["k"], inp["weights"], ks=inp["ks"], ke=inp["ke"], topk=200)
            testing.assert_selection_equal(got, ref, err_msg=f"dense {mode}")
            got = hisa_cupy.refine(q, k, w, testing.to_torch(rb), ks=ks, ke=ke, topk=300, backend="cupy")
            ref = reference.refine(inp["q"], inp["k"], inp["weights"], rb, ks=inp["ks"], ke=inp["ke"], topk=300)
            testing.assert_selection_equal(got, ref, err_msg=f"refine {mode}")
            assert ("refine_topk_warp_kernel" in launched) == warp
            assert ("refine_topk_regs_kernel" in launched) == (not warp and reg)
            dense_short = warp and S <= cupy_backend.WARP_SELECT_ITEMS
            assert ("dense_topk_warp_kernel" in launched) == dense_short
            assert ("dense_topk_regs_kernel" in launched) == (not dense_short and reg)


@pytest.mark.parametrize("m", [3, 4, 64, 65])
@pytest.mark.parametrize("data", ["segments", "exact"])
def test_warp_mode_block_topm_bounded_search(cuda_device, monkeypatch, launched_kernels, m, data):
    # rows of 1024 blocks: where 3 <= m <= 64 the block top-m's threshold search covers only the
    # keys between the least of the lanes' second largest keys and the largest key not forced
    # (row_select_warp's BOUND): at the ends of that range and inside it (m = 3, 4, 64) and just
    # past it (m = 65: the whole range). General scores (segments) against the register-mode select
    # on the same block scores; exact ones (many ties) against the reference
    from hisa_cupy.kernels import cupy_backend

    S, T = 131072, 24
    if data == "segments":
        w = workloads.make_workload("segments", seq_len=S, num_queries=T, seed=m)
        inp = dict(q=w.q, k=w.k, weights=w.weights, k_scale=w.k_scale, ks=w.ks, ke=w.ke)
    else:
        inp = testing.exact_inputs(T, S, 64, 128, dtype="float8_e4m3fn", seed=m, ragged=True)
    q, k, wt, ksc, ks, ke = (testing.to_torch(inp[n]) for n in ("q", "k", "weights", "k_scale", "ks", "ke"))
    pooled, _ = hisa_cupy.pool_keys(k, k_scale=ksc, backend="cupy")
    got = {}
    for warp in (True, False):
        monkeypatch.setattr(cupy_backend, "WARP_SELECT", warp)
        launched_kernels.clear()
        got[warp] = hisa_cupy.select_blocks(q, pooled, wt, ks=ks, ke=ke, block_topk=m, seq_len=S, backend="cupy")
        name = "block_topm_warp_kernel<32>" if warp else "block_topm_regs_kernel"
        assert name in launched_kernels, launched_kernels
    testing.assert_selection_equal(got[True], testing.to_numpy(got[False]),
                                   err_msg=f"{data} m={m}: warp vs register mode")
    if data == "exact":
        rp, _ = reference.pool_keys(inp["k"], inp["k_scale"])
        rb = reference.select_blocks(inp["q"], rp, inp["weights"], ks=inp["ks"], ke=inp["ke"], block_topk=m,
                                     seq_len=S)
        testing.assert_selection_equal(got[True], rb, err_msg=f"exact m={m}")
    assert (testing.to_numpy(got[True]) >= 0).sum(axis=1).max() == m  # some rows have more than m blocks


@pytest.mark.parametrize("m", [35, 64, 96])
def test_warp_mode_block_topm_bound_edges(cuda_device, launched_kernels, m):
    # rows of 1024 blocks whose 64 best blocks that are not forced lie two in every lane (blocks
    # 32..95: lane l holds 32 + l and 64 + l), so the least of the lanes' second largest keys is the
    # 64th best and only 64 keys (and the two forced blocks) lie at or above it. The bounded search
    # (row_select_warp's BOUND, 3 <= m <= 64) must hold the threshold inside its range here: with
    # each lane's largest key instead (m = 35, 64), or the bound used past m = 64 (m = 96), it
    # does not (m = 35: 34 keys at or above the least of the lanes' largest). Exact scores: q
    # one-hot, weights 1/64, pooled values on the bf16 grid (ties below the 64 best).
    import ml_dtypes

    T, H, D, B, nb = 4, 64, 128, 128, 1024
    v = 1.0 + ((np.arange(nb) * 37) % 128) / 128.0  # [1, 2): many ties
    v[32:96] = 2.0 + (np.arange(64)[::-1]) / 64.0  # the 64 best, in [2, 3)
    pooled = np.zeros((nb, D), dtype=np.float32)
    pooled[:, 0] = v
    q = np.zeros((T, H, D), dtype=np.float32)
    q[:, :, 0] = 1.0
    w = np.full((T, H), 1.0 / 64, dtype=np.float32)
    ks, ke = np.zeros(T, dtype=np.int32), np.full(T, nb * B, dtype=np.int32)
    ref = reference.select_blocks(q, pooled, w, ks=ks, ke=ke, block_topk=m, seq_len=nb * B)
    chosen = set(ref[0].tolist())  # the forced blocks 0 and nb - 1, then the best
    assert chosen <= set(range(32, 96)) | {0, nb - 1} if m <= 66 else chosen >= set(range(32, 96))
    got = hisa_cupy.select_blocks(testing.to_torch(q.astype(ml_dtypes.float8_e4m3fn)),
                                  testing.to_torch(pooled.astype(ml_dtypes.bfloat16)), testing.to_torch(w),
                                  ks=testing.to_torch(ks), ke=testing.to_torch(ke), block_topk=m, seq_len=nb * B,
                                  backend="cupy")
    testing.assert_selection_equal(got, ref, err_msg=f"m={m}")
    assert "block_topm_warp_kernel<32>" in launched_kernels, launched_kernels


def test_warp_mode_all_keys_equal(cuda_device, launched_kernels):
    # zero weights: every score is 0, so a row's smallest and largest keys are equal and warp
    # mode's search ends before its first step; ties keep the lowest positions
    inp = testing.exact_inputs(9, 1000, 64, 128, dtype="float8_e4m3fn", seed=11, ragged=True)
    w = np.zeros_like(inp["weights"])
    q, k = testing.to_torch(inp["q"]), testing.to_torch(inp["k"])
    ks, ke = testing.to_torch(inp["ks"]), testing.to_torch(inp["ke"])
    for topk in (1, 100, 999):
        got = hisa_cupy.dense_select(q, k, testing.to_torch(w), ks=ks, ke=ke, topk=topk, backend="cupy")
        ref = reference.dense_select(inp["q"], inp["k"], w, ks=inp["ks"], ke=inp["ke"], topk=topk)
        testing.assert_selection_equal(got, ref, err_msg=f"topk={topk}")
    assert set(launched_kernels) >= {"dense_topk_warp_kernel"}


def _rounded_nan_inf(rng, R, N):
    x = _rounded(rng, R, N)
    for v in (np.nan, np.inf, -np.inf):
        x[rng.random((R, N)) < 0.01] = v
    return x


@pytest.mark.parametrize("gen", [_randn, _one_bin, _rounded_nan_inf])
def test_topk_split_over_chunks(cuda_device, monkeypatch, launched_kernels, gen):
    # few long rows: each row's chunks keep their top k in position order, then a merge ranks
    # the kept items (cupy_backend._topk_split): exact, ties to the lower column across chunks;
    # also a forced split of short chunks (8 chunks of 5000 columns, k = 3000)
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "TOPK_FILTER", False)  # which would take k <= 2048 of 131072
    rng = np.random.default_rng(7)
    for R, N, ks, split in ((64, 131072, (1, 2048, 8192), 0), (3, 40000, (3000,), 8)):
        monkeypatch.setattr(cupy_backend, "TOPK_SPLIT", split)
        scores = gen(rng, R, N)
        for k in ks:
            launched_kernels.clear()
            vals, idx = hisa_cupy.topk(torch.from_numpy(scores).cuda(), k, backend="cupy")
            rv, ri = reference.topk(scores, k)
            testing.assert_selection_equal(idx, ri, err_msg=f"{gen.__name__} {R}x{N} k={k}")
            testing.assert_values_identical(vals, rv)
            P = cupy_backend._topk_split(R, N, k, False, cupy_backend._device_facts(cupy_backend._device_id())["sms"])
            assert launched_kernels == ["topk_chunks_kernel", _merge_kernel(P * k)]


def test_uncached_rows(cuda_device, monkeypatch, launched_kernels):
    # SELECT_CACHE_ROWS off: rows list mode would cache in shared memory are read from global
    # memory instead (the ring for few rows, plain loads for many), and the split top-k's chunks
    # at P = 4 run two CTAs per SM; the same exact results
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "SELECT_CACHE_ROWS", False)
    monkeypatch.setattr(cupy_backend, "REG_SELECT", False)
    rng = np.random.default_rng(11)
    for name, gen, R, N, k in [c for c in CASES if c[3] <= 8192] + [("rounded", _rounded, 300, 8192, 2048)]:
        scores = gen(rng, R, N)
        lengths = rng.integers(0, N + 1, size=R).astype(np.int32)
        for lens in (None, lengths):
            launched_kernels.clear()
            _check_topk(scores, k, lens, f"uncached {name} {R}x{N} k={k} lengths={lens is not None}")
            assert launched_kernels == ["topk_kernel"]
    monkeypatch.setattr(cupy_backend, "TOPK_SPLIT", 4)
    monkeypatch.setattr(cupy_backend, "TOPK_FILTER", False)
    scores = _rounded_nan_inf(rng, 64, 131072)
    launched_kernels.clear()
    _check_topk(scores, 2048, None, "uncached split P = 4")
    assert launched_kernels == ["topk_chunks_kernel", "topk_merge_kernel"]


def _ascending(rng, R, N):
    # sorted rows: every kept column lies in the last chunk, and the other chunks keep none (the
    # row's list fills in column order whatever the spread)
    return np.sort(rng.standard_normal((R, N)).astype(np.float32), axis=1)


def _clustered(rng, R, N):
    # the top columns in a few runs of a row (the bench's "segments" scores look like this: a row's
    # best keys sit in a few topical segments), each run inside one or two chunks
    x = rng.standard_normal((R, N)).astype(np.float32)
    for r in range(R):
        for start in rng.integers(0, N - 1500, size=3):
            x[r, start:start + 1500] += 4.0
    return x


def _mostly_nan(rng, R, N):
    # fewer than k non-NaN columns: fewer than k candidates (rescued); NaN ranks last
    x = np.full((R, N), np.nan, np.float32)
    x[:, rng.integers(0, N, size=1000)] = rng.standard_normal((R, 1000)).astype(np.float32)
    return x


def _failed_rows(name="filter_failed_rows"):
    # the per-row marks of the last call of the filtered path (cupy_backend._filtered_top_k's
    # workspace) or, with name="dense_failed_rows", of dense_select's threshold mode: the rescued rows
    from hisa_cupy.kernels import cupy_backend

    torch.cuda.synchronize()
    views = [ws._views[name][2] for ws in cupy_backend._workspaces.values() if name in ws._views]
    assert len(views) == 1
    return testing.to_numpy(views[0])


FILTER_CASES = [
    # (generator, R, N, ks, rescued rows expected: "none", "all" or None = not asserted)
    (_randn, 64, 131072, (1, 100, 2048), "none"),
    (_rounded_nan_inf, 16, 131072, (2048,), None),     # ties at the threshold, NaN / inf kept out or in
    (_one_bin, 8, 65536, (2048,), "none"),             # a narrow key range: P = 8 chunks
    (_randn, 5, 100003, (700,), "none"),               # a partial last chunk, rows not 16-byte aligned
    (_ascending, 4, 131072, (2048,), "none"),          # every candidate in the last chunk
    (_clustered, 16, 131072, (2048,), "none"),         # candidates in a few runs of each row
    (_skewed, 8, 131072, (2048,), "none"),             # candidates in one bin by value: the select's levels
    (_wide, 8, 131072, (2048,), "none"),               # the same over 60 decades of magnitudes
    (_past_max, 8, 131072, (2048,), "none"),           # sample and candidates spanning more than FLT_MAX
    (_masked, 8, 131072, (1, 2048), "none"),           # -inf never kept; NaN fill past the candidates
    (_bit_patterns, 8, 131072, (2048,), "none"),       # the same specials in the sample and filter; +inf in the top k
    (_all_equal, 4, 131072, (2048,), "all"),           # every column ties with t: overflow, rescued
    (_mostly_nan, 4, 131072, (2048,), "all"),          # fewer than k candidates: rescued
]


@pytest.mark.parametrize("gen,R,N,ks,rescued", FILTER_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}x{c[2]}" for c in FILTER_CASES])
def test_topk_filtered(cuda_device, monkeypatch, launched_kernels, gen, R, N, ks, rescued):
    # long rows, k small against N (cupy_backend._topk_filter): a sampled threshold keeps about
    # 2.5k candidates per row, in column order (the chunks' offsets by look-back, several CTAs per
    # row claiming chunks), and their top k is exact; rows where it cannot be (more candidates
    # than the list holds, fewer than k kept) are marked and redone whole. Exact either way, ties
    # to the lower column, with register mode's select of the candidates (1024 threads for rows
    # that fit one wave, and 512) and with list mode's. Calls follow one another on one
    # workspace, so each relies on the last one having zeroed the chunk states and counters
    from hisa_cupy.kernels import cupy_backend

    rng = np.random.default_rng(N + R)
    scores = gen(rng, R, N)
    sms = cupy_backend._device_facts(cupy_backend._device_id())["sms"]
    for reg, wide in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(cupy_backend, "REG_SELECT", reg)
        monkeypatch.setattr(cupy_backend, "FILTER_WIDE_SELECT", wide)
        for k in ks:
            assert cupy_backend._topk_filter(R, N, k, False) is not None
            launched_kernels.clear()
            _check_topk(scores, k, None, f"{gen.__name__} {R}x{N} k={k} reg={reg} wide={wide}")
            assert launched_kernels == ["topk_filter_kernel", _filtered_select_kernel(reg, R, sms, wide),
                                        "topk_rescue_kernel"]
            failed = _failed_rows()
            assert failed.shape == (R,) and set(np.unique(failed)) <= {0, 1}
            if rescued == "none":
                assert not failed.any(), f"rows rescued: {np.flatnonzero(failed)}"
            elif rescued == "all":
                assert failed.all()


def test_topk_filtered_mixed_rows(cuda_device, launched_kernels):
    # one call whose rows take both ends: random and sorted rows through the candidates, a tied
    # row rescued, each row exact
    rng = np.random.default_rng(5)
    R, N = 12, 131072
    scores = _randn(rng, R, N)
    scores[3] = np.sort(scores[3])
    scores[7] = 0.25
    scores[10, : N // 2] = np.nan
    _check_topk(scores, 2048, None, "mixed rows")
    failed = _failed_rows()
    assert failed[7] == 1
    assert not failed[[0, 1, 2, 3, 4, 5, 6, 8, 9, 11]].any()


@pytest.mark.parametrize("order", ["position", "score"])
def test_dense_filtered(cuda_device, monkeypatch, launched_kernels, order):
    # dense_select over 131072 keys with topk = 2048 takes the filtered top-k (DENSE_FILTER):
    # exact inputs (many equal scores, so ties at the threshold are split by position) with the
    # causal default (every row long: the candidates' path) and with ragged ranges (rows shorter
    # than 65536 keys, empty ones included, go to the rescue); the same with the filter off. The
    # 16 rows are one wave: the candidates' select at 1024 threads, and at 512 (FILTER_WIDE_SELECT)
    from hisa_cupy.kernels import cupy_backend

    T, S = 16, 131072
    for ragged in (False, True):
        inp = testing.exact_inputs(T, S, 32, 64, dtype="bfloat16", seed=21, ragged=ragged)
        ref = reference.dense_select(inp["q"], inp["k"], inp["weights"], ks=inp["ks"], ke=inp["ke"], topk=2048,
                                     order=order)
        args = [testing.to_torch(inp[n]) for n in ("q", "k", "weights")]
        rng_kw = {} if inp["ks"] is None else dict(ks=testing.to_torch(inp["ks"]), ke=testing.to_torch(inp["ke"]))
        for filt, wide in ((True, True), (True, False), (False, True)):
            monkeypatch.setattr(cupy_backend, "DENSE_FILTER", filt)
            monkeypatch.setattr(cupy_backend, "FILTER_WIDE_SELECT", wide)
            launched_kernels.clear()
            got = hisa_cupy.dense_select(*args, topk=2048, order=order, backend="cupy", **rng_kw)
            testing.assert_selection_equal(got, ref, err_msg=f"ragged={ragged} filter={filt} wide={wide} order={order}")
            assert ("dense_filter_kernel" in launched_kernels) == filt
            if filt:
                assert ("dense_filtered_wide_kernel" if wide else "dense_filtered_regs_kernel") in launched_kernels
                failed = _failed_rows()
                if ragged:
                    lens = np.clip(inp["ke"], 0, S) - np.clip(inp["ks"], 0, S)
                    assert failed[lens < 65536].all()  # short rows are not filtered
                else:  # every row long: all through the candidates (H200: no row rescued)
                    assert not failed.any(), f"rows rescued: {np.flatnonzero(failed)}"


def _refine_rows(rng, R, n):
    """R rows of n candidate scores, each of its own kind, and each candidate's mask (False: not a
    candidate, HISA_KEY_NONE): distributions whose keys crowd few bins by key bits or by value."""
    f32 = np.float32
    rows, masks = [], []
    kinds = ("randn", "skewed", "cauchy", "rounded", "bf16", "few_values", "all_equal", "tiny_range",
             "inf_nan", "many_inf", "nan_most", "one_finite", "huge_range", "denormal", "zeros", "short")
    for r in range(R):
        kind = kinds[r % len(kinds)]
        s = rng.standard_normal(n).astype(f32)
        mask = rng.random(n) < (0.8 if r % 3 == 0 else 1.0)  # masked candidates in a third of the rows
        if kind == "skewed":
            s = (rng.exponential(1.0, n) ** 3).astype(f32)
        elif kind == "cauchy":
            s = rng.standard_cauchy(n).astype(f32)
        elif kind == "rounded":
            s = np.round(s * 8) / f32(8)
        elif kind == "bf16":
            s = (s.view(np.uint32) & 0xFFFF0000).view(f32)
        elif kind == "few_values":
            s = rng.choice(f32([-1.0, 0.0, 0.5, 2.0]), n)
        elif kind == "all_equal":
            s[:] = f32(0.75)
        elif kind == "tiny_range":  # a few thousand ulps: keys differ in their low bits only
            s = (f32(3.0).view(np.int32) + rng.integers(0, 3000, n)).astype(np.int32).view(f32)
        elif kind == "inf_nan":
            for v in (np.inf, -np.inf, np.nan):
                s[rng.random(n) < 0.03] = v
        elif kind == "many_inf":  # more +inf than k: ties at +inf's key
            s[rng.random(n) < 0.4] = np.inf
        elif kind == "nan_most":  # fewer numbers than k: the threshold among the NaN
            s[rng.random(n) < 0.85] = np.nan
            s[rng.random(n) < 0.05] = -np.inf
        elif kind == "one_finite":
            s[:] = np.inf
            s[rng.random(n) < 0.5] = -np.inf
            s[rng.integers(n)] = f32(1.0)
        elif kind == "huge_range":  # finite scores whose range passes FLT_MAX
            s = np.clip(s, -2, 2) * f32(1.5e38)
            s[:2] = f32([-3.0e38, 3.0e38])
        elif kind == "denormal":
            s = (s * f32(1e-39)).astype(f32)
        elif kind == "zeros":
            s = rng.choice(f32([0.0, -0.0, 1e-45, -1e-45, 1e-30]), n)
        elif kind == "short":  # fewer candidates than k
            mask[rng.integers(1, 1500):] = False
        rows.append(s)
        masks.append(mask)
    return kinds, np.stack(rows), np.stack(masks)


def _check_refine_keys(rng, kinds, scores, mask, m, B, k, order):
    """Runs the refinement's top-k on the ranking keys of ``scores`` (HISA_KEY_NONE where not
    ``mask``), written straight into the candidate buffer (rows of m blocks of B candidates at
    random block indices, random ranges' starts), with absolute and relative positions; checks it
    against the reference's ranking of the scores, row by row."""
    import cupy as cp

    from hisa_cupy.kernels import cupy_backend

    R, n = scores.shape
    nb = 2 * m
    S = nb * B
    keys = np.where(mask, testing.score_keys(scores), 0).astype(np.uint32)
    blocks = np.stack([np.sort(rng.choice(nb, m, replace=False)) for _ in range(R)]).astype(np.int32)
    ks = rng.integers(0, S // 2, R).astype(np.int32)
    ke = np.full(R, S, np.int32)
    pos = (blocks[:, :, None] * B + np.arange(B)[None, None, :]).reshape(R, n)
    for relative in (False, True):
        out = cp.full((R, k), -7, dtype=cp.int32)
        cupy_backend._launch_select("refine.cu", "refine_topk_kernel", rows=R, keys=cp.asarray(keys), ld=n,
                                    ncols=n, k=k, T=R, S=S, ks=cp.asarray(ks), ke=cp.asarray(ke),
                                    blocks=cp.asarray(blocks), m=m, B=B, relative=relative,
                                    by_score=order == "score", out_idx=out, out_ld=k)
        got = cp.asnumpy(out)
        for r in range(R):
            valid = np.flatnonzero(mask[r])
            chosen = reference._rank_take(scores[r, valid], pos[r, valid], min(k, valid.size))
            want = reference._format_row(chosen, k, offset=int(ks[r]) if relative else 0, order=order)
            np.testing.assert_array_equal(got[r], want, err_msg=f"row {r} ({kinds[r]}) relative={relative} "
                                                                f"order={order}")


@pytest.mark.parametrize("m,B,k", [(64, 128, 2048), (64, 128, 5000), (40, 128, 1), (37, 200, 3333)])
@pytest.mark.parametrize("order", ["position", "score"])
def test_refine_register_mode_keys(cuda_device, launched_kernels, m, B, k, order):
    # the refinement's top-k in register mode (refine_topk_regs_kernel) on ranking keys written
    # straight into the candidate buffer: rows whose keys crowd a few bins by key bits (randn) or
    # by value (skewed, Cauchy), ties (rounded, bf16, few values, all equal, +inf), -inf / NaN /
    # +inf keys, a finite range past FLT_MAX, denormals and signed zeros, masked candidates and
    # rows with fewer candidates than k; exact vs the reference's ranking of the scores, with
    # absolute and relative positions, by position and by score
    rng = np.random.default_rng(m * 1000 + k)
    kinds, scores, mask = _refine_rows(rng, 48, m * B)
    launched_kernels.clear()
    _check_refine_keys(rng, [kinds[r % len(kinds)] for r in range(48)], scores, mask, m, B, k, order)
    assert launched_kernels == ["refine_topk_regs_kernel"] * 2, launched_kernels  # absolute, relative


def _cluster_rows(rng, n, k):
    """Rows whose k-th largest score is the rb-th largest of a cluster of exactly `size` adjacent
    floats (1 to 300), distinct or in pairs of equal keys (ties at the threshold), in the middle of
    the finite range [-3, 3] (1.0 and the next floats up; masked candidates below) or at its bottom
    (-3.0 and the next floats, with -inf and NaN; every other item masked: HISA_KEY_NONE)."""
    f32 = np.float32
    rows, masks, kinds = [], [], []
    for size in (1, 2, 63, 64, 65, 300):
        for where in ("middle", "bottom"):
            # bottom: rb = size would select every candidate (no threshold), so size - 1
            for rb in sorted({1, (size + 1) // 2, size if where == "middle" else max(1, size - 1)}):
                for pairs in (False, True):
                    j = (np.arange(size) // (2 if pairs else 1)).astype(np.uint32)
                    if where == "middle":  # 1.0 and the next floats up
                        cluster = (np.uint32(0x3F800000) + j).view(f32)
                    else:  # -3.0 and the next floats up (their bits down), -inf and NaN
                        cluster = (np.uint32(0xC0400000) - j).view(f32)
                        if size >= 4:
                            cluster[-1], cluster[-2] = f32(-np.inf), f32(np.nan)
                    A = k - rb  # the items above the bin: in (2, 3], one at 3.0
                    above = rng.uniform(2, 3, A).astype(f32)
                    above[0] = f32(3.0)
                    rest = n - A - size
                    below = rng.uniform(-3, 0, rest).astype(f32)
                    below[0] = f32(-3.0)  # the range's bottom (bottom: masked, the bin's -3.0 is)
                    s = np.concatenate([above, cluster, below])
                    mask = np.ones(n, bool)
                    if where == "bottom":
                        mask[A + size:] = False
                    else:
                        mask[A + size + 1:] &= rng.random(rest - 1) < 0.7
                    perm = rng.permutation(n)
                    rows.append(s[perm])
                    masks.append(mask[perm])
                    kinds.append(f"{where} bin of {size}{' pairs' if pairs else ''}, rb {rb}")
    return kinds, np.stack(rows), np.stack(masks)


@pytest.mark.parametrize("order", ["position", "score"])
def test_refine_register_mode_clusters(cuda_device, launched_kernels, order):
    # refine_topk_regs_kernel where the k-th largest lies in a tight cluster of 1 to 300 adjacent
    # keys, distinct or tied, in the middle of the range or at its bottom (with -inf, NaN and the
    # masked candidates' HISA_KEY_NONE), exact vs the reference
    rng = np.random.default_rng(64)
    _check_register_mode_rows(launched_kernels, rng, *_cluster_rows(rng, 64 * 128, 2048), order)


def _check_register_mode_rows(launched_kernels, rng, kinds, scores, mask, order):
    """_check_refine_keys on rows of 64 blocks of 128 candidates, k = 2048, which must all take
    refine_topk_regs_kernel."""
    launched_kernels.clear()
    _check_refine_keys(rng, kinds, scores, mask, 64, 128, 2048, order)
    assert launched_kernels == ["refine_topk_regs_kernel"] * 2, launched_kernels  # absolute, relative


# refine_topk_regs_kernel's threshold (row_select.cuh, cut_by_window): its first level covers the
# window of 2^(11 + 14) keys below the row's largest key, in 2048 bins, and a bin of the k-th of at
# most 64 keys is ranked directly; bench/threshold_levels_sim.py's window_path replays which way it goes
WINDOW_PATHS = ("narrow", "below", "whole", "rank", "rank ties", "bin levels")


@functools.lru_cache(maxsize=None)
def _threshold_levels_sim():
    path = pathlib.Path(__file__).resolve().parents[2] / "bench" / "threshold_levels_sim.py"
    spec = importlib.util.spec_from_file_location("threshold_levels_sim", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    return sim


def _window_path(keys, k):
    return _threshold_levels_sim().window_path(keys, k)[0]


def _window_rows(rng, n, k):
    """Rows for every way of _window_path: k - rb scores in (2, 3] (one at 3.0, the largest), a
    cluster of `size` keys inside one bin of the window, the rb-th of them the k-th largest of the
    row (distinct keys, or pairs of equal keys), the rest in [-3, 0) below the window (a third of
    them masked); the cluster at 0.05, below the window ("below"); scores in [1, 1.5), a range the
    window holds whole ("narrow")."""
    f32 = np.float32
    width = (1 << 25) - 1
    wlo = int(testing.score_keys(f32(3.0))) - width
    bin_lo = wlo + (((int(testing.score_keys(f32(1.0))) - wlo) >> 14) << 14)  # a bin near 1.0
    rows, masks, kinds = [], [], []

    def row(above, cluster, what):
        rest = n - above.size - cluster.size
        s = np.concatenate([above, cluster, rng.uniform(-3, 0, rest).astype(f32)])
        mask = np.ones(n, bool)
        mask[above.size + cluster.size:] = rng.random(rest) < 0.7
        perm = rng.permutation(n)
        rows.append(s[perm])
        masks.append(mask[perm])
        kinds.append(what)

    for size in (1, 5, 20, 64, 65, 200):
        for rb in sorted({1, size // 2 + 1, size}):
            for pairs in (False, True):
                j = np.arange(size, dtype=np.int64) // (2 if pairs else 1)
                keys = (bin_lo + 100 + j).astype(np.uint32)  # positive scores: key = bits | 2^31
                cluster = (keys & np.uint32(0x7FFFFFFF)).view(f32)
                above = rng.uniform(2, 3, k - rb).astype(f32)
                above[0] = f32(3.0)
                row(above, cluster, f"window bin of {size}{' pairs' if pairs else ''}, rb {rb}")
    for rb in (1, 7):
        above = rng.uniform(2, 3, k - rb).astype(f32)
        above[0] = f32(3.0)
        row(above, np.full(40, f32(0.05)) + rng.uniform(0, 0.01, 40).astype(f32), f"below the window, rb {rb}")
    s = rng.uniform(1, 1.5, n).astype(f32)
    rows.append(s)
    masks.append(rng.random(n) < 0.8)
    kinds.append("narrow range")
    return kinds, np.stack(rows), np.stack(masks)


@pytest.mark.parametrize("order", ["position", "score"])
def test_refine_register_mode_window(cuda_device, launched_kernels, order):
    # refine_topk_regs_kernel's threshold by its first level over the window below the row's
    # largest key (cut_by_window), every way it goes (the rows cover each, by _window_path's replay
    # of its rule): ranked directly in the k-th's bin (distinct keys, tied pairs), the bin needed
    # whole, levels over a bin of more than 64 keys, over the row where the window holds fewer
    # than k keys, and over a range the window holds whole; exact vs the reference
    rng = np.random.default_rng(66)
    kinds, scores, mask = _window_rows(rng, 64 * 128, 2048)
    paths = [_window_path(np.where(mask[r], testing.score_keys(scores[r]), 0), 2048) for r in range(len(kinds))]
    assert set(paths) == set(WINDOW_PATHS), sorted(set(paths))
    _check_register_mode_rows(launched_kernels, rng, kinds, scores, mask, order)


def test_refine_register_mode_end_to_end(cuda_device, launched_kernels):
    # hisa_cupy.refine in position order over 64 blocks of 128 candidates (8192: register mode),
    # exact fp8 inputs (many equal scores: ties at the threshold) with ragged ranges (masked
    # candidates, short rows), topk 2048
    inp = testing.exact_inputs(24, 16384, 64, 128, dtype="float8_e4m3fn", seed=5, ragged=True)
    q, k, w = (testing.to_torch(inp[x]) for x in ("q", "k", "weights"))
    ks, ke = testing.to_torch(inp["ks"]), testing.to_torch(inp["ke"])
    rp, _ = reference.pool_keys(inp["k"])
    rb = reference.select_blocks(inp["q"], rp, inp["weights"], ks=inp["ks"], ke=inp["ke"], block_topk=64,
                                 seq_len=16384)
    got = hisa_cupy.refine(q, k, w, testing.to_torch(rb), ks=ks, ke=ke, topk=2048, backend="cupy")
    ref = reference.refine(inp["q"], inp["k"], inp["weights"], rb, ks=inp["ks"], ke=inp["ke"], topk=2048)
    testing.assert_selection_equal(got, ref, err_msg="refine topk=2048")
    assert "refine_topk_regs_kernel" in launched_kernels



@pytest.mark.parametrize("order", ["position", "score"])
def test_dense_threshold(cuda_device, monkeypatch, launched_kernels, order):
    # dense_select's threshold mode (DENSE_THRESHOLD; dense.cu) on fp8 inputs, with its minimum S
    # lowered to reach a small S: a sample of every 128th key gives each row a threshold (its
    # DENSE_SAMPLE_RANK-th largest sampled key), the score kernel appends the keys at or above it
    # unordered with their columns, one select ranks the lists, and the rows where that cannot be
    # exact (fewer than k kept while keys were dropped, or more than the list holds) are scored
    # again whole. SPEC §9 inputs (many equal scores: ties at the threshold split by column inside
    # the lists) against the reference bit for bit, causal and ragged, and with NaN scores (whole
    # rows, and some keys of every row: NaN ranks last, and rows whose sample has fewer candidates
    # than the rank keep every key, NaN included); sample ranks from 2 (most rows keep fewer than k:
    # rescued) to 36, and passes and rescue chunks of fewer rows than T; both the lists' path and the
    # rescue must be taken
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "DENSE_THRESHOLD_MIN_S", 4096)
    monkeypatch.setattr(cupy_backend, "DENSE_SAMPLE_STRIDE", 128)
    T, S = 40, 16384 + 77
    took = {"lists": 0, "rescue": 0}
    # the last round in passes of 16 rows (lists of 16 rows at a time) and rescue chunks of 14 rows
    for ragged, nan, chunked in ((False, False, False), (True, False, False), (True, True, False), (True, False, True)):
        if chunked:
            monkeypatch.setattr(cupy_backend, "DENSE_WORKSPACE_BYTES", 16 * cupy_backend.DENSE_APPEND_CAP * 8)
        inp = testing.exact_inputs(T, S, 64, 128, dtype="float8_e4m3fn", seed=31 + ragged + nan, ragged=ragged)
        if nan:  # NaN scores: whole rows (NaN weights), and every row at some keys
            inp["weights"][[3, 7, 20]] = np.nan
            inp["k"][np.random.default_rng(0).choice(S, S // 10, replace=False), 5] = np.nan
        args = [testing.to_torch(inp[n]) for n in ("q", "k", "weights")]
        rng_kw = {} if inp["ks"] is None else dict(ks=testing.to_torch(inp["ks"]), ke=testing.to_torch(inp["ke"]))
        for topk, rank in ((256, 8), (1000, 2), (2048, 36), (77, 36)):
            ref = reference.dense_select(inp["q"], inp["k"], inp["weights"], ks=inp["ks"], ke=inp["ke"], topk=topk,
                                         order=order)
            monkeypatch.setattr(cupy_backend, "DENSE_SAMPLE_RANK", rank)
            launched_kernels.clear()
            got = hisa_cupy.dense_select(*args, topk=topk, order=order, backend="cupy", **rng_kw)
            testing.assert_selection_equal(got, ref, err_msg=f"ragged={ragged} nan={nan} chunked={chunked} topk={topk} "
                                                             f"rank={rank}")
            assert launched_kernels.count("dense_select_unordered_kernel") == (3 if chunked else 1), launched_kernels
            assert launched_kernels.count("dense_rescue_kernel") == (3 if chunked else 1), launched_kernels
            assert "dense_filter_kernel" not in launched_kernels
            failed = _failed_rows("dense_failed_rows")[:T]
            took["rescue"] += int(failed.sum())
            took["lists"] += int((failed == 0).sum())
    assert took["lists"] > 0 and took["rescue"] > 0, took


@pytest.mark.parametrize("kind", ["segments", "random"])
def test_dense_threshold_equals_filter(cuda_device, monkeypatch, kind):
    # general fp8 inputs at a target shape (S = 131072, 64 rows): threshold mode and the filtered
    # top-k (DENSE_THRESHOLD off) rank the same ranking keys of the same score kernel, so their
    # indices are equal, by position and by score; with the default sample rank no row is rescued
    from hisa_cupy.kernels import cupy_backend
    from hisa_cupy.workloads import make_workload

    wl = make_workload(kind, seq_len=131072, num_queries=64, seed=5)
    args = [testing.to_torch(x) for x in (wl.q, wl.k, wl.weights)]
    for order in ("position", "score"):
        outs = []
        for thr in (True, False):
            monkeypatch.setattr(cupy_backend, "DENSE_THRESHOLD", thr)
            outs.append(testing.to_numpy(hisa_cupy.dense_select(*args, k_scale=testing.to_torch(wl.k_scale),
                                                                topk=2048, order=order, backend="cupy")))
            if thr:
                assert not _failed_rows("dense_failed_rows")[:64].any()
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"{kind} {order}")
