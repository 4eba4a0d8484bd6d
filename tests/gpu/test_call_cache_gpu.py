"""The call cache and bound launch plans on a real GPU (issue 5, target 5).

Repeated validate=False calls with torch CUDA tensors are served from ``hisa_cupy.select``'s call
cache: the backend's bound plan launches through cuLaunchKernel over preset parameter buffers.
Each test checks that such calls (counted through ``cupy_backend._launch_kernel``) give exactly
what the full path gives (``select.FAST_PATH = False``) and the NumPy reference, also across
streams, threads, workspace regrowth, knob flips and CUDA-graph capture. The CPU tests of the
same logic are in tests/test_call_cache.py. Run with ``pytest -m gpu tests/gpu/test_call_cache_gpu.py``.
"""
import threading

import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import reference, select, testing
from hisa_cupy.testing import to_torch

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.fixture
def bound_launches(monkeypatch):
    """Launches made by bound plans (the fast path) during the test, plain (cuLaunchKernel), with
    programmatic dependent launch (_launch_pdl, which the ordinary path uses too: counted only
    inside a bound plan's call) or as the nodes of a graph launch (CALL_GRAPHS: each node counts);
    a fresh call cache."""
    from hisa_cupy.kernels import cupy_backend

    real = cupy_backend._launch_kernel or cupy_backend._driver_launch()
    count = [0]

    def counting(*a):
        count[0] += 1
        return real(*a)

    monkeypatch.setattr(cupy_backend, "_launch_kernel", counting)
    in_bound = threading.local()  # set while a bound plan's call runs (in this thread)
    real_pdl = cupy_backend._launch_pdl

    def counting_pdl(*a):
        if getattr(in_bound, "on", False):
            count[0] += 1
        return real_pdl(*a)

    monkeypatch.setattr(cupy_backend, "_launch_pdl", counting_pdl)
    real_call = cupy_backend._Bound.__call__

    def counting_call(self, ptrs):
        in_bound.on = True
        try:
            return real_call(self, ptrs)
        finally:
            in_bound.on = False

    monkeypatch.setattr(cupy_backend._Bound, "__call__", counting_call)
    real_graph_launch = cupy_backend._CallGraph.launch

    def counting_graph_launch(self, stream):
        count[0] += len(self._nodes)
        return real_graph_launch(self, stream)

    monkeypatch.setattr(cupy_backend._CallGraph, "launch", counting_graph_launch)
    monkeypatch.setattr(select, "_calls", {})
    return count


def _args(inp):
    return ([to_torch(inp[n]) for n in ("q", "k", "weights")],
            dict(k_scale=to_torch(inp["k_scale"]), ks=to_torch(inp["ks"]), ke=to_torch(inp["ke"])))


def _full_path(fn, *a, **kw):
    select.FAST_PATH = False
    try:
        return fn(*a, **kw)
    finally:
        select.FAST_PATH = True


CASES = [
    ("hisa", "float8_e4m3fn", dict(ragged=True), dict(block_size=128, block_topk=8, topk=512)),
    ("hisa", "float8_e4m3fn", dict(), dict(block_size=128, block_topk=8, topk=512, order="score")),
    ("hisa", "bfloat16", dict(packed=True), dict(block_size=64, block_topk=6, topk=200, index_base="absolute")),
    ("hisa", "float16", dict(), dict(block_size=128, block_topk=4, topk=300, pool_dtype="float8_e4m3fn")),
    ("dense", "float8_e4m3fn", dict(ragged=True), dict(topk=700)),
    ("dense", "float32", dict(), dict(topk=256, order="score")),
]


@pytest.mark.parametrize("kind,dtype,layout,kw", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_cached_calls_equal_the_full_path(cuda_device, bound_launches, kind, dtype, layout, kw):
    inp = testing.exact_inputs(37, 4096, 64, 128, dtype=dtype, seed=7, **layout)
    fn = hisa_cupy.hisa_select if kind == "hisa" else hisa_cupy.dense_select
    ref_fn = reference.hisa_select if kind == "hisa" else reference.dense_select
    a, kws = _args(inp)
    full = _full_path(fn, *a, **kws, validate=False, **kw)
    first = fn(*a, **kws, validate=False, **kw)  # records the signature (full path)
    assert bound_launches[0] == 0
    results = [fn(*a, **kws, validate=False, **kw) for _ in range(3)]  # served from the cache
    assert bound_launches[0] >= 3 * 2
    torch.cuda.synchronize()
    for r in [first] + results:
        assert r.dtype == torch.int32 and r.is_cuda and torch.equal(r, full)
    assert len({r.data_ptr() for r in results}) == 3  # a fresh result each call (all alive)
    ref = ref_fn(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"], ke=inp["ke"], **kw)
    testing.assert_selection_equal(results[-1], ref)
    # new data in new tensors of the same signature: still a hit, still right
    inp2 = testing.exact_inputs(37, 4096, 64, 128, dtype=dtype, seed=8, **layout)
    a2, kws2 = _args(inp2)
    before = bound_launches[0]
    got = fn(*a2, **kws2, validate=False, **kw)
    assert bound_launches[0] > before
    ref2 = ref_fn(inp2["q"], inp2["k"], inp2["weights"], k_scale=inp2["k_scale"], ks=inp2["ks"], ke=inp2["ke"],
                  **kw)
    testing.assert_selection_equal(got, ref2)


def test_out_argument_and_graph_capture(graph_case, bound_launches):
    c = graph_case
    with torch.cuda.stream(c.stream):
        assert hisa_cupy.hisa_select(*c.static, **c.kw) is c.out  # full path: records the signature
        assert hisa_cupy.hisa_select(*c.static, **c.kw) is c.out  # a hit, outside capture
    torch.cuda.current_stream().wait_stream(c.stream)
    hits = bound_launches[0]
    assert hits > 0
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=c.stream):
        hisa_cupy.hisa_select(*c.static, **c.kw)  # captured from the bound plan
    assert bound_launches[0] > hits
    c.replay_matches_reference(g)


def test_two_streams_one_shape_keep_their_workspaces(cuda_device, bound_launches):
    # the same signature on two streams: each has its own entry and workspace, so interleaved
    # calls that are never synchronised with each other cannot overwrite each other's scratch data
    T, S = 256, 16384
    kw = dict(block_size=128, block_topk=16, topk=1024, validate=False)
    data = [testing.exact_inputs(T, S, 64, 128, dtype="float8_e4m3fn", seed=s) for s in (1, 2)]
    args = [_args(d) for d in data]
    refs = [reference.hisa_select(d["q"], d["k"], d["weights"], **kw_ref) for d, kw_ref in
            zip(data, [dict(block_size=128, block_topk=16, topk=1024)] * 2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for st in streams:
        st.wait_stream(torch.cuda.current_stream())
    results = [[], []]
    for _ in range(6):
        for i, st in enumerate(streams):
            with torch.cuda.stream(st):
                a, kws = args[i]
                results[i].append(hisa_cupy.hisa_select(*a, **kws, **kw))
    assert bound_launches[0] > 0 and len(select._calls) == 2
    torch.cuda.synchronize()
    for i in range(2):
        for r in results[i]:
            testing.assert_selection_equal(r, refs[i])


def test_regrown_workspace_and_knobs_rebind(cuda_device, bound_launches, monkeypatch):
    from hisa_cupy.kernels import cupy_backend

    kw = dict(block_size=128, block_topk=8, topk=512, validate=False)
    small = testing.exact_inputs(32, 4096, 64, 128, dtype="float8_e4m3fn", seed=3)
    large = testing.exact_inputs(96, 16384, 64, 128, dtype="float8_e4m3fn", seed=4)
    refs = {id(d): reference.hisa_select(d["q"], d["k"], d["weights"], block_size=128, block_topk=8, topk=512)
            for d in (small, large)}
    for d in (small, small, large, large, small, small, large):  # the large shape regrows the workspace
        a, kws = _args(d)
        testing.assert_selection_equal(hisa_cupy.hisa_select(*a, **kws, **kw), refs[id(d)])
    cupy_backend.release_workspace()
    a, kws = _args(small)
    for _ in range(2):
        testing.assert_selection_equal(hisa_cupy.hisa_select(*a, **kws, **kw), refs[id(small)])
    monkeypatch.setattr(cupy_backend, "USE_UNION_PAIRS", False)  # the plan changes: bound anew
    for _ in range(2):
        testing.assert_selection_equal(hisa_cupy.hisa_select(*a, **kws, **kw), refs[id(small)])


def test_calls_from_another_thread(cuda_device, bound_launches):
    kw = dict(block_size=128, block_topk=8, topk=512, validate=False)
    inp = testing.exact_inputs(40, 4096, 64, 128, dtype="float8_e4m3fn", seed=9)
    a, kws = _args(inp)
    hisa_cupy.hisa_select(*a, **kws, **kw)  # recorded on this thread
    out, errors = [], []

    def worker():
        try:
            for _ in range(3):
                out.append(hisa_cupy.hisa_select(*a, **kws, **kw))
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors and len(out) == 3 and bound_launches[0] > 0
    ref = reference.hisa_select(inp["q"], inp["k"], inp["weights"], block_size=128, block_topk=8, topk=512)
    for r in out:
        testing.assert_selection_equal(r, ref)


def test_cached_calls_allocate_only_their_results(cuda_device, bound_launches):
    kw = dict(block_size=128, block_topk=64, topk=2048, validate=False)
    inp = testing.exact_inputs(256, 8192, 64, 128, dtype="float8_e4m3fn", seed=5)
    a, kws = _args(inp)
    for _ in range(3):
        hisa_cupy.hisa_select(*a, **kws, **kw)
    torch.cuda.synchronize()
    import cupy

    pool = cupy.get_default_memory_pool()
    used, allocated = pool.used_bytes(), torch.cuda.memory_allocated()
    for _ in range(50):
        r = hisa_cupy.hisa_select(*a, **kws, **kw)
    del r
    torch.cuda.synchronize()
    assert pool.used_bytes() == used and torch.cuda.memory_allocated() == allocated


def test_errors_unchanged_next_to_cached_calls(cuda_device, bound_launches):
    kw = dict(block_size=128, block_topk=8, topk=512, validate=False)
    inp = testing.exact_inputs(32, 4096, 64, 128, dtype="float8_e4m3fn", seed=6)
    a, kws = _args(inp)
    for _ in range(2):
        hisa_cupy.hisa_select(*a, **kws, **kw)
    q_bad = torch.empty(32 * 64 * 128 + 1, dtype=torch.uint8, device="cuda")[1:].view(torch.float8_e4m3fn)
    q_bad = q_bad.view(32, 64, 128)  # not 16-byte aligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        hisa_cupy.hisa_select(q_bad, *a[1:], **kws, **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        hisa_cupy.hisa_select(a[0], a[1].t().contiguous().t(), a[2], **kws, **kw)
    with pytest.raises(TypeError, match="block_size"):
        hisa_cupy.hisa_select(*a, **kws, **dict(kw, block_size=128.0))


@pytest.mark.parametrize("order", ["position", "score"])
def test_bound_calls_as_graphs_queued(cuda_device, monkeypatch, order):
    # CALL_GRAPHS: repeated calls replay one CUDA graph per plan (programmatic edges on sm_90+).
    # Calls queued back to back with no sync, alternating two inputs and keeping every output (so
    # that a node's parameters are set again while the graph's last launch may still run), at
    # T = 96 (the refine top-k after the union's ready flags) and T = 97 (a last pair of one row):
    # every output equals the reference, the graph was made once and launched per call, and the
    # same calls with CALL_GRAPHS = False give the same outputs
    from hisa_cupy.kernels import cupy_backend

    graphs, launches = [], [0]
    real_init, real_launch = cupy_backend._CallGraph.__init__, cupy_backend._CallGraph.launch

    def spy_init(self, *a):
        graphs.append(self)
        real_init(self, *a)

    def spy_launch(self, stream):
        launches[0] += 1
        real_launch(self, stream)

    monkeypatch.setattr(cupy_backend._CallGraph, "__init__", spy_init)
    monkeypatch.setattr(cupy_backend._CallGraph, "launch", spy_launch)
    kw = dict(block_size=128, block_topk=16, topk=1024, order=order, validate=False)
    for T in (96, 97):
        monkeypatch.setattr(select, "_calls", {})
        graphs.clear()
        launches[0] = 0
        inps = [testing.exact_inputs(T, 16384, 64, 128, dtype="float8_e4m3fn", seed=s, ragged=T % 2 == 1)
                for s in (31, 32)]
        args = [_args(inp) for inp in inps]
        refs = [reference.hisa_select(inp["q"], inp["k"], inp["weights"], k_scale=inp["k_scale"], ks=inp["ks"],
                                      ke=inp["ke"], block_size=128, block_topk=16, topk=1024, order=order)
                for inp in inps]
        outs = {}
        for use in (True, False):
            monkeypatch.setattr(cupy_backend, "CALL_GRAPHS", use)
            outs[use] = [hisa_cupy.hisa_select(*args[i % 2][0], **args[i % 2][1], **kw) for i in range(8)]
            torch.cuda.synchronize()
            for i, got in enumerate(outs[use]):
                testing.assert_selection_equal(got, refs[i % 2], err_msg=f"T={T} graphs={use} call {i}")
            if use:
                assert len(graphs) == 1 and launches[0] == 7, (len(graphs), launches[0])  # call 0 records
        for x, y in zip(outs[True], outs[False]):
            assert torch.equal(x, y)

