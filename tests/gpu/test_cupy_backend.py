"""CuPy backend on a real GPU: bit-exact vs the NumPy reference on SPEC §9 inputs, tolerance-aware
on the synthetic workloads, framework round trips, NaN rows, ragged/packed ranges, the workspace
bound and CUDA-graph capture. Run with ``pytest -m gpu`` on an H100 / H200.
"""
import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import reference, testing, workloads
from hisa_cupy.testing import to_torch

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

DTYPES = ["float8_e4m3fn", "bfloat16", "float16", "float32"]


def to_np(x):
    return testing.to_numpy(x)


def run_both(fn_name, inp, **kw):
    """(cupy backend output via torch CUDA tensors, reference output)."""
    ref_fn = getattr(reference, fn_name)
    api_fn = getattr(hisa_cupy, fn_name)
    ref = ref_fn(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"], ke=inp["ke"], **kw)
    got = api_fn(to_torch(inp["q"]), to_torch(inp["k"]), to_torch(inp["weights"]),
                 k_scale=to_torch(inp["k_scale"]), ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"]),
                 backend="cupy", **kw)
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.dtype == torch.int32
    return to_np(got), ref


LAYOUTS = [dict(), dict(ragged=True), dict(packed=True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", range(3))
def test_hisa_exact_every_dtype(cuda_device, dtype, layout):
    inp = testing.exact_inputs(48, 2048, 64, 128, dtype=dtype, seed=layout + 10, block_size=64, **LAYOUTS[layout])
    for index_base in ("relative", "absolute"):
        for order in ("position", "score"):
            for pool in ("bfloat16", "float32"):
                got, ref = run_both("hisa_select", inp, block_size=64, block_topk=8, topk=200, pool_dtype=pool,
                                    index_base=index_base, order=order)
                testing.assert_selection_equal(got, ref, err_msg=f"{dtype} {LAYOUTS[layout]} {index_base} {order} {pool}")


@pytest.mark.parametrize("H,D,B", [(32, 64, 32), (64, 128, 128), (128, 128, 64), (16, 64, 256), (64, 64, 128)])
def test_hisa_exact_shapes(cuda_device, H, D, B):
    inp = testing.exact_inputs(40, 16 * B, H, D, dtype="float8_e4m3fn", seed=H + D + B, block_size=B, ragged=True)
    got, ref = run_both("hisa_select", inp, block_size=B, block_topk=4, topk=3 * B)
    testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("tile_map", [False, True])
@pytest.mark.parametrize("ready", [True, False])
@pytest.mark.parametrize("ragged", [False, True])
def test_hisa_exact_target_shape(cuda_device, launched_kernels, monkeypatch, ragged, ready, tile_map):
    # SPEC §9 inputs at target 1's m = 64, B = 128, through the union path and the refinement's
    # register-mode top-k (8192 candidates per row; many equal scores: ties at the threshold, split
    # by position; ragged: masked candidates, empty rows, rows with fewer candidates than topk),
    # bit-exact vs the reference by position and by score; the top-k after each pair's ready flags
    # (UNION_READY: a launch of few waves) or after the whole union launch; the union kernel with
    # its per-tile map or its per-item one (UNION_TILE_MAP)
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "UNION_READY", ready)
    monkeypatch.setattr(cupy_backend, "UNION_TILE_MAP", tile_map)
    union_kernel = f"refine_union_wgmma_kernel<2, 0, 0, 64, 128{', true' if tile_map else ''}>"
    topk_kernel = "refine_topk_ready_regs_kernel" if ready else "refine_topk_regs_kernel"
    inp = testing.exact_inputs(34, 16384, 64, 128, dtype="float8_e4m3fn", seed=7 + ragged, ragged=ragged)
    for topk in (2048, 1111):
        for order in ("position", "score"):
            launched_kernels.clear()
            got, ref = run_both("hisa_select", inp, block_size=128, block_topk=64, topk=topk, order=order)
            assert union_kernel in launched_kernels, launched_kernels
            assert topk_kernel in launched_kernels, launched_kernels
            testing.assert_selection_equal(got, ref, err_msg=f"topk={topk} order={order} ragged={ragged}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_exact(cuda_device, dtype):
    inp = testing.exact_inputs(64, 3000, 64, 128, dtype=dtype, seed=3, ragged=True)
    for order in ("position", "score"):
        got, ref = run_both("dense_select", inp, topk=256, order=order)
        testing.assert_selection_equal(got, ref)
    got, ref = run_both("dense_select", inp, topk=4096, index_base="absolute")  # topk > candidates
    testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16"])
def test_block_sparse_exact(cuda_device, dtype):
    inp = testing.exact_inputs(32, 4096, 64, 128, dtype=dtype, seed=5, packed=True)
    for order in ("position", "score"):
        got, ref = run_both("block_sparse_select", inp, block_size=64, topk=512, order=order)
        testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_batches_exact(cuda_device, monkeypatch, launched_kernels, dtype):
    # both pooling kernels give the reference's pooled keys bit for bit on exact inputs (any
    # summation order does): pool_vec_kernel (POOL_VEC, partial sums per token group) and
    # pool_kernel with every POOL_BATCH (tokens loaded per batch before they are summed in token
    # order), for blocks shorter than, equal to and not a multiple of the batch or the token
    # groups, and a partial last block
    from hisa_cupy.kernels import cupy_backend

    inp = testing.exact_inputs(8, 1000, 32, 64, dtype=dtype, seed=3, ragged=True)
    kt, ksc = to_torch(inp["k"]), to_torch(inp["k_scale"])
    for vec, batch in [(True, 16)] + [(False, b) for b in cupy_backend.POOL_BATCHES]:
        monkeypatch.setattr(cupy_backend, "POOL_VEC", vec)
        monkeypatch.setattr(cupy_backend, "POOL_BATCH", batch)
        for block_size in (40, 64, 100, 128):
            for pool in ("bfloat16", "float32", "float8_e4m3fn"):
                launched_kernels.clear()
                pooled, pscale = hisa_cupy.pool_keys(kt, k_scale=ksc, block_size=block_size, pool_dtype=pool,
                                                     backend="cupy")
                rp, rs = reference.pool_keys(inp["k"], inp["k_scale"], block_size=block_size, pool_dtype=pool)
                msg = f"vec={vec} batch={batch} B={block_size} {pool}"
                np.testing.assert_array_equal(to_np(pooled).view(np.uint8), rp.view(np.uint8), err_msg=msg)
                if pool == "float8_e4m3fn":
                    np.testing.assert_array_equal(to_np(pscale), rs, err_msg=msg)
                assert len(launched_kernels) == 1
                assert launched_kernels[0].startswith("pool_vec_kernel<") if vec else \
                    launched_kernels[0].endswith(f", {batch}>")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_vec_general_inputs(cuda_device, monkeypatch, launched_kernels, dtype):
    # random keys and scales (sums not exact): pool_vec_kernel's fp32 pooled keys are the
    # reference's up to the rounding of a sum taken in another order (1e-5 of the block's mean
    # magnitude), at D = 32, 96 and 128 (token groups that do and do not fill the CTA)
    import ml_dtypes

    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "POOL_VEC", True)
    rng = np.random.default_rng(4)
    np_dtype = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "bfloat16": ml_dtypes.bfloat16}.get(dtype, dtype)
    for D in (32, 96, 128):
        keys = (4 * rng.standard_normal((1000, D))).astype(np.float32).astype(np_dtype)
        ksc = (rng.random(1000) + 0.5).astype(np.float32)
        launched_kernels.clear()
        pooled, _ = hisa_cupy.pool_keys(to_torch(keys), k_scale=to_torch(ksc), block_size=100,
                                        pool_dtype="float32", backend="cupy")
        assert len(launched_kernels) == 1 and launched_kernels[0].startswith("pool_vec_kernel<"), launched_kernels
        ref, _ = reference.pool_keys(keys, ksc, block_size=100, pool_dtype="float32")
        mag = np.abs(keys.astype(np.float32) * ksc[:, None]).reshape(10, 100, D).mean(axis=1)
        got = to_np(pooled)
        assert np.abs(got - ref).max() <= 1e-5 * mag.max(), f"D={D}"  # a sum's rounding, in another order


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_fixed_shape_same_bits(cuda_device, monkeypatch, launched_kernels, dtype):
    # pool_vec_kernel with D fixed at compile time (POOL_FIXED, D = 128) takes the same sums in the
    # same order as the generic instance: the same bits on random keys and scales (sums not exact),
    # with a partial last block (1000 = 7 * 128 + 104); and the reference's bits on exact inputs
    import ml_dtypes

    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "POOL_VEC", True)
    rng = np.random.default_rng(6)
    np_dtype = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "bfloat16": ml_dtypes.bfloat16}.get(dtype, dtype)
    keys = (4 * rng.standard_normal((1000, 128))).astype(np.float32).astype(np_dtype)
    ksc = (rng.random(1000) + 0.5).astype(np.float32)
    exact = testing.exact_inputs(8, 1000, 32, 128, dtype=dtype, seed=3, ragged=True)
    for pool in ("bfloat16", "float32", "float8_e4m3fn"):
        for block_size in (128, 64):
            got = {}
            for fixed in (False, True):
                monkeypatch.setattr(cupy_backend, "POOL_FIXED", fixed)
                launched_kernels.clear()
                pooled, pscale = hisa_cupy.pool_keys(to_torch(keys), k_scale=to_torch(ksc), block_size=block_size,
                                                     pool_dtype=pool, backend="cupy")
                (name,) = launched_kernels
                code = cupy_backend.POOL_CODES[pool]
                want = f", {code}, 128>" if fixed else f", {code}>"
                assert name.startswith("pool_vec_kernel<") and name.endswith(want), (fixed, name)
                got[fixed] = (to_np(pooled).view(np.uint8), None if pscale is None else to_np(pscale))
                if fixed:
                    ep, es = hisa_cupy.pool_keys(to_torch(exact["k"]), k_scale=to_torch(exact["k_scale"]),
                                                 block_size=block_size, pool_dtype=pool, backend="cupy")
                    rp, rs = reference.pool_keys(exact["k"], exact["k_scale"], block_size=block_size, pool_dtype=pool)
                    np.testing.assert_array_equal(to_np(ep).view(np.uint8), rp.view(np.uint8))
                    if pool == "float8_e4m3fn":
                        np.testing.assert_array_equal(to_np(es), rs)
            msg = f"B={block_size} {pool}"
            np.testing.assert_array_equal(got[True][0], got[False][0], err_msg=msg)
            if pool == "float8_e4m3fn":
                np.testing.assert_array_equal(got[True][1], got[False][1], err_msg=msg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", ["bfloat16", "float32", "float8_e4m3fn"])
def test_stages_exact(cuda_device, dtype, pool):
    inp = testing.exact_inputs(32, 1000, 32, 64, dtype=dtype, seed=7, ragged=True)  # partial last block
    kt = to_torch(inp["k"])
    pooled, pscale = hisa_cupy.pool_keys(kt, k_scale=to_torch(inp["k_scale"]), block_size=64, pool_dtype=pool,
                                         backend="cupy")
    rp, rs = reference.pool_keys(inp["k"], inp["k_scale"], block_size=64, pool_dtype=pool)
    np.testing.assert_array_equal(to_np(pooled).view(np.uint8), rp.view(np.uint8))
    if pool == "float8_e4m3fn":
        np.testing.assert_array_equal(to_np(pscale), rs)
    else:
        assert pscale is None
    if pool == "float8_e4m3fn":
        return  # block scores of an fp8 pool are not exact-arithmetic (SPEC §9)
    S = inp["k"].shape[0]
    blocks = hisa_cupy.select_blocks(to_torch(inp["q"]), pooled, to_torch(inp["weights"]), pooled_scale=pscale,
                                     ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"]), block_size=64, block_topk=5,
                                     seq_len=S, backend="cupy")
    rb = reference.select_blocks(inp["q"], rp, inp["weights"], pooled_scale=rs, ks=inp["ks"], ke=inp["ke"],
                                 block_size=64, block_topk=5, seq_len=S)
    testing.assert_selection_equal(blocks, rb)
    for order in ("position", "score"):
        got = hisa_cupy.refine(to_torch(inp["q"]), kt, to_torch(inp["weights"]), blocks, ks=to_torch(inp["ks"]),
                               ke=to_torch(inp["ke"]), block_size=64, topk=100, order=order, backend="cupy")
        ref = reference.refine(inp["q"], inp["k"], inp["weights"], rb, ks=inp["ks"], ke=inp["ke"], block_size=64,
                               topk=100, order=order)
        testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float16"])
def test_fp8_pool_block_scores_tolerance(cuda_device, launched_kernels, dtype):
    # q against an fp8 pool: on Hopper the f16 engine reads the e4m3 pooled keys as they are
    # (register-A path; fp8 q converted while staged, f16 q as it is). The per-block scale makes
    # the scores inexact, so the check is SPEC §9's tolerance-aware one on the reference's scores.
    S = 8192
    inp = testing.exact_inputs(40, S, 64, 128, dtype=dtype, seed=77, ragged=True)
    pooled, pscale = hisa_cupy.pool_keys(to_torch(inp["k"]), block_size=128, pool_dtype="float8_e4m3fn",
                                         backend="cupy")
    rp, rs = reference.pool_keys(inp["k"], block_size=128, pool_dtype="float8_e4m3fn")
    got = hisa_cupy.select_blocks(to_torch(inp["q"]), pooled, to_torch(inp["weights"]), pooled_scale=pscale,
                                  ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"]), block_size=128, block_topk=8,
                                  seq_len=S, backend="cupy")
    ref = reference.select_blocks(inp["q"], rp, inp["weights"], pooled_scale=rs, ks=inp["ks"], ke=inp["ke"],
                                  block_size=128, block_topk=8, seq_len=S)
    scores = reference.block_scores(inp["q"], rp, inp["weights"], rs)
    testing.assert_selection_equivalent(got, ref, scores, err_msg=f"{dtype} q, fp8 pool")
    if cuda_device.compute_capability == "90":
        qdt = 0 if dtype == "float8_e4m3fn" else 2
        assert f"block_score_wgmma_kernel<2, {qdt}, 0, 64, 128, 2>" in launched_kernels


def test_topk_exact_ties_nan_lengths(cuda_device):
    rng = np.random.default_rng(0)
    for R, N, k in [(64, 5000, 300), (16, 40000, 2048), (200, 700, 1000)]:
        scores = rng.integers(-8, 8, size=(R, N)).astype(np.float32) * 0.5  # heavy ties
        scores[rng.random((R, N)) < 0.05] = np.nan
        scores[rng.random((R, N)) < 0.05] = -0.0
        scores[0, :] = np.inf
        lengths = rng.integers(0, N + 1, size=R).astype(np.int32)
        for lens in (None, lengths):
            vals, idx = hisa_cupy.topk(torch.from_numpy(scores).cuda(), k,
                                       lengths=None if lens is None else torch.from_numpy(lens).cuda(),
                                       backend="cupy")
            rv, ri = reference.topk(scores, k, lengths=lens)
            testing.assert_selection_equal(idx, ri)
            testing.assert_values_identical(vals, rv)


def test_nan_rows(cuda_device):
    inp = testing.exact_inputs(32, 1024, 64, 128, dtype="float32", seed=11)
    inp["q"][3, 5, 7] = np.nan
    inp["weights"][9, :] = np.nan
    inp["k"][100, 0] = np.nan
    for fn in ("hisa_select", "dense_select"):
        kw = dict(block_size=64, block_topk=4, topk=128) if fn == "hisa_select" else dict(topk=128)
        got, ref = run_both(fn, inp, **kw)
        testing.assert_selection_equal(got, ref)


def test_short_and_empty_rows(cuda_device):
    # T > S: the first rows of the causal default see nothing; explicit ke <= ks rows too
    inp = testing.exact_inputs(300, 256, 32, 64, dtype="bfloat16", seed=12)
    got, ref = run_both("hisa_select", inp, block_size=32, block_topk=2, topk=64)
    testing.assert_selection_equal(got, ref)
    inp = testing.exact_inputs(1, 4096, 64, 128, dtype="float8_e4m3fn", seed=13)  # T = 1
    got, ref = run_both("hisa_select", inp, block_size=128, block_topk=4, topk=512)
    testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("kind", ["random", "segments", "needles"])
@pytest.mark.parametrize("S", [8192, 65536])
def test_workloads_tolerance(cuda_device, kind, S):
    T = 64 if S > 8192 else 128
    w = workloads.make_workload(kind, seq_len=S, num_queries=T, seed=1)
    args = [to_torch(w.q), to_torch(w.k), to_torch(w.weights)]
    kw = dict(k_scale=to_torch(w.k_scale), ks=to_torch(w.ks), ke=to_torch(w.ke), backend="cupy")
    scores = reference.token_scores(w.q, w.k, w.weights, w.k_scale)
    # dense: equivalent to the reference up to score ties within tolerance
    dense = hisa_cupy.dense_select(*args, topk=2048, **kw)
    testing.assert_selection_equivalent(dense, reference.dense_select(w.q, w.k, w.weights, k_scale=w.k_scale,
                                                                        ks=w.ks, ke=w.ke, topk=2048),
                                        scores, ks=w.ks)
    # stage 1: block selection equivalent under block scores
    pooled, _ = hisa_cupy.pool_keys(args[1], k_scale=kw["k_scale"], backend="cupy")
    blocks = hisa_cupy.select_blocks(args[0], pooled, args[2], ks=kw["ks"], ke=kw["ke"], block_topk=16,
                                     seq_len=S, backend="cupy")
    rp, _ = reference.pool_keys(w.k, w.k_scale)
    rblocks = reference.select_blocks(w.q, rp, w.weights, ks=w.ks, ke=w.ke, block_topk=16, seq_len=S)
    bscores = reference.block_scores(w.q, rp, w.weights)
    testing.assert_selection_equivalent(blocks, rblocks, bscores, index_base="absolute")
    # stage 2 on the GPU's blocks: equivalent to the reference refinement of the same blocks
    got = hisa_cupy.refine(*args, blocks, topk=1024, **kw)
    ref = reference.refine(w.q, w.k, w.weights, to_np(blocks), k_scale=w.k_scale, ks=w.ks, ke=w.ke, topk=1024)
    testing.assert_selection_equivalent(got, ref, scores, ks=w.ks)
    # end to end == the stages composed on the GPU (hisa_select scores pairs of rows over the
    # union of their blocks, refine one row at a time); in score order too, which any difference
    # in a candidate's key bits can reorder
    full = hisa_cupy.hisa_select(*args, block_topk=16, topk=1024, **kw)
    testing.assert_selection_equal(full, got)
    full = hisa_cupy.hisa_select(*args, block_topk=16, topk=1024, order="score", **kw)
    testing.assert_selection_equal(full, hisa_cupy.refine(*args, blocks, topk=1024, order="score", **kw))


def test_frameworks_round_trip(cuda_device):
    import cupy

    inp = testing.exact_inputs(16, 1024, 32, 64, dtype="float8_e4m3fn", seed=21)
    ref = reference.hisa_select(inp["q"], inp["k"], inp["weights"], block_size=64, block_topk=4, topk=128)
    # CuPy in (uint8 + dtype=) -> CuPy out
    cq, ck, cw = (cupy.asarray(x.view(np.uint8) if x.dtype.itemsize == 1 else x) for x in
                  (inp["q"], inp["k"], inp["weights"]))
    got = hisa_cupy.hisa_select(cq, ck, cw, block_size=64, block_topk=4, topk=128, dtype="float8_e4m3fn")
    assert isinstance(got, cupy.ndarray)
    testing.assert_selection_equal(got, ref)
    # JAX in -> JAX out
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    gpu = [d for d in jax.devices() if d.platform == "gpu"]
    if gpu:
        jq, jk, jw = (jax.device_put(jnp.asarray(x), gpu[0]) for x in (inp["q"], inp["k"], inp["weights"]))
        got = hisa_cupy.hisa_select(jq, jk, jw, block_size=64, block_topk=4, topk=128)
        assert isinstance(got, jax.Array) and got.devices() == {gpu[0]}
        testing.assert_selection_equal(np.asarray(got), ref)
    # torch on a side stream -> torch out, correct after that stream's work
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tq, tk, tw = (to_torch(x) for x in (inp["q"], inp["k"], inp["weights"]))
        got = hisa_cupy.hisa_select(tq, tk, tw, block_size=64, block_topk=4, topk=128)
    s.synchronize()
    testing.assert_selection_equal(got, ref)


def test_workspace_bound(cuda_device):
    import cupy

    from hisa_cupy.kernels import cupy_backend

    T, S, B, m = 1024, 32768, 128, 64
    w = workloads.make_workload("random", seq_len=S, num_queries=T, seed=2)
    args = [to_torch(x) for x in (w.q, w.k, w.weights)]
    torch.cuda.synchronize()
    cupy_backend.release_workspace()
    pool = cupy.cuda.MemoryPool()
    old = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(pool.malloc)
    try:
        out = torch.empty((T, 2048), dtype=torch.int32, device="cuda")
        hisa_cupy.hisa_select(*args, k_scale=to_torch(w.k_scale), block_topk=m, out=out)
        torch.cuda.synchronize()
        peak = pool.total_bytes()
    finally:
        cupy.cuda.set_allocator(old)
        cupy_backend.release_workspace()
    bound = T * (S // B + m * B) * 4 + (64 << 20)
    assert 0 < peak <= bound, (peak, bound)


def test_cuda_graph_capture(graph_case):
    c = graph_case
    with torch.cuda.stream(c.stream):
        hisa_cupy.hisa_select(*c.static, **c.kw)  # warm-up: compiles, sizes the workspace
    torch.cuda.current_stream().wait_stream(c.stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=c.stream):
        hisa_cupy.hisa_select(*c.static, **c.kw)
    c.replay_matches_reference(g)


def test_validate_false_clamps(cuda_device):
    inp = testing.exact_inputs(16, 512, 32, 64, dtype="bfloat16", seed=41)
    ks = np.full(16, -100, np.int32)
    ke = np.full(16, 10_000, np.int32)
    got = hisa_cupy.hisa_select(to_torch(inp["q"]), to_torch(inp["k"]), to_torch(inp["weights"]), ks=to_torch(ks),
                                ke=to_torch(ke), block_size=64, block_topk=2, topk=64, validate=False,
                                index_base="absolute")
    ref = reference.hisa_select(inp["q"], inp["k"], inp["weights"], ks=ks, ke=ke, block_size=64, block_topk=2,
                                topk=64, index_base="absolute")
    testing.assert_selection_equal(got, ref)
    with pytest.raises(ValueError, match="ks"):
        hisa_cupy.hisa_select(to_torch(inp["q"]), to_torch(inp["k"]), to_torch(inp["weights"]), ks=to_torch(ks),
                              ke=to_torch(ke), block_size=64, block_topk=2, topk=64)


def test_large_block_topk_and_topk(cuda_device):
    # the upper end of the supported range: m = 512 blocks, topk = 4096, both orders; the
    # candidate keys of a row (65536) no longer fit the top-k kernel's shared-memory cache
    inp = testing.exact_inputs(6, 65536, 64, 128, dtype="float8_e4m3fn", seed=51, ragged=True)
    for order in ("position", "score"):
        got, ref = run_both("hisa_select", inp, block_size=128, block_topk=512, topk=4096, order=order)
        testing.assert_selection_equal(got, ref)
    got, ref = run_both("dense_select", inp, topk=4096, order="score")
    testing.assert_selection_equal(got, ref)


@pytest.mark.parametrize("engine", ["wgmma+union", "wgmma", "wgmma-fp8acc", "mma.sync"])
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float16"])
@pytest.mark.parametrize("H", [64, 128])
def test_scoring_engines_exact(cuda_device, monkeypatch, launched_kernels, engine, dtype, H):
    # Every scoring path on the same GPU: the wgmma engine (score_wgmma.cuh, sm_90a) with and
    # without the paired-row union refinement (fp8 keys converted to f16 in registers), with fp8
    # operands on the fp8 tensor cores (FP8_TENSOR_ACCUMULATE: exact here, the products and sums
    # need few bits), and the mma.sync
    # engine it replaces on Hopper. An odd T leaves the second row of a 2-row CTA empty; ragged
    # rows give pairs with different block counts. The kernels this test launches are recorded,
    # so each parameter is checked to take its own path.
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "USE_WGMMA", engine != "mma.sync")
    monkeypatch.setattr(cupy_backend, "USE_UNION_PAIRS", engine == "wgmma+union")
    monkeypatch.setattr(cupy_backend, "FP8_TENSOR_ACCUMULATE", engine == "wgmma-fp8acc")
    launched = launched_kernels
    inp = testing.exact_inputs(37, 4096, H, 128, dtype=dtype, seed=H + 61, ragged=True)
    for pool in ("bfloat16", "float32"):
        for order in ("position", "score"):
            got, ref = run_both("hisa_select", inp, block_size=128, block_topk=6, topk=300, pool_dtype=pool,
                                order=order)
            testing.assert_selection_equal(got, ref, err_msg=f"hisa {pool} {order}")
    got, ref = run_both("dense_select", inp, topk=700)
    testing.assert_selection_equal(got, ref, err_msg="dense")
    # Hopper (cc 9.0) takes the wgmma path unless it is switched off; other GPUs never do
    hopper = cuda_device.compute_capability == "90"
    wgmma = hopper and engine != "mma.sync"
    assert any("wgmma" in name for name in launched) == wgmma
    assert any("refine_union" in name for name in launched) == (wgmma and engine == "wgmma+union" and H == 64)
    fp8 = dtype == "float8_e4m3fn"
    # the register-A path: f16 engine (2) on e4m3 q and keys (0, 0), in refinement and dense
    in_registers = [n for n in launched if "wgmma_kernel<2, 0, 0," in n]
    assert bool(in_registers) == (wgmma and fp8 and engine in ("wgmma+union", "wgmma"))
    if in_registers:
        assert any(n.startswith("dense_score_wgmma") for n in in_registers)
    assert any(name.startswith("refine_score_wgmma_kernel<3, 0, 0,") for name in launched) == (
        wgmma and fp8 and engine == "wgmma-fp8acc")


@pytest.mark.parametrize("S,T,m,B,splits,chunk_rows", [
    (8192, 37, 6, 128, 0, 0),       # odd T: the last pair has one row
    (16384, 1024, 16, 128, 0, 0),   # many pairs
    (8192, 300, 12, 64, 3, 0),      # B < 128: tiles span blocks
    (8192, 512, 8, 256, 1, 0),      # one CTA per pair; two tiles per block
    (8192, 258, 16, 128, 5, 80),    # row chunks: several launches, the last one short
    (8269, 64, 8, 128, 0, 0),       # S % B != 0: the last block is partial (no key read past S)
    (65536, 64, 16, 128, 0, 0),     # rows of 512 blocks: the block top-m at 16 keys per lane
])
@pytest.mark.parametrize("mode", ["merge", "records", "tail", "tail-empty", "records-unready", "item-map"])
def test_union_kernel_same_keys_as_per_row_refine(cuda_device, launched_kernels, monkeypatch, S, T, m, B, splits,
                                                  chunk_rows, mode):
    # general fp8 inputs: the union kernel (refine_union_wgmma_kernel: pairs of rows over the
    # union of their blocks) gives every candidate the same ranking key as refine() on the same
    # blocks, which scores one row per CTA without a union (an independent code path), so
    # hisa_select returns refine's indices, in score order too. topk = m * B returns every
    # candidate: a key that differs in any bit that moves it past another changes the output.
    # mode: records, the pairs' unions come from the block top-m (PAIR_RECORDS), else (merge) each
    # union CTA merges its pair's lists; tail, records and the last pairs of each launch in 7 shares
    # (UNION_TAIL_SPLITS; the others in `splits`); tail-empty, the same with a run of rows that see
    # no keys (pairs without blocks: only their padding is written) and an empty last row;
    # records-unready, records with the refine top-k waiting for the whole union launch (UNION_READY
    # off; every other mode selects after each pair's ready flags where the top-k is in register
    # mode, i.e. order="score" here, and rows longer than warp mode's in position order). Where B is
    # the score tile the union kernel maps its tiles by block (UNION_TILE_MAP); item-map, records
    # with its per-item map instead (the only one at other B)
    from hisa_cupy.kernels import cupy_backend

    w = workloads.make_workload("segments", seq_len=S, num_queries=T, seed=T + m)
    if mode == "tail-empty":
        w.ks[6:20] = w.ke[6:20]
        w.ks[-1] = w.ke[-1]
    args = [to_torch(w.q), to_torch(w.k), to_torch(w.weights)]
    kw = dict(k_scale=to_torch(w.k_scale), ks=to_torch(w.ks), ke=to_torch(w.ke), backend="cupy")
    monkeypatch.setattr(cupy_backend, "UNION_SPLITS", splits)
    monkeypatch.setattr(cupy_backend, "PAIR_RECORDS", mode != "merge")
    monkeypatch.setattr(cupy_backend, "UNION_READY", mode != "records-unready")
    monkeypatch.setattr(cupy_backend, "UNION_TILE_MAP", mode != "item-map")
    if mode.startswith("tail"):  # a tenth of a wave of tail pairs: head and tail in every launch but the shortest
        monkeypatch.setattr(cupy_backend, "UNION_TAIL_SPLITS", 7)
        monkeypatch.setattr(cupy_backend, "UNION_TAIL_WAVES", 0.1)
    if chunk_rows:
        monkeypatch.setattr(cupy_backend, "REFINE_WORKSPACE_BYTES", chunk_rows * m * B * 4)
    pooled, _ = hisa_cupy.pool_keys(args[1], k_scale=kw["k_scale"], block_size=B, backend="cupy")
    blocks = hisa_cupy.select_blocks(args[0], pooled, args[2], ks=kw["ks"], ke=kw["ke"], block_size=B,
                                     block_topk=m, seq_len=S, backend="cupy")
    from hisa_cupy import select

    monkeypatch.setattr(select, "_calls", {})  # every call below plans (none bound from an earlier test)
    flags = []  # whether each call took the ready flags (_union_ready's answer: mode, waves, top-k mode)
    real_ready = cupy_backend._union_ready
    monkeypatch.setattr(cupy_backend, "_union_ready", lambda *a: flags.append(real_ready(*a)) or flags[-1])
    for order in ("score", "position"):
        want = to_np(hisa_cupy.refine(*args, blocks, block_size=B, topk=m * B, order=order, **kw))
        launched_kernels.clear()
        got = to_np(hisa_cupy.hisa_select(*args, block_size=B, block_topk=m, topk=m * B, order=order, **kw))
        np.testing.assert_array_equal(got, want, err_msg=order)
        assert any(n.startswith("refine_union_wgmma_kernel") for n in launched_kernels), launched_kernels
        tile_map = any(n.startswith("refine_union_wgmma_kernel") and n.endswith(", true>") for n in launched_kernels)
        assert tile_map == (mode != "item-map" and B == cupy_backend.SCORE_TILE), launched_kernels
        ready = flags[-1] is not None
        assert ("refine_topk_ready_regs_kernel" in launched_kernels) == ready, (order, launched_kernels)
        if mode == "records" and order == "score":  # the default layout at these T: few waves, register mode
            assert ready == cupy_backend._block_topm_warp(-(-S // B)), launched_kernels
        assert (want >= 0).sum() > T * B  # candidates were selected
        if mode == "tail-empty":
            assert (want[6:20] == -1).all() and (want[-1] == -1).all() and (want[20] >= 0).any()


def test_wgmma_engine_general_inputs(cuda_device, monkeypatch):
    # general fp8 inputs: both engines' dense and refine (on the reference's blocks) pass the
    # tolerance-aware check against the reference scores
    from hisa_cupy.kernels import cupy_backend

    w = workloads.make_workload("segments", seq_len=16384, num_queries=96, seed=3)
    args = [to_torch(w.q), to_torch(w.k), to_torch(w.weights)]
    kw = dict(k_scale=to_torch(w.k_scale), ks=to_torch(w.ks), ke=to_torch(w.ke), backend="cupy")
    scores = reference.token_scores(w.q, w.k, w.weights, w.k_scale)
    rp, _ = reference.pool_keys(w.k, w.k_scale)
    rblocks = reference.select_blocks(w.q, rp, w.weights, ks=w.ks, ke=w.ke, block_topk=16, seq_len=16384)
    ref_refine = reference.refine(w.q, w.k, w.weights, rblocks, k_scale=w.k_scale, ks=w.ks, ke=w.ke, topk=1024)
    ref_dense = reference.dense_select(w.q, w.k, w.weights, k_scale=w.k_scale, ks=w.ks, ke=w.ke, topk=2048)
    for use in (True, False):
        monkeypatch.setattr(cupy_backend, "USE_WGMMA", use)
        got = hisa_cupy.refine(*args, torch.from_numpy(rblocks).cuda(), topk=1024, **kw)
        testing.assert_selection_equivalent(got, ref_refine, scores, ks=w.ks, err_msg=f"refine use_wgmma={use}")
        got = hisa_cupy.dense_select(*args, topk=2048, **kw)
        testing.assert_selection_equivalent(got, ref_dense, scores, ks=w.ks, err_msg=f"dense use_wgmma={use}")


@pytest.mark.parametrize("order", ["position", "score"])
def test_dense_equals_hisa_over_every_block(cuda_device, monkeypatch, launched_kernels, order):
    # General fp8 inputs (per-token key scales), ragged key ranges and a partial last tile: dense_select
    # on its bulk-copy wgmma path (dense_score_wgmma_kernel: flags from the rows' key ranges, each
    # lane's key scale loaded before the tile's MMAs, unswizzled tiles read in plain order, the first
    # MMA half's relus against -0) equals hisa_select with every block selected bit for bit: both score
    # a (row, key) with the same products, FMA chains and scale (score_wgmma.cuh), and rank the keys
    # the same way. One score CTA per SM in the split gives each CTA 13 tiles (132 SMs), so every key buffer is
    # reused several times and its barriers' phases wrap.
    from hisa_cupy.kernels import cupy_backend

    monkeypatch.setattr(cupy_backend, "SCORE_CTAS_PER_SM", 1)
    S, T = 8000, 64
    # 13 tiles per score CTA on 132 SMs (7 with the default split): each buffer's barriers wrap
    assert cupy_backend._tiles_per_cta(-(-S // cupy_backend.SCORE_TILE), T // 2) >= 8
    w = workloads.make_workload("random", seq_len=S, num_queries=T, seed=11)
    ks = ((np.arange(T) * 37) % 500).astype(np.int32)
    args = [to_torch(w.q), to_torch(w.k), to_torch(w.weights)]
    kw = dict(k_scale=to_torch(w.k_scale), ks=to_torch(ks), ke=to_torch(w.ke), order=order, backend="cupy")
    launched_kernels.clear()
    dense = hisa_cupy.dense_select(*args, topk=512, **kw)
    assert "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>" in launched_kernels, launched_kernels
    hisa = hisa_cupy.hisa_select(*args, block_size=128, block_topk=-(-S // 128), topk=512, **kw)
    testing.assert_selection_equal(to_np(dense), to_np(hisa), err_msg=f"order={order}")
    assert (to_np(dense) >= 0).sum() > T * 400  # rows hold real selections


def test_programmatic_dependent_launch(cuda_device, monkeypatch):
    # With USE_PDL each kernel's launch is taken in while the one before it runs, and the kernel
    # waits for it before it reads its output (common.cuh, grid_dependency_sync; the block scores
    # after their q loads, launched as the pool starts). Calls queued back to back without a
    # sync (each call's first kernels overwrite the workspace the previous call's last kernels
    # read, so a kernel that did not wait could race) give exactly the reference, through the ordinary path
    # and through bound plans (the call cache), for hisa_select, dense_select and topk; on sm_90
    # the launches take the PDL path, and without the knob none does.
    from hisa_cupy import select
    from hisa_cupy.kernels import cupy_backend

    pdl = [0]
    real = cupy_backend._launch_pdl

    def counting(*a):
        pdl[0] += 1
        return real(*a)

    monkeypatch.setattr(cupy_backend, "_launch_pdl", counting)
    inps = [testing.exact_inputs(96, 8192, 64, 128, dtype="float8_e4m3fn", seed=60 + i, ragged=i == 1)
            for i in range(4)]
    args = [([to_torch(inp[n]) for n in ("q", "k", "weights")],
             dict(k_scale=to_torch(inp["k_scale"]), ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"])))
            for inp in inps]
    kw = dict(block_size=128, block_topk=8, topk=512, validate=False)
    refs = [reference.hisa_select(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"],
                                  ke=inp["ke"], block_size=128, block_topk=8, topk=512) for inp in inps]
    dense_refs = [reference.dense_select(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"],
                                         ke=inp["ke"], topk=512) for inp in inps]
    rng = np.random.default_rng(3)
    scores = [rng.standard_normal((64, 131072)).astype(np.float32) for _ in range(2)]  # the filtered top-k
    scores[1][5] = np.float32(0.5)  # a tied row: the filtered top-k's rescue launch does the work
    top_refs = [reference.topk(s, 2048) for s in scores]
    # the third pass: the block top-m also triggers the union launch at its start (its 48 pairs
    # take a fraction of a wave: TOPM_TRIGGER_WAVES 0.01 asks for the trigger)
    for use, trigger in ((False, 0.0), (True, 0.0), (True, 0.01)):
        monkeypatch.setattr(cupy_backend, "USE_PDL", use)
        monkeypatch.setattr(cupy_backend, "TOPM_TRIGGER_WAVES", trigger)
        monkeypatch.setattr(select, "_calls", {})
        pdl[0] = 0
        for rnd in range(3):  # the first round records the call signatures, later ones are bound
            outs = [hisa_cupy.hisa_select(*a, **k, **kw) for a, k in args]
            dense = [hisa_cupy.dense_select(*a, **k, topk=512, validate=False) for a, k in args]
            tops = [hisa_cupy.topk(to_torch(s), 2048) for s in scores]
            torch.cuda.synchronize()
            for got, ref in zip(outs, refs):
                testing.assert_selection_equal(got, ref, err_msg=f"hisa pdl={use} round {rnd}")
            for got, ref in zip(dense, dense_refs):
                testing.assert_selection_equal(got, ref, err_msg=f"dense pdl={use} round {rnd}")
            for (vals, idx), (ref_v, ref_i) in zip(tops, top_refs):
                np.testing.assert_array_equal(to_np(idx), ref_i, err_msg=f"topk pdl={use} round {rnd}")
                np.testing.assert_array_equal(to_np(vals), ref_v)
        expect_pdl = use and cupy_backend._device_facts(cupy_backend._device_id())["cc"] >= 90
        assert (pdl[0] > 0) == expect_pdl, (use, pdl[0])


def test_union_ready_flags_queued_calls(cuda_device, monkeypatch, launched_kernels):
    # UNION_READY: the refine top-k (refine_topk_ready_regs_kernel) starts beside the union kernel
    # and selects each row once its pair's CTAs have stored the call's epoch, which the block top-m
    # advances. Calls queued back to back without a sync, on inputs of different row counts (odd T:
    # a last pair of one row), in one launch or in row chunks (several union launches, each with its
    # own flags), with the block top-m's early trigger and without, through the ordinary path and
    # bound plans (the call cache), with and without PDL: every output equals the reference
    # (SPEC §9 exact inputs), so a row selected before its keys were all written would show. The
    # epoch in the workspace advances once per call.
    from hisa_cupy import select
    from hisa_cupy.kernels import cupy_backend

    S, m, B, topk = 16384, 16, 128, 1024
    inps = [testing.exact_inputs(T, S, 64, 128, dtype="float8_e4m3fn", seed=90 + T, ragged=T % 2 == 1)
            for T in (96, 97, 64)]
    args = [([to_torch(inp[n]) for n in ("q", "k", "weights")],
             dict(k_scale=to_torch(inp["k_scale"]), ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"])))
            for inp in inps]
    for order in ("score", "position"):
        kw = dict(block_size=B, block_topk=m, topk=topk, order=order, validate=False)
        refs = [reference.hisa_select(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"],
                                      ke=inp["ke"], block_size=B, block_topk=m, topk=topk, order=order)
                for inp in inps]
        for use_pdl, trigger, chunk_rows in ((True, 0.0, 0), (True, 0.01, 0), (True, 0.01, 24), (False, 0.0, 24)):
            monkeypatch.setattr(cupy_backend, "USE_PDL", use_pdl)
            monkeypatch.setattr(cupy_backend, "TOPM_TRIGGER_WAVES", trigger)
            monkeypatch.setattr(cupy_backend, "REFINE_WORKSPACE_BYTES",
                                chunk_rows * m * B * 4 if chunk_rows else 128 << 20)
            monkeypatch.setattr(select, "_calls", {})
            for rnd in range(3):  # the first round records the call signatures, later ones are bound
                launched_kernels.clear()
                outs = [hisa_cupy.hisa_select(*a, **k, **kw) for a, k in args]
                torch.cuda.synchronize()
                where = f"order={order} pdl={use_pdl} trigger={trigger} chunk_rows={chunk_rows} round {rnd}"
                if rnd == 0:
                    assert launched_kernels.count("refine_topk_ready_regs_kernel") >= 3, (where, launched_kernels)
                    assert "refine_topk_regs_kernel" not in launched_kernels, where
                for got, ref in zip(outs, refs):
                    testing.assert_selection_equal(got, ref, err_msg=where)
    # the epoch (the workspace's first word; a buffer that grows starts again at zero) advances by
    # one per call, and every flag of the call's union launch holds it
    seen = {}
    real = cupy_backend._union_ready

    def spy(plan, *a):
        out = real(plan, *a)
        seen["ctas"] = sum(grid[0] for _, _, grid, *_ in plan[4])
        return out

    monkeypatch.setattr(cupy_backend, "_union_ready", spy)
    monkeypatch.setattr(select, "_calls", {})  # the ordinary path (it plans, and asks _union_ready)
    ws = cupy_backend.workspace(torch.cuda.current_stream().cuda_stream)
    hisa_cupy.hisa_select(*args[0][0], **args[0][1], **kw)
    torch.cuda.synchronize()
    before = int(ws.get("union_ready", (1,), np.uint32, zeroed=True)[0])
    assert before >= 1 and seen["ctas"] > 0
    hisa_cupy.hisa_select(*args[0][0], **args[0][1], **kw)  # bound now (the call cache)
    torch.cuda.synchronize()
    ready = to_np(ws.get("union_ready", (1 + seen["ctas"],), np.uint32, zeroed=True))
    assert ready[0] == before + 1 and (ready[1:] == before + 1).all(), (before, ready[:8])


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "bfloat16", "float16"])
@pytest.mark.parametrize("H", [64, 128])
def test_block_score_half_buffers(cuda_device, monkeypatch, launched_kernels, dtype, H):
    # BLOCK_SCORE_HALF: the block scores of 16-bit pooled keys (ROWS * H = 128) stream their key
    # tiles through two half-tile buffers with one accumulator set (three CTAs per SM). Each half's
    # MMA is the same instruction on the same operands as in the two-set loop, so the ranking keys
    # are the same bits on any input: exact inputs (ragged rows, an odd T: a CTA's second row
    # empty, rows of 512 blocks: four tiles, several per CTA, causal tiles skipped) against the
    # reference, and the workspace's keys of both forms compared word for word, also on general
    # fp8 inputs. The launched kernels show which form ran.
    from hisa_cupy.kernels import cupy_backend

    hopper = cuda_device.compute_capability == "90"
    S = 65536
    inp = testing.exact_inputs(37, S, H, 128, dtype=dtype, seed=H + 5, ragged=True)
    w = workloads.make_workload("segments", seq_len=32768, num_queries=64, seed=4)
    ref = reference.select_blocks(inp["q"], reference.pool_keys(inp["k"], inp["k_scale"])[0], inp["weights"],
                                  ks=inp["ks"], ke=inp["ke"], block_topk=16, seq_len=S)
    keys = {}
    for half in (0, 1):  # never, wherever the form applies (the default's shape rule aside)
        monkeypatch.setattr(cupy_backend, "BLOCK_SCORE_HALF", half)
        launched_kernels.clear()
        for name, data, seq in (("exact", inp, S), ("general", w, 32768)):
            d = data if isinstance(data, dict) else dict(q=data.q, k=data.k, weights=data.weights,
                                                           k_scale=data.k_scale, ks=data.ks, ke=data.ke)
            pooled, _ = hisa_cupy.pool_keys(to_torch(d["k"]), k_scale=to_torch(d["k_scale"]), backend="cupy")
            got = hisa_cupy.select_blocks(to_torch(d["q"]), pooled, to_torch(d["weights"]), ks=to_torch(d["ks"]),
                                          ke=to_torch(d["ke"]), block_topk=16, seq_len=seq, backend="cupy")
            torch.cuda.synchronize()
            ws = cupy_backend.workspace(torch.cuda.current_stream().cuda_stream)
            keys[half, name] = to_np(ws.get("block_keys", (d["q"].shape[0], -(-seq // 128)), np.uint32)).copy()
            if name == "exact":
                testing.assert_selection_equal(got, ref, err_msg=f"half {half}")
        halves = [n for n in launched_kernels if n.startswith("block_score_wgmma_kernel") and n.count(",") == 6]
        assert bool(halves) == bool(half and hopper), launched_kernels
    for name in ("exact", "general"):
        np.testing.assert_array_equal(keys[1, name], keys[0, name], err_msg=name)


def test_launch_argument_count_checked(cuda_device):
    # _check_arity with the real driver (cuFuncGetParamInfo, CUDA 12.4+): a kernel's parameter
    # count as declared, and a launch with arguments missing raises ValueError before the driver
    # reads past them (bench/host_profile.py's block top-m launch without the warp kernel's four
    # last arguments had crashed the process)
    import cupy

    from hisa_cupy.kernels import cupy_backend as cb

    fn = cb._kernel("pool.cu", f"pool_kernel<0, 1, {cb.POOL_BATCH}>", 0)
    assert cb._param_count(fn) == 7  # k, kscale, S, D, B, pooled, pscale
    T, nb, M = 8, 1024, 64
    keys = cupy.random.randint(1 << 20, 1 << 31, size=(T, nb), dtype=cupy.int64).astype(cupy.uint32)
    blocks = cupy.full((T, M), -7, cupy.int32)
    kw = dict(rows=T, keys=keys, ld=nb, ncols=nb, k=M, T=T, S=nb * 128, out_idx=blocks, out_ld=M)
    assert cb._block_topm_warp(nb)
    with pytest.raises(ValueError, match=r"block_topm_warp_kernel<32>: expected \d+ arguments"):
        cb._launch_select("block_select.cu", "block_topm_kernel", **kw)
    cupy.cuda.get_current_stream().synchronize()
    assert (blocks == -7).all()  # nothing launched
    cb._launch_select("block_select.cu", "block_topm_kernel", **kw, extra=(None, 0, 0, None))
    got = cupy.asnumpy(blocks)
    assert (got >= 0).all() and (np.diff(got, axis=1) > 0).all()  # M blocks of each row, ascending


def test_driver_check_raises_the_drivers_error(cuda_device):
    # _driver_check: the one place the ctypes driver calls (cuLaunchKernelEx, the graph API) turn
    # an error code into CuPy's CUDADriverError with the driver's name for it (needs the driver)
    from cupy_backends.cuda.api import driver

    from hisa_cupy.kernels import cupy_backend as cb

    cb._driver_check(0)
    with pytest.raises(driver.CUDADriverError, match="CUDA_ERROR_INVALID_VALUE"):
        cb._driver_check(1)

