"""The row top-k kernel (row_select.cuh) on a real GPU, path by path, bit-exact vs the NumPy
reference: list mode with the candidate list, with the candidate list overflowing (radix levels
over the whole row), ties split at the threshold, the bitonic fallback of the bucket sort, rows
cached in shared memory and rows read from global memory (through the ring of asynchronous
copies, or with plain loads where a row is not 16-byte aligned), the in-order mode for
large k, warp mode (one warp per short row in position order: the block top-m), register
mode (one CTA per row of at most 8192 items, the keys in registers), and few long rows
split into chunks whose top k are merged.
Run with ``pytest -m gpu``.
"""
import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import reference, testing

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
                    expected = ["topk_filter_kernel", "topk_filtered_regs_kernel" if reg else "topk_filtered_kernel",
                                "topk_rescue_kernel"]
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


@pytest.mark.parametrize("N", [1025, 2047, 4097, 8191, 8192])
@pytest.mark.parametrize("gen", [_randn, _one_bin, _rounded, _skewed, _all_equal, _specials, _masked, _wide,
                                 _past_max])
def test_register_mode_topk(cuda_device, launched_kernels, gen, N):
    # register mode alone, by score: rows not a multiple of the 512 x 16 register layout, k from 1
    # to more than the row, NaN / inf / signed zeros, ragged lengths (empty rows included); the
    # threshold on wide (randn) and narrow (one_bin) key ranges, ties split at the threshold
    # (rounded, all_equal: in position order across warps), the sort's bitonic fallback (skewed),
    # masked rows (masked) and scores too spread for bins by value (wide)
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


@pytest.mark.parametrize("S", [128, 3968, 4096, 4224, 128000, 131072, 131200])
def test_warp_mode_block_topm_and_short_rows(cuda_device, monkeypatch, launched_kernels, S):
    # rows of 1, 31, 32, 33, 1000, 1024 blocks (warp mode) and 1025 (the CTA kernel); exact inputs
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
        assert ("block_topm_warp_kernel" in launched) == short
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


def _failed_rows():
    # the filtered path's per-row marks of its last call (cupy_backend._filtered_top_k's workspace)
    from hisa_cupy.kernels import cupy_backend

    torch.cuda.synchronize()
    views = [ws._views["filter_failed_rows"][2] for ws in cupy_backend._workspaces.values()
             if "filter_failed_rows" in ws._views]
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
    # to the lower column, with register mode's select of the candidates and with list mode's.
    # Calls follow one another on one workspace, so each relies on the last one having zeroed
    # the chunk states and counters
    from hisa_cupy.kernels import cupy_backend

    rng = np.random.default_rng(N + R)
    scores = gen(rng, R, N)
    for reg in (True, False):
        monkeypatch.setattr(cupy_backend, "REG_SELECT", reg)
        for k in ks:
            assert cupy_backend._topk_filter(R, N, k, False) is not None
            launched_kernels.clear()
            _check_topk(scores, k, None, f"{gen.__name__} {R}x{N} k={k} reg={reg}")
            assert launched_kernels == ["topk_filter_kernel", "topk_filtered_regs_kernel" if reg else
                                        "topk_filtered_kernel", "topk_rescue_kernel"]
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
    # than 65536 keys, empty ones included, go to the rescue); the same with the filter off
    from hisa_cupy.kernels import cupy_backend

    T, S = 16, 131072
    for ragged in (False, True):
        inp = testing.exact_inputs(T, S, 32, 64, dtype="bfloat16", seed=21, ragged=ragged)
        ref = reference.dense_select(inp["q"], inp["k"], inp["weights"], ks=inp["ks"], ke=inp["ke"], topk=2048,
                                     order=order)
        args = [testing.to_torch(inp[n]) for n in ("q", "k", "weights")]
        rng_kw = {} if inp["ks"] is None else dict(ks=testing.to_torch(inp["ks"]), ke=testing.to_torch(inp["ke"]))
        for filt in (True, False):
            monkeypatch.setattr(cupy_backend, "DENSE_FILTER", filt)
            launched_kernels.clear()
            got = hisa_cupy.dense_select(*args, topk=2048, order=order, backend="cupy", **rng_kw)
            testing.assert_selection_equal(got, ref, err_msg=f"ragged={ragged} filter={filt} order={order}")
            assert ("dense_filter_kernel" in launched_kernels) == filt
            if filt:
                failed = _failed_rows()
                if ragged:
                    lens = np.clip(inp["ke"], 0, S) - np.clip(inp["ks"], 0, S)
                    assert failed[lens < 65536].all()  # short rows are not filtered
                else:  # every row long: all through the candidates (H200: no row rescued)
                    assert not failed.any(), f"rows rescued: {np.flatnonzero(failed)}"
