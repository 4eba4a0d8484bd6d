"""Numba backend (kernels/numba_backend.py) under Numba's CUDA simulator, bit-exact vs the reference.

How the simulator is set up, and why in a subprocess
----------------------------------------------------
Numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba.cuda`` is first imported, and cannot switch
afterwards. In a normal pytest session other test modules (or plugins) may import ``numba.cuda``
before this file, and setting the variable in this process would also leak into every later test
(``tests/conftest.py`` reads it to decide whether a GPU is usable). So this module plays two roles:

* **parent** (any ordinary pytest run, variable unset): ``test_simulator_shard[i]`` runs this same
  file in fresh child processes (``python -m pytest tests/test_numba_sim.py``) whose environment
  has ``NUMBA_ENABLE_CUDASIM=1`` set before Python starts, so the child imports Numba in simulator
  mode whatever the parent imported. The children start together (one shard per CPU core, at most
  ``HISA_NUMBA_SIM_SHARDS``, default 2) and each parent test waits for its shard and reports the
  child's failures in its assertion message.
* **child** (``NUMBA_ENABLE_CUDASIM=1`` in the environment at start-up): the checks below run
  in-process. ``HISA_NUMBA_SIM_SHARD=i/n`` keeps every n-th test starting at i. Running
  ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_numba_sim.py`` by hand runs them all here.

The simulator of numba-cuda 0.30.4 allocates static shared arrays without a lock, which made
results flaky here; ``kernels/_numba_compat.py`` installs a thread-safe allocation under the
simulator (checked by ``test_simulator_shared_arrays_are_thread_safe``).

The simulator runs each CUDA thread as a Python thread, so sizes are tiny (T <= 10, S <= 256,
H <= 4, D <= 16). The backend uses 32 threads per block under the simulator and these tests set a
48-float shared query buffer (HISA_NUMBA_Q_SHARED=48), so that tiles, scans, radix passes and
head chunks all take several iterations.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

CHILD = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))

# =============================================================================================
# parent: run the simulator checks in child processes
# =============================================================================================
if not CHILD:
    N_SHARDS = max(1, int(os.environ.get("HISA_NUMBA_SIM_SHARDS", min(2, os.cpu_count() or 1))))
    _children = {}

    def _start_children():
        if _children:
            return
        for i in range(N_SHARDS):
            env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", HISA_NUMBA_SIM_SHARD=f"{i}/{N_SHARDS}",
                       HISA_NUMBA_Q_SHARED="48", PYTHONUNBUFFERED="1")
            cmd = [sys.executable, "-m", "pytest", HERE, "-q", "-rfE", "-p", "no:cacheprovider",
                   "-W", "ignore::pytest.PytestUnraisableExceptionWarning"]
            _children[i] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True), time.time())

    @pytest.mark.parametrize("shard", range(N_SHARDS))
    def test_simulator_shard(shard):
        _start_children()  # the first parent test starts every shard, so they run concurrently
        proc, t0 = _children[shard]
        try:
            output, _ = proc.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"simulator shard {shard} timed out after 1200 s:\n{output[-6000:]}")
        tail = output[-8000:]
        print(f"simulator shard {shard}/{N_SHARDS}: {time.time() - t0:.1f} s\n{tail[-600:]}")
        assert proc.returncode == 0, f"simulator shard {shard} failed (rc={proc.returncode}):\n{tail}"


# =============================================================================================
# child: the actual checks, in-process under the simulator
# =============================================================================================
else:
    import ml_dtypes

    # A 48-float shared query buffer makes H * D > 48 queries go through the head-chunk loop
    # (read when numba_backend is imported; the parent sets it in the child's environment too).
    os.environ.setdefault("HISA_NUMBA_Q_SHARED", "48")

    from hisa_cupy import reference as ref
    from hisa_cupy.kernels import numba_backend as nb
    from hisa_cupy.testing import exact_inputs

    # The simulator's barrier is a polling loop across Python threads; a short GIL switch
    # interval makes each __syncthreads() several times cheaper (test speed only).
    sys.setswitchinterval(1e-4)

    if not nb.SIMULATOR:  # numba.cuda was imported for real before this module set up
        raise RuntimeError("tests/test_numba_sim.py child: numba.cuda is not in simulator mode")

    _SHARD = os.environ.get("HISA_NUMBA_SIM_SHARD")

    @pytest.fixture(autouse=True)
    def _shard_filter(request):
        if _SHARD:
            i, n = (int(x) for x in _SHARD.split("/"))
            if request.session.items.index(request.node) % n != i:
                pytest.skip("other shard")

    DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn"]
    POOLS = ["bfloat16", "float32", "float8_e4m3fn"]
    PHYS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
            "float8_e4m3fn": np.uint8}
    RANGES = {"causal": {}, "ragged": {"ragged": True}, "packed": {"packed": True}}

    def phys(x):
        """Logical (ml_dtypes) array -> the physical array the device backends take."""
        if x.dtype == np.dtype(ml_dtypes.bfloat16):
            return x.view(np.uint16)
        if x.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            return x.view(np.uint8)
        return x

    def same_bits(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize
        u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
        return np.array_equal(a.view(u), b.view(u))

    def inputs(T, S, H, D, dtype, B, ranges="causal", seed=0):
        d = exact_inputs(T, S, H, D, dtype=dtype, seed=seed, block_size=B, **RANGES[ranges])
        return d

    def test_simulator_shared_arrays_are_thread_safe():
        import inspect

        from numba.cuda.simulator import kernelapi

        array = kernelapi.FakeCUDAShared.array
        if not getattr(array, "_hisa_thread_safe", False):
            # not patched: only acceptable when the simulator no longer has the racy lookup
            assert "self._allocations.get(caller)" not in inspect.getsource(array)

    # -----------------------------------------------------------------------------------------
    # bit-level codecs against ml_dtypes
    # -----------------------------------------------------------------------------------------
    def test_fp8_decode_all_codes():
        codes = np.arange(256, dtype=np.uint8)
        got = np.array([nb.decode_fp8(c) for c in codes], dtype=np.float32)
        want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert nan.sum() == 2  # 0x7F and 0xFF
        assert same_bits(got[~nan], want[~nan])  # including -0.0 and the subnormals

    def test_fp8_encode_matches_ml_dtypes():
        rng = np.random.default_rng(0)
        grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        grid = np.unique(grid[np.isfinite(grid)])
        mids = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)  # ties
        vals = np.concatenate([
            grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
            rng.uniform(-448, 448, 3000), rng.uniform(-0.03, 0.03, 3000), rng.uniform(-2e-3, 2e-3, 1000),
            [0.0, -0.0, np.nan, -np.nan, 448.0, -448.0, 2.0 ** -10, -(2.0 ** -10), 1e-30, -1e-45],
        ]).astype(np.float32)
        got = np.array([nb.encode_fp8(v) for v in vals], dtype=np.uint8)
        want = vals.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, [(float(vals[i]), hex(got[i]), hex(want[i])) for i in bad[:8]]

    def test_bf16_encode_decode_match_ml_dtypes():
        rng = np.random.default_rng(1)
        bits = np.concatenate([
            rng.integers(0, 2 ** 32, 6000, dtype=np.uint64).astype(np.uint32),
            (rng.integers(0, 2 ** 16, 2000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000,  # ties
            np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                      0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x807FFFFF, 0x3F808000, 0x3F818000],
                     dtype=np.uint32),
        ])
        f = bits.view(np.float32)
        got = np.array([nb.encode_bf16(x) for x in f], dtype=np.uint16)
        with np.errstate(invalid="ignore"):
            want = f.astype(ml_dtypes.bfloat16).view(np.uint16)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:8]]
        dec = np.array([nb.decode_bf16(x) for x in want], dtype=np.float32)
        assert np.array_equal(dec.view(np.uint32), want.astype(np.uint32) << 16)

    def test_score_key_orders_like_spec():
        rng = np.random.default_rng(2)
        s = np.concatenate([rng.integers(-4, 5, 60).astype(np.float32) / 2,
                            rng.standard_normal(40).astype(np.float32) * 1e30,
                            [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45]]).astype(np.float32)
        rng.shuffle(s)
        keys = np.array([nb.score_key(x) for x in s], dtype=np.int64)
        assert keys.min() >= 1 and keys.max() < 0xFFFFFFFF
        assert (keys[np.isnan(s)] == 1).all()
        order = np.lexsort((np.arange(s.size), -keys))  # key desc, index asc
        assert np.array_equal(order, ref.rank_order(s))

    # -----------------------------------------------------------------------------------------
    # stages
    # -----------------------------------------------------------------------------------------
    @pytest.mark.parametrize("pool", POOLS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_pool_keys_exact(dtype, pool):
        d = inputs(1, 96, 1, 16, dtype, 32, seed=3)
        got, gscale = nb.pool_keys(phys(d["k"]), d["k_scale"], block_size=32, pool_dtype=pool)
        want, wscale = ref.pool_keys(d["k"], d["k_scale"], block_size=32, pool_dtype=pool)
        assert got.dtype == np.dtype(PHYS[pool]) and same_bits(got, want)
        if pool == "float8_e4m3fn":
            assert gscale.dtype == np.float32 and same_bits(gscale, wscale)
        else:
            assert gscale is None

    @pytest.mark.parametrize("pool", POOLS)
    def test_pool_keys_general_partial_block(pool):
        """Random fp8 keys with a per-token scale, S not a multiple of B, a NaN key element."""
        rng = np.random.default_rng(4)
        S, D, B = 75, 12, 16
        k = rng.integers(0, 256, (S, D), dtype=np.uint8)
        k[k & 0x7F == 0x7F] = 0x10  # no NaN codes here ...
        k[70, 3] = 0x7F  # ... except one, in the partial last block
        k_scale = (rng.random(S) + 0.25).astype(np.float32)
        got, gscale = nb.pool_keys(k, k_scale, block_size=B, pool_dtype=pool)
        want, wscale = ref.pool_keys(k.view(ml_dtypes.float8_e4m3fn), k_scale, block_size=B,
                                     pool_dtype=pool)
        assert got.shape == (5, D) and same_bits(got, want)
        if wscale is not None:
            assert same_bits(gscale, wscale)
        got, _ = nb.pool_keys(k, None, block_size=B, pool_dtype=pool)  # k_scale None = ones
        want, _ = ref.pool_keys(k.view(ml_dtypes.float8_e4m3fn), None, block_size=B, pool_dtype=pool)
        assert same_bits(got, want)

    @pytest.mark.parametrize("ranges", list(RANGES))
    @pytest.mark.parametrize("pool", POOLS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_select_blocks_exact(dtype, pool, ranges):
        T, S, H, D, B, m = 7, 256, 2, 16, 16, 5
        d = inputs(T, S, H, D, dtype, B, ranges, seed=5)
        pooled, pscale = ref.pool_keys(d["k"], d["k_scale"], block_size=B, pool_dtype=pool)
        out = np.full((T, m), 99, np.int32)
        res = nb.select_blocks(phys(d["q"]), phys(pooled), d["weights"], pscale, d["ks"], d["ke"],
                               seq_len=S, block_size=B, block_topk=m, out=out)
        want = ref.select_blocks(d["q"], pooled, d["weights"], pooled_scale=pscale, ks=d["ks"],
                                 ke=d["ke"], block_size=B, block_topk=m, seq_len=S)
        assert res is out
        np.testing.assert_array_equal(out, want)

    def test_select_blocks_all_eligible_and_m_edge_cases():
        T, S, H, D, B = 6, 128, 2, 8, 16  # nb = 8 blocks
        d = inputs(T, S, H, D, "float32", B, "ragged", seed=6)
        pooled, _ = ref.pool_keys(d["k"], None, block_size=B, pool_dtype="float32")
        for m in (1, 2, 3, 8, 11):
            got = nb.select_blocks(d["q"], pooled, d["weights"], None, d["ks"], d["ke"], seq_len=S,
                                   block_size=B, block_topk=m, out=np.empty((T, m), np.int32))
            want = ref.select_blocks(d["q"], pooled, d["weights"], ks=d["ks"], ke=d["ke"],
                                     block_size=B, block_topk=m, seq_len=S)
            np.testing.assert_array_equal(got, want, err_msg=f"m={m}")

    @pytest.mark.parametrize("order", ["position", "score"])
    @pytest.mark.parametrize("index_base", ["relative", "absolute"])
    @pytest.mark.parametrize("ranges", list(RANGES))
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_refine_exact(dtype, ranges, index_base, order):
        T, S, H, D, B, m, k = 6, 128, 3, 16, 16, 4, 24
        d = inputs(T, S, H, D, dtype, B, ranges, seed=7)
        pooled, _ = ref.pool_keys(d["k"], None, block_size=B, pool_dtype="bfloat16")
        blocks = ref.select_blocks(d["q"], pooled, d["weights"], ks=d["ks"], ke=d["ke"],
                                   block_size=B, block_topk=m, seq_len=S)
        out = np.full((T, k), 99, np.int32)
        nb.refine(phys(d["q"]), phys(d["k"]), d["weights"], d["k_scale"], blocks, d["ks"], d["ke"],
                  block_size=B, topk=k, index_base=index_base, order=order, out=out)
        want = ref.refine(d["q"], d["k"], d["weights"], blocks, k_scale=d["k_scale"], ks=d["ks"],
                          ke=d["ke"], block_size=B, topk=k, index_base=index_base, order=order)
        np.testing.assert_array_equal(out, want)

    def test_refine_messy_block_lists():
        """Unsorted ids, duplicates, -1, out-of-range ids and blocks outside [ks, ke)."""
        T, S, H, D, B, k = 5, 100, 2, 8, 16, 40  # nb = 7, last block partial
        d = inputs(T, S, H, D, "bfloat16", B, "ragged", seed=8)
        blocks = np.array([[3, 1, 3, -1, 6, 0],
                           [6, 6, 6, 6, 6, 6],
                           [-5, 7, 100, -1, 2, 2],
                           [5, 4, 3, 2, 1, 0],
                           [-1, -1, -1, -1, -1, -1]], dtype=np.int32)
        for order in ("position", "score"):
            got = nb.refine(phys(d["q"]), phys(d["k"]), d["weights"], None, blocks, d["ks"], d["ke"],
                            block_size=B, topk=k, index_base="relative", order=order,
                            out=np.empty((T, k), np.int32))
            want = ref.refine(d["q"], d["k"], d["weights"], blocks, ks=d["ks"], ke=d["ke"],
                              block_size=B, topk=k, order=order)
            np.testing.assert_array_equal(got, want)

    @pytest.mark.parametrize("order", ["position", "score"])
    @pytest.mark.parametrize("ranges", list(RANGES))
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_dense_exact(dtype, ranges, order):
        T, S, H, D, k = 6, 96, 4, 16, 20  # H * D = 64 > Q_SHARED = 48: two head chunks
        assert nb.Q_SHARED < H * D
        d = inputs(T, S, H, D, dtype, 16, ranges, seed=9)
        index_base = "absolute" if ranges == "packed" else "relative"
        got = nb.dense_select(phys(d["q"]), phys(d["k"]), d["weights"], d["k_scale"], d["ks"],
                              d["ke"], topk=k, index_base=index_base, order=order,
                              out=np.empty((T, k), np.int32))
        want = ref.dense_select(d["q"], d["k"], d["weights"], k_scale=d["k_scale"], ks=d["ks"],
                                ke=d["ke"], topk=k, index_base=index_base, order=order)
        np.testing.assert_array_equal(got, want)

    @pytest.mark.parametrize("pool", POOLS)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_hisa_select_exact(dtype, pool):
        T, S, H, D, B, m, k = 5, 128, 2, 16, 16, 3, 32
        d = inputs(T, S, H, D, dtype, B, "packed" if dtype == "float16" else "causal", seed=10)
        got = nb.hisa_select(phys(d["q"]), phys(d["k"]), d["weights"], None, d["ks"], d["ke"],
                             block_size=B, block_topk=m, topk=k, pool_dtype=pool,
                             index_base="relative", order="position", out=np.empty((T, k), np.int32))
        want = ref.hisa_select(d["q"], d["k"], d["weights"], ks=d["ks"], ke=d["ke"], block_size=B,
                               block_topk=m, topk=k, pool_dtype=pool)
        np.testing.assert_array_equal(got, want)

    def test_hisa_equals_dense_when_all_blocks_fit():
        T, S, H, D, B, k = 4, 64, 2, 8, 16, 64
        d = inputs(T, S, H, D, "float8_e4m3fn", B, "ragged", seed=11)
        args = (phys(d["q"]), phys(d["k"]), d["weights"], None, d["ks"], d["ke"])
        h = nb.hisa_select(*args, block_size=B, block_topk=4, topk=k, pool_dtype="bfloat16",
                           index_base="relative", order="score", out=np.empty((T, k), np.int32))
        dn = nb.dense_select(*args, topk=k, index_base="relative", order="score",
                             out=np.empty((T, k), np.int32))
        np.testing.assert_array_equal(h, dn)

    def test_partial_last_block_float32_pool():
        T, S, H, D, B, m, k = 5, 90, 2, 8, 16, 3, 20  # nb = 6, last block has 10 keys
        d = inputs(T, S, H, D, "float32", B, "ragged", seed=12)
        d["ke"][0], d["ks"][0] = S, 0
        got = nb.hisa_select(d["q"], d["k"], d["weights"], d["k_scale"], d["ks"], d["ke"],
                             block_size=B, block_topk=m, topk=k, pool_dtype="float32",
                             index_base="absolute", order="score", out=np.empty((T, k), np.int32))
        want = ref.hisa_select(d["q"], d["k"], d["weights"], k_scale=d["k_scale"], ks=d["ks"],
                               ke=d["ke"], block_size=B, block_topk=m, topk=k, pool_dtype="float32",
                               index_base="absolute", order="score")
        np.testing.assert_array_equal(got, want)

    def test_short_and_out_of_range_rows():
        """ke <= ks, empty rows at S, negative / too large ks/ke (clamped), T > S causal."""
        T, S, H, D, B, k = 6, 48, 2, 8, 16, 8
        d = inputs(T, S, H, D, "float32", B, seed=13)
        ks = np.array([5, 48, -7, 30, 0, 47], np.int32)
        ke = np.array([5, 48, 3, 20, 1000, 60], np.int32)
        q, kk, w = d["q"], d["k"], d["weights"]
        for name in ("dense", "hisa"):
            for order in ("position", "score"):
                kw = dict(topk=k, index_base="relative", order=order, out=np.empty((T, k), np.int32))
                if name == "dense":
                    got = nb.dense_select(q, kk, w, None, ks, ke, **kw)
                    want = ref.dense_select(q, kk, w, ks=ks, ke=ke, topk=k, order=order)
                else:
                    got = nb.hisa_select(q, kk, w, None, ks, ke, block_size=B, block_topk=2,
                                         pool_dtype="bfloat16", **kw)
                    want = ref.hisa_select(q, kk, w, ks=ks, ke=ke, block_size=B, block_topk=2,
                                           topk=k, order=order)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {order}")
        # more query rows than keys: the early rows of the causal default are empty
        big = inputs(10, 6, 2, 8, "float32", 16, seed=14)
        got = nb.dense_select(big["q"], big["k"], big["weights"], None, None, None, topk=4,
                              index_base="relative", order="position", out=np.empty((10, 4), np.int32))
        want = ref.dense_select(big["q"], big["k"], big["weights"], topk=4)
        np.testing.assert_array_equal(got, want)
        assert (got[:4] == -1).all()

    @pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
    def test_nan_and_inf_scores():
        """NaN / inf inputs: NaN scores rank below everything but stay candidates."""
        T, S, H, D, B, k = 4, 64, 2, 8, 16, 40
        d = inputs(T, S, H, D, "float8_e4m3fn", B, seed=15)
        q8, k8 = phys(d["q"]).copy(), phys(d["k"]).copy()
        k8[[3, 17, 40], 2] = 0x7F  # NaN keys
        k8[50, 0] = 0xFF
        q8[1, 0, 5] = 0x7F  # a NaN query: every score of row 1 with that head is NaN
        ql, kl = q8.view(ml_dtypes.float8_e4m3fn), k8.view(ml_dtypes.float8_e4m3fn)
        for order in ("position", "score"):
            got = nb.dense_select(q8, k8, d["weights"], None, None, None, topk=k,
                                  index_base="relative", order=order, out=np.empty((T, k), np.int32))
            want = ref.dense_select(ql, kl, d["weights"], topk=k, order=order)
            np.testing.assert_array_equal(got, want)
            got = nb.hisa_select(q8, k8, d["weights"], None, None, None, block_size=B, block_topk=3,
                                 topk=k, pool_dtype="float32", index_base="absolute", order=order,
                                 out=np.empty((T, k), np.int32))
            want = ref.hisa_select(ql, kl, d["weights"], block_size=B, block_topk=3, topk=k,
                                   pool_dtype="float32", index_base="absolute", order=order)
            np.testing.assert_array_equal(got, want)
        # float16 with infinities: inf * 0 and inf - inf give NaN, like the reference
        h = inputs(3, 32, 2, 8, "float16", 16, seed=16)
        kh = h["k"].copy()
        kh[[2, 9], 1] = np.inf
        kh[[4, 9], 3] = -np.inf
        got = nb.dense_select(h["q"], kh, h["weights"], None, None, None, topk=32,
                              index_base="relative", order="score", out=np.empty((3, 32), np.int32))
        with np.errstate(invalid="ignore"):
            want = ref.dense_select(h["q"], kh, h["weights"], topk=32, order="score")
        np.testing.assert_array_equal(got, want)

    def test_workspace_chunking(monkeypatch):
        """A tiny workspace budget forces one launch per row; results must not change."""
        T, S, H, D, B, k = 5, 64, 2, 8, 16, 12
        d = inputs(T, S, H, D, "bfloat16", B, "ragged", seed=17)
        args = (phys(d["q"]), phys(d["k"]), d["weights"], None, d["ks"], d["ke"])
        kw = dict(topk=k, index_base="relative", order="score")
        big_d = nb.dense_select(*args, **kw, out=np.empty((T, k), np.int32))
        big_h = nb.hisa_select(*args, block_size=B, block_topk=2, pool_dtype="bfloat16", **kw,
                               out=np.empty((T, k), np.int32))
        monkeypatch.setattr(nb, "WORKSPACE_BYTES", 1)
        np.testing.assert_array_equal(nb.dense_select(*args, **kw, out=np.empty((T, k), np.int32)), big_d)
        np.testing.assert_array_equal(
            nb.hisa_select(*args, block_size=B, block_topk=2, pool_dtype="bfloat16", **kw,
                           out=np.empty((T, k), np.int32)), big_h)
        want = ref.dense_select(d["q"], d["k"], d["weights"], ks=d["ks"], ke=d["ke"], topk=k,
                                order="score")
        np.testing.assert_array_equal(big_d, want)

    @pytest.mark.parametrize("case", ["ties_nan", "lengths", "k_larger_than_n"])
    def test_topk(case):
        rng = np.random.default_rng(18)
        R, N, k = 5, 150, 40
        scores = (rng.integers(-3, 4, (R, N)) / 2).astype(np.float32)  # many ties
        scores[rng.random((R, N)) < 0.1] = np.nan
        scores[0, :20] = -0.0
        scores[1, 5] = np.inf
        scores[1, 6] = -np.inf
        scores[2, :] = np.nan
        lengths = None
        if case == "lengths":
            lengths = np.array([0, 7, -3, 200, 41], np.int32)
        if case == "k_larger_than_n":
            k = 170
        vals, idx = nb.topk(scores, lengths, k=k, out_values=np.empty((R, k), np.float32),
                            out_indices=np.empty((R, k), np.int32))
        wv, wi = ref.topk(scores, k, lengths=lengths)
        np.testing.assert_array_equal(idx, wi)
        assert same_bits(vals, wv)  # NaN and -0.0 values pass through unchanged

    def test_outputs_allocated_when_out_is_none():
        d = inputs(3, 32, 2, 8, "float32", 16, seed=19)
        got = nb.dense_select(d["q"], d["k"], d["weights"], None, None, None, topk=8,
                              index_base="relative", order="position")
        assert got.dtype == np.int32 and got.shape == (3, 8)
        np.testing.assert_array_equal(got, ref.dense_select(d["q"], d["k"], d["weights"], topk=8))
        v, i = nb.topk(np.zeros((2, 3), np.float32), None, k=4)
        assert v.dtype == np.float32 and i.dtype == np.int32 and i.tolist() == [[0, 1, 2, -1]] * 2

    def test_head_dim_must_fit_the_shared_query_buffer():
        D = nb.Q_SHARED + 1
        with pytest.raises(ValueError, match="head dim"):
            nb.dense_select(np.zeros((1, 1, D), np.float32), np.zeros((2, D), np.float32),
                            np.ones((1, 1), np.float32), None, None, None, topk=1,
                            index_base="relative", order="position")

    def test_unsupported_dtype_raises():
        q = np.zeros((2, 1, 4), np.float64)
        with pytest.raises(TypeError, match="dtype"):
            nb.dense_select(q, np.zeros((3, 4), np.float64), np.ones((2, 1), np.float32), None,
                            None, None, topk=2, index_base="relative", order="position",
                            out=np.empty((2, 2), np.int32))

    def test_docs_variant_example():
        """docs/numba.md: the max-pooling variant (kernels/numba_variants.py) runs and is right."""
        from hisa_cupy.kernels import numba_variants as nv

        rng = np.random.default_rng(20)
        k = rng.standard_normal((40, 8)).astype(np.float32)
        pooled = nv.max_pool_keys(k, None, block_size=16)
        want = np.stack([k[i:i + 16].max(axis=0) for i in range(0, 40, 16)])
        np.testing.assert_array_equal(pooled, want)
        d = inputs(4, 64, 2, 8, "float32", 16, seed=21)
        got = nv.hisa_select_maxpool(d["q"], d["k"], d["weights"], None, None, None, block_size=16,
                                     block_topk=2, topk=16)
        assert got.shape == (4, 16) and got.dtype == np.int32
