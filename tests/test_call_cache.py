"""The host path of repeated device calls, without a GPU (issue 5, target 5).

Two layers are tested against the ordinary path they replace:

* the CuPy backend's bound plans (``cupy_backend.bind_hisa_select`` / ``bind_dense_select``): a
  NumPy stand-in plays CuPy, compiled kernels are recorded instead of run, and cuLaunchKernel
  (``cupy_backend._launch_kernel``) is replaced by a recorder that reads each argument back from
  the kernelParams buffer it is given. Every launch of a bound call must equal, kernel for kernel,
  the launch the ordinary path makes for the same arrays (function, grid, block, shared memory,
  stream, every argument's value and width), and a plan must decline (launch nothing) when it no
  longer holds;
* the call cache of ``hisa_cupy.select``: torch tensors that claim to live on cuda:0 (as in
  tests/test_host_path.py) go through ``hisa_cupy.hisa_select`` / ``dense_select``; the first call
  of a signature takes the full path and records it, equal signatures are served from the cache,
  anything else -- another shape, dtype, layout, device, stream or parameter, validate=True, bad
  input -- takes the full path and behaves (raises) exactly as without the cache.

The same paths on a GPU: tests/gpu/test_call_cache_gpu.py.
"""
import ctypes
import itertools
import threading
import types

import numpy as np
import pytest

import hisa_cupy
from hisa_cupy import select
from hisa_cupy.adapters import arrays
from hisa_cupy.kernels import cupy_backend as cb

from fake_arrays import pointer_array  # tests/fake_arrays.py

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")


# ---------------------------------------------------------------------------------------------
# a recording stand-in for CuPy, the compiled kernels and cuLaunchKernel

_ids = itertools.count(0x1000)


def _arg_value(arg):
    """(value, width in bytes) of one argument of CuPy's launch: CScalar, NumPy scalar or CIntptr."""
    if isinstance(arg, np.generic):
        return int(arg), arg.itemsize
    if hasattr(arg, "value"):  # CScalar
        return int(arg.value), np.dtype(arg.dtype).itemsize
    return ctypes.c_int64.from_address(arg.ptr).value, 8  # CIntptr: ptr is the address of its intptr_t


class _Fake:
    """CuPy on a device of capability ``cc``: kernels record their launches through CuPy
    (``direct``) and through the driver (``bound``), each as (name, grid, block, smem, stream,
    [(value, width), ...]). ``pdl``: the driver has cuLaunchKernelEx, whose launches (both paths
    then take it) are recorded in ``pdl`` as (name, grid, block, smem, stream, [8-byte slot, ...],
    attributes); otherwise (the default, whatever this machine's driver) it has none. ``graphs``:
    the driver has the graph entry points (_FakeGraphs, ``self.graphs``); otherwise (the default)
    none, so bound plans launch one by one. The driver never counts a kernel's parameters here."""

    def __init__(self, monkeypatch, cc=90, smem_optin=227 * 1024, pdl=False, graphs=False):
        self.direct, self.bound, self.pdl = [], [], []
        self.fns = {}  # function pointer -> _Fn
        self.state = types.SimpleNamespace(device=0, stream=0, meminfo=0)
        fake = self
        state = self.state

        class Stream:
            def __init__(self, ptr):
                self.ptr = ptr
                self._prev = []

            def __enter__(self):
                self._prev.append(state.stream)
                state.stream = self.ptr

            def __exit__(self, *exc):
                state.stream = self._prev.pop()

            @classmethod
            def from_external(cls, handle):
                return cls(handle.__cuda_stream__()[1])

        Stream.null = Stream(0)

        def meminfo():
            state.meminfo += 1
            return (1, 1)

        class Device:
            def __init__(self, device=None):
                self.id = state.device if device is None else device
                self._prev = []

            def __enter__(self):
                self._prev.append(state.device)
                state.device = self.id

            def __exit__(self, *exc):
                state.device = self._prev.pop()

        runtime = types.SimpleNamespace(getDevice=lambda: state.device, memGetInfo=meminfo)
        cuda = types.SimpleNamespace(Device=Device, runtime=runtime,
                                     get_current_stream=lambda: types.SimpleNamespace(ptr=state.stream),
                                     Stream=Stream, UnownedMemory=cupy.cuda.UnownedMemory,
                                     MemoryPointer=cupy.cuda.MemoryPointer)
        self.cupy = types.SimpleNamespace(cuda=cuda, empty=lambda shape, dtype: pointer_array(shape, dtype),
                                          zeros=lambda shape, dtype: pointer_array(shape, dtype),
                                          ndarray=cupy.ndarray)
        monkeypatch.setattr(cb, "_cupy", lambda: self.cupy)
        monkeypatch.setattr(cb, "_device_facts", lambda device_id: {"cc": cc, "smem_optin": smem_optin, "sms": 132})
        for name in ("_workspaces", "_smem_opted_in", "_kernels", "_plans", "_stream_objects"):
            monkeypatch.setattr(cb, name, {})
        monkeypatch.setattr(cb, "_thread", threading.local())

        class _Fn:
            def __init__(self, filename, name):
                self.name, self.ptr = name, next(_ids)
                fake.fns[self.ptr] = self

            def __call__(self, grid, block, args, shared_mem=0):
                grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
                fake.direct.append((self.name, grid, block, shared_mem, state.stream,
                                    [_arg_value(a) for a in args]))
                fake.nargs[self.ptr] = len(args)

        self.nargs = {}
        self.Fn = _Fn
        monkeypatch.setattr(cb, "_function", lambda filename, name, device_id: _Fn(filename, name))
        monkeypatch.setattr(cb, "_BINDABLE", (_Fn,))
        from cupy_backends.cuda.api import driver

        monkeypatch.setattr(driver, "funcSetAttribute", lambda ptr, attr, value: None)
        monkeypatch.setattr(driver, "occupancyMaxActiveBlocksPerMultiprocessor", lambda ptr, threads, smem: 3)

        def launch_kernel(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            fn = fake.fns[f]
            argv = (ctypes.c_uint64 * fake.nargs[f]).from_address(params)
            # every slot is 8 bytes; the width of each argument is checked against the direct path
            values = [ctypes.c_uint64.from_address(a).value for a in argv]
            assert extra == 0
            fake.bound.append((fn.name, (gx, gy, gz), (bx, by, bz), smem, stream, values))

        monkeypatch.setattr(cb, "_launch_kernel", launch_kernel)

        def launch_kernel_ex(cfg, f, params, extra):
            c = cb._LaunchConfig.from_address(cfg)
            attrs = [(c.attrs[i].id, c.attrs[i].value) for i in range(c.nattrs)]
            argv = (ctypes.c_uint64 * fake.nargs[f]).from_address(params)
            values = [ctypes.c_uint64.from_address(a).value for a in argv]
            assert extra is None
            fake.pdl.append((fake.fns[f].name, tuple(c.grid), tuple(c.block), c.smem, c.stream or 0, values, attrs))
            return 0

        monkeypatch.setattr(cb, "_launch_kernel_ex", launch_kernel_ex if pdl else False)
        real_pdl_args = cb._launch_pdl_args

        def launch_pdl_args(fn, grid, block, args, smem):  # the argument count, as _Fn.__call__ notes it
            fake.nargs[fn.ptr] = len(args)
            return real_pdl_args(fn, grid, block, args, smem)

        monkeypatch.setattr(cb, "_launch_pdl_args", launch_pdl_args)
        monkeypatch.setattr(cb, "_func_param_info", False)
        monkeypatch.setattr(cb, "_param_counts", {})
        self.graphs = _FakeGraphs(self) if graphs else None
        monkeypatch.setattr(cb, "_graph_api", self.graphs.api if graphs else False)


class _FakeGraphs:
    """The driver's graph entry points as cupy_backend calls them (ctypes objects, byref): a kernel
    node records its function, dimensions, shared memory and the argument slots its kernelParams
    point at when it is made and when its parameters are set again; a graph launch records, per
    node in order, what it holds then (as _Fake.bound records a launch), in ``launches``."""

    def __init__(self, fake):
        self.nodes, self.edges, self.launches, self.updates, self.destroyed = {}, [], [], [], []
        self.capturing, self.fail = 0, None
        ids = itertools.count(0x9000)

        def read(p):
            argv = (ctypes.c_uint64 * fake.nargs[p.func]).from_address(p.params)
            return (fake.fns[p.func].name, tuple(p.grid), tuple(p.block), p.smem,
                    [ctypes.c_uint64.from_address(a).value for a in argv])

        def out(ref):  # the c_void_p a byref() points at
            return ref._obj

        def create(graph, flags):
            out(graph).value = next(ids)
            return 0

        def add_node(node, graph, deps, ndeps, params):
            if self.fail == "node":
                return 1
            n = out(node).value = next(ids)
            self.nodes[n] = read(out(params))
            return 0

        def add_edge(graph, src, dst, edge, n):
            e = out(edge)
            self.edges.append((out(src).value, out(dst).value, e.from_port, e.to_port, e.type, bytes(e.reserved)))
            return 0

        def instantiate(ex, graph, flags):
            out(ex).value = next(ids)
            return 0

        def set_params(ex, node, params):
            self.nodes[node.value] = read(out(params))
            self.updates.append(self.nodes[node.value][0])
            return 0

        def launch(ex, stream):
            self.launches.append((stream, [self.nodes[n] for n in sorted(self.nodes)]))
            return 0

        def is_capturing(stream, status):
            out(status).value = self.capturing
            return 0

        self.api = {"cuGraphCreate": create, "cuGraphAddKernelNode_v2": add_node,
                    "cuGraphAddDependencies_v2": add_edge, "cuGraphInstantiateWithFlags": instantiate,
                    "cuGraphExecKernelNodeSetParams_v2": set_params, "cuGraphLaunch": launch,
                    "cuGraphExecDestroy": lambda ex: self.destroyed.append("exec") or 0,
                    "cuGraphDestroy": lambda graph: self.destroyed.append("graph") or 0,
                    "cuStreamIsCapturing": is_capturing}
        assert sorted(self.api) == sorted(name for name, _ in cb._GRAPH_API)


def _same_launches(bound, direct):
    """Bound launches (8-byte slots) equal the direct ones (values of their own width)."""
    assert [b[:5] for b in bound] == [d[:5] for d in direct]
    for b, d in zip(bound, direct):
        assert len(b[5]) == len(d[5]), b[0]
        for i, (slot, (value, width)) in enumerate(zip(b[5], d[5])):
            mask = (1 << (8 * width)) - 1
            assert slot & mask == value & mask, (b[0], i)
            if width == 4:
                assert slot >> 32 == 0, (b[0], i)  # an int argument sits in the low bytes only


def _inputs(T, S, H=64, D=128, qdt=np.uint8, scale=True, ranges=False, topk=512):
    arrs = dict(q=pointer_array((T, H, D), qdt), k=pointer_array((S, D), qdt), weights=pointer_array((T, H), np.float32),
                k_scale=pointer_array((S,), np.float32) if scale else None,
                ks=pointer_array((T,), np.int32) if ranges else None, ke=pointer_array((T,), np.int32) if ranges else None,
                out=pointer_array((T, topk), np.int32))
    return arrs


def _ptrs(a):
    return [0 if a[n] is None else a[n].data.ptr for n in ("q", "k", "weights", "k_scale", "ks", "ke", "out")]


def _run_hisa(a, stream=0, **kw):
    p = dict(block_size=128, block_topk=8, topk=a["out"].shape[1], pool_dtype="bfloat16", index_base="relative",
             order="position")
    p.update(kw)
    cb.hisa_select(a["q"], a["k"], a["weights"], a["k_scale"], a["ks"], a["ke"], out=a["out"], stream=stream, **p)
    return p


def _bind_hisa(a, stream=0, **p):
    return cb.bind_hisa_select(a["q"], a["k"], a["weights"], a["k_scale"], a["ks"], a["ke"], out=a["out"],
                               stream=stream, **p)


# ---------------------------------------------------------------------------------------------
# bound plans (kernels/cupy_backend.py)

HISA_CASES = [
    dict(cc=90, T=65, S=4096),  # wgmma, union pairs, odd T
    dict(cc=90, T=70, S=4096, chunk_rows=16),  # refinement in 5 row chunks: out addresses with offsets
    dict(cc=90, T=33, S=3000, ranges=True, scale=False, order="score", index_base="absolute"),
    dict(cc=90, T=40, S=4096, pool_dtype="float8_e4m3fn"),  # pooled scale from the workspace
    dict(cc=90, T=16, S=4096, qdt=np.uint16),  # bf16
    dict(cc=80, T=48, S=2048),  # mma.sync engines elsewhere
    dict(cc=89, T=48, S=2048, H=32, D=64, ranges=True),
]


@pytest.mark.parametrize("case", HISA_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_bound_hisa_launches_equal_the_ordinary_path(monkeypatch, case):
    case = dict(case)
    fake = _Fake(monkeypatch, cc=case.pop("cc"))
    chunk = case.pop("chunk_rows", None)
    if chunk:
        monkeypatch.setattr(cb, "REFINE_WORKSPACE_BYTES", chunk * 8 * 128 * 4 + 8)
    kw = {n: case.pop(n) for n in ("order", "index_base", "pool_dtype") if n in case}
    a = _inputs(**case)
    p = _run_hisa(a, **kw)  # the call that sizes the workspace and makes the plans
    fake.direct.clear()
    bound = _bind_hisa(a, **p)
    assert bound is not None and not fake.direct and not fake.bound  # binding launches nothing
    # a later call: other arrays of the same shapes, the ordinary path vs the bound plan
    b = _inputs(**case)
    _run_hisa(b, **kw)
    assert bound(_ptrs(b)) is True
    assert bound.launches == len(fake.direct) == len(fake.bound) >= 5
    _same_launches(fake.bound, fake.direct)
    if chunk:
        assert sum(1 for x in fake.bound if x[0].startswith("refine_topk")) == 5
    # and again with the first arrays: every call-time address is rewritten, none left from before
    fake.direct.clear(), fake.bound.clear()
    _run_hisa(a, **kw)
    assert bound(_ptrs(a))
    _same_launches(fake.bound, fake.direct)


@pytest.mark.parametrize("cc,T,S,rows", [(90, 12, 1000, None), (80, 9, 3000, 4), (90, 40, 5000, 16)])
def test_bound_dense_launches_equal_the_ordinary_path(monkeypatch, cc, T, S, rows):
    fake = _Fake(monkeypatch, cc=cc)
    if rows:
        monkeypatch.setattr(cb, "DENSE_WORKSPACE_BYTES", rows * S * 4)
    p = dict(topk=64, index_base="relative", order="position")

    def run(x):
        cb.dense_select(x["q"], x["k"], x["weights"], x["k_scale"], x["ks"], x["ke"], out=x["out"], stream=0, **p)

    a, b = _inputs(T, S, ranges=True, topk=64), _inputs(T, S, ranges=True, topk=64)
    run(a)
    bound = cb.bind_dense_select(a["q"], a["k"], a["weights"], a["k_scale"], a["ks"], a["ke"], out=a["out"],
                                 stream=0, **p)
    fake.direct.clear()
    run(b)
    assert bound(_ptrs(b))
    _same_launches(fake.bound, fake.direct)
    if rows:
        assert sum(1 for x in fake.bound if x[0].startswith("dense_topk")) == -(-T // rows) > 1


@pytest.mark.parametrize("op", ["hisa", "dense"])
def test_pdl_launches_equal_the_plain_ones(monkeypatch, op):
    # with cuLaunchKernelEx (USE_PDL on sm_90): the ordinary path and a bound plan both launch
    # through it, with the programmatic-serialization attribute, the plain launches' grid, block,
    # shared memory, stream and argument values; without the knob, or before sm_90, plainly
    dense = dict(topk=64, index_base="relative", order="position")

    def run(x):
        if op == "hisa":
            return _run_hisa(x, stream=7)
        cb.dense_select(x["q"], x["k"], x["weights"], x["k_scale"], x["ks"], x["ke"], out=x["out"], stream=7, **dense)

    def bind(x, p):
        if op == "hisa":
            return _bind_hisa(x, stream=7, **p)
        return cb.bind_dense_select(x["q"], x["k"], x["weights"], x["k_scale"], x["ks"], x["ke"], out=x["out"],
                                    stream=7, **dense)

    T, S, topk = (65, 4096, 512) if op == "hisa" else (40, 5000, 64)
    a = _inputs(T, S, ranges=True, topk=topk)
    fake = _Fake(monkeypatch, cc=90, pdl=True)
    monkeypatch.setattr(cb, "USE_PDL", False)
    run(a)
    direct = list(fake.direct)
    assert direct and not fake.pdl
    fake.direct.clear()
    monkeypatch.setattr(cb, "USE_PDL", True)
    p = run(a)
    assert not fake.direct and len(fake.pdl) == len(direct)
    bound = bind(a, p)
    assert bound is not None and bound._pdl and len(fake.pdl) == len(direct)  # binding launches nothing
    assert bound(_ptrs(a)) and not fake.bound and len(fake.pdl) == 2 * len(direct)
    on_direct, on_bound = fake.pdl[:len(direct)], fake.pdl[len(direct):]
    for launches in (on_direct, on_bound):
        assert [x[:5] for x in launches] == [d[:5] for d in direct]
        assert all(x[6] == [(6, 1)] for x in launches)  # PROGRAMMATIC_STREAM_SERIALIZATION, allowed
        for x, d in zip(launches, direct):
            assert len(x[5]) == len(d[5])
            for slot, (value, width) in zip(x[5], d[5]):
                mask = (1 << (8 * width)) - 1
                assert slot & mask == value & mask, x[0]
    monkeypatch.setattr(cb, "USE_PDL", False)
    fake.pdl.clear()
    run(a)
    assert len(fake.direct) == len(direct) and not fake.pdl
    fake = _Fake(monkeypatch, cc=89, pdl=True)
    run(a)
    assert fake.direct and not fake.pdl


# ---------------------------------------------------------------------------------------------
# bound calls replayed as CUDA graphs (CALL_GRAPHS)

def _one_by_one(monkeypatch, fake, bound, ptrs):
    """What ``bound`` launches for ``ptrs`` without graphs, as _FakeGraphs records a launch's nodes."""
    monkeypatch.setattr(cb, "CALL_GRAPHS", False)
    fake.bound.clear(), fake.pdl.clear()
    assert bound(ptrs)
    monkeypatch.setattr(cb, "CALL_GRAPHS", True)
    launches = fake.pdl if bound._pdl else fake.bound
    return [(x[0], x[1], x[2], x[3], x[5]) for x in launches], {x[4] for x in launches}


@pytest.mark.parametrize("pdl", [False, True])
def test_bound_call_replays_one_graph(monkeypatch, pdl):
    # the first bound call makes one graph of the plan's launches (node i = launch i: function,
    # grid, block, shared memory, every argument slot), each node after the one before (a
    # programmatic edge where the launches take PDL), and launches it; later calls launch it again,
    # setting again only the parameters of the nodes whose call-time addresses changed
    fake = _Fake(monkeypatch, cc=90, pdl=pdl, graphs=True)
    g = fake.graphs
    a, b = _inputs(65, 4096, ranges=True), _inputs(65, 4096, ranges=True)
    p = _run_hisa(a, stream=7)
    bound = _bind_hisa(a, stream=7, **p)
    assert bound._pdl == pdl
    want_b, streams = _one_by_one(monkeypatch, fake, bound, _ptrs(b))
    assert streams == {7} and len(want_b) == bound.launches >= 5
    fake.bound.clear(), fake.pdl.clear()
    assert bound(_ptrs(b))
    assert not fake.bound and not fake.pdl  # nothing launched one by one
    assert g.launches == [(7, want_b)] and not g.updates
    node_ids = sorted(g.nodes)
    port = cb._CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC if pdl else 0
    kind = cb._CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC if pdl else 0
    assert g.edges == [(x, y, port, 0, kind, bytes(5)) for x, y in zip(node_ids, node_ids[1:])]
    assert bound(_ptrs(b)) and g.launches[-1] == (7, want_b) and not g.updates  # the same addresses
    # every address changed: every node that reads one is set again, and the launch equals the
    # launches one by one
    want_a, _ = _one_by_one(monkeypatch, fake, bound, _ptrs(a))
    assert bound(_ptrs(a)) and g.launches[-1] == (7, want_a)
    readers = [i for i, slots in enumerate(bound._graph_vars) if slots]
    assert g.updates == [want_a[i][0] for i in readers] and 4 <= len(readers) < bound.launches  # not the top-m's
    # only the output moved: only the nodes that write it (the refinement's top-k)
    c = dict(a, out=_inputs(65, 4096, ranges=True)["out"])
    want_c, _ = _one_by_one(monkeypatch, fake, bound, _ptrs(c))
    g.updates.clear()
    assert bound(_ptrs(c)) and g.launches[-1] == (7, want_c)
    assert g.updates and all(name.startswith("refine_topk") for name in g.updates)
    assert len(g.nodes) == bound.launches and len(g.launches) == 4  # still the one graph
    graph = bound._graph
    graph.close(), graph.close()
    assert g.destroyed == ["exec", "graph"]


def test_bound_call_without_graphs(monkeypatch):
    # while the stream is being captured (a graph of the caller's), the plan launches one by one
    # (what the capture records); a graph the driver refuses to make, or a driver without graphs,
    # leaves the plan launching one by one for good; CALL_GRAPHS = False the same
    fake = _Fake(monkeypatch, cc=90, graphs=True)
    g = fake.graphs
    a = _inputs(64, 4096)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    want, _ = _one_by_one(monkeypatch, fake, bound, _ptrs(a))
    g.capturing = 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE
    fake.bound.clear()
    assert bound(_ptrs(a)) and len(fake.bound) == bound.launches and not g.launches and bound._graph is None
    g.capturing = 0
    assert bound(_ptrs(a)) and len(g.launches) == 1 and bound._graph
    fake2 = _Fake(monkeypatch, cc=90, graphs=True)
    fake2.graphs.fail = "node"
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    for _ in range(2):
        fake2.bound.clear()
        assert bound(_ptrs(a)) and len(fake2.bound) == bound.launches
        assert bound._graph is False and not fake2.graphs.launches
    assert fake2.graphs.destroyed == ["graph"]  # the half-made graph
    fake3 = _Fake(monkeypatch, cc=90)  # no graph entry points
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    assert bound(_ptrs(a)) and len(fake3.bound) == bound.launches and bound._graph is False
    fake4 = _Fake(monkeypatch, cc=90, graphs=True)
    monkeypatch.setattr(cb, "CALL_GRAPHS", False)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    assert bound(_ptrs(a)) and len(fake4.bound) == bound.launches and not fake4.graphs.nodes


def test_bound_plan_buffer_layout(monkeypatch):
    # the kernelParams buffer: one slot per call-time (array, offset), rewritten per call; the
    # addresses of a launch's argument slots; int32 values in the low 4 bytes
    fake = _Fake(monkeypatch)
    a = _inputs(64, 4096)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    mem = bound._mem
    base = mem.ctypes.data
    nvar = len(bound._var)
    assert sorted(bound._var) == [(0, 0), (1, 0), (2, 0), (3, 0), (6, 0)]  # q, k, weights, k_scale, out
    for f, grid, block, smem, params in bound.records():
        argv = (ctypes.c_uint64 * fake.nargs[f]).from_address(params)
        assert base <= params < base + mem.nbytes and all(base <= x < base + mem.nbytes for x in argv)
    b = _inputs(64, 4096)
    assert bound(_ptrs(b))
    assert [int(x) for x in mem[:nvar]] == [_ptrs(b)[i] + off for i, off in bound._var]


def test_bound_plan_declines_when_it_no_longer_holds(monkeypatch):
    fake = _Fake(monkeypatch)
    a = _inputs(64, 4096)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    assert bound(_ptrs(a))
    fake.bound.clear()
    ptrs = _ptrs(a)
    ptrs[0] += 8  # q not 16-byte aligned: the kernels cannot take it
    assert bound(ptrs) is False
    ptrs = _ptrs(a)
    ptrs[1] += 4
    assert bound(ptrs) is False
    ptrs = _ptrs(a)
    ptrs[2] += 4  # weights need no more than their own alignment
    assert bound(ptrs) is True
    fake.bound.clear()
    monkeypatch.setattr(cb, "USE_UNION_PAIRS", False)  # a knob: the plan would differ
    assert bound(_ptrs(a)) is False
    monkeypatch.setattr(cb, "USE_UNION_PAIRS", True)
    assert bound(_ptrs(a))
    fake.bound.clear()
    fake.state.device = 1  # another device is current
    assert bound(_ptrs(a)) is False
    fake.state.device = 0
    _run_hisa(_inputs(64, 8192))  # a larger shape on the same stream regrows the workspace
    assert bound(_ptrs(a)) is False
    assert not fake.bound  # declined calls launch nothing
    again = _bind_hisa(a, **p)  # after an ordinary call (nothing to regrow): bound anew
    assert again(_ptrs(a))
    cb.release_workspace()
    assert again(_ptrs(a)) is False


def test_bound_plans_per_stream_use_their_own_workspace(monkeypatch):
    fake = _Fake(monkeypatch)
    a = _inputs(64, 4096)
    plans = {}
    for stream in (0, 77, 99):
        p = _run_hisa(a, stream=stream)
        plans[stream] = _bind_hisa(a, stream=stream, **p)
    fake.direct.clear()
    for stream, bound in plans.items():
        assert bound.stream == stream
        fake.bound.clear(), fake.direct.clear()
        _run_hisa(a, stream=stream)
        assert bound(_ptrs(a))
        assert {x[4] for x in fake.bound} == {stream}
        _same_launches(fake.bound, fake.direct)
    # the fixed (workspace) addresses differ between streams: no two streams share scratch memory
    fixed = {}
    for stream, bound in plans.items():
        mem = bound._mem
        fixed[stream] = {int(x) for x in mem[len(bound._var):]} - {0}
    assert not (fixed[0] & fixed[77]) or all(x < 1 << 20 for x in fixed[0] & fixed[77])  # small ints only


def test_no_plan_where_a_call_is_not_only_launches(monkeypatch):
    fake = _Fake(monkeypatch)
    for T, S in ((0, 4096), (8, 0)):
        a = _inputs(T, S, topk=512)
        p = _run_hisa(a)
        assert _bind_hisa(a, **p) is None
    monkeypatch.setattr(cb, "_BINDABLE", ())  # kernels that are not CuPy driver functions
    a = _inputs(16, 4096)
    p = _run_hisa(a)
    assert _bind_hisa(a, **p) is None
    assert fake.direct  # the ordinary path is unaffected


def test_context_is_made_current_once_per_thread(monkeypatch):
    fake = _Fake(monkeypatch)
    a = _inputs(16, 4096)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    assert bound(_ptrs(a)) and fake.state.meminfo == 0  # the binding thread launched through CuPy
    done = []

    def other():
        done.append(bound(_ptrs(a)) and bound(_ptrs(a)))

    t = threading.Thread(target=other)
    t.start(), t.join()
    assert done == [True] and fake.state.meminfo == 1


# ---------------------------------------------------------------------------------------------
# the call cache (hisa_cupy/select.py with adapters.call_signature / result_allocator)

class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on a CUDA device (the attributes the adapters read)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    device_index = 0

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return self.device_index


class _OnGpu1(_OnGpu):
    device_index = 1


def _gpu(x, cls=_OnGpu):
    return x.as_subclass(cls)


@pytest.fixture
def gpu(monkeypatch):
    """The backend stand-in, torch tensors on "cuda:0" (torch.empty too), torch's current stream
    on each device 1000 + device, and a spy on the full path."""
    fake = _Fake(monkeypatch)
    monkeypatch.setattr(arrays, "_cupy", lambda: fake.cupy)
    monkeypatch.setattr(arrays, "_STREAMS", {})
    monkeypatch.setattr(arrays, "_torch_raw_stream", lambda device: fake.state.torch_stream + device)
    fake.state.torch_stream = 1000
    empty = torch.empty

    def fake_empty(*shape, dtype=None, device=None):
        cls = _OnGpu1 if device == torch.device("cuda", 1) else _OnGpu  # None: the tests' own tensors
        return _gpu(empty(*shape, dtype=dtype), cls)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(select, "_calls", {})
    full = []
    inputs = select._Inputs

    def spy(*a, **kw):
        full.append(1)
        return inputs(*a, **kw)

    monkeypatch.setattr(select, "_Inputs", spy)
    fake.full = full
    return fake


def _tensors(T=64, S=4096, H=64, D=128, dtype=torch.float8_e4m3fn, ranges=True, cls=_OnGpu):
    g = torch.Generator().manual_seed(T * 7 + S)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(S, D, generator=g).to(dtype)
    w, ksc = torch.randn(T, H, generator=g), torch.rand(S, generator=g) + 0.5
    out = dict(q=q, k=k, weights=w, k_scale=ksc)
    if ranges:
        out["ks"] = torch.zeros(T, dtype=torch.int32)
        out["ke"] = torch.arange(S - T + 1, S + 1, dtype=torch.int32)
    return {n: _gpu(x, cls) for n, x in out.items()}


KW = dict(block_size=128, block_topk=8, topk=512, backend="cupy", validate=False)


def _hisa_call(t, **kw):
    args = dict(KW)
    args.update(kw)
    return hisa_cupy.hisa_select(t["q"], t["k"], t["weights"], k_scale=t.get("k_scale"), ks=t.get("ks"),
                                 ke=t.get("ke"), **args)


def _addresses(t, res):
    return [t[n].data_ptr() if t.get(n) is not None else 0 for n in ("q", "k", "weights", "k_scale", "ks", "ke")] \
        + [res.data_ptr()]


def test_first_call_records_and_equal_signatures_hit(gpu):
    t = _tensors()
    first = _hisa_call(t)
    assert len(gpu.full) == 1 and len(select._calls) == 1 and gpu.direct and not gpu.bound
    assert isinstance(first, torch.Tensor) and first.dtype == torch.int32 and tuple(first.shape) == (64, 512)
    direct = list(gpu.direct)
    gpu.direct.clear()
    second = _hisa_call(t)
    assert len(gpu.full) == 1 and not gpu.direct  # served from the cache: no imports, no CuPy launch
    assert isinstance(second, torch.Tensor) and tuple(second.shape) == (64, 512) and second.dtype == torch.int32
    assert second.data_ptr() != first.data_ptr()  # a fresh result per call
    # the same kernels, grids, shared memory, stream and arguments as the full path, writing the new result
    assert {x[4] for x in gpu.bound} == {1000}
    assert [b[:5] for b in gpu.bound] == [d[:5] for d in direct]
    out_slots = {v for b in gpu.bound for v in b[5]}
    assert second.data_ptr() in out_slots and first.data_ptr() not in out_slots
    # other tensors of the same signature hit too, and launch what the full path launches for them
    u = _tensors()
    gpu.bound.clear()
    res = _hisa_call(u)
    assert len(gpu.full) == 1
    select.FAST_PATH = False
    try:
        gpu.direct.clear()
        ref = _hisa_call(u)
    finally:
        select.FAST_PATH = True
    assert len(gpu.full) == 2 and not any(b[5] == d[5] for b, d in zip(gpu.bound, gpu.bound[1:]))
    for b, d in zip(gpu.bound, gpu.direct):  # the same apart from the result's address
        assert b[:5] == d[:5]
        assert [v if v != res.data_ptr() else ref.data_ptr() for v in b[5]] == [
            x & 0xFFFFFFFFFFFFFFFF if w == 8 else x & 0xFFFFFFFF for x, w in d[5]]


def test_dense_select_hits_too(gpu):
    t = _tensors(T=12, S=1000)
    kw = dict(topk=64, backend="cupy", validate=False)
    args = (t["q"], t["k"], t["weights"])
    hisa_cupy.dense_select(*args, k_scale=t["k_scale"], ks=t["ks"], ke=t["ke"], **kw)
    direct = list(gpu.direct)
    res = hisa_cupy.dense_select(*args, k_scale=t["k_scale"], ks=t["ks"], ke=t["ke"], **kw)
    assert len(gpu.full) == 1 and [b[:5] for b in gpu.bound] == [d[:5] for d in direct]
    assert tuple(res.shape) == (12, 64)
    _hisa_call(t, topk=64)  # another kind of call with the same arrays: its own entry
    assert len(gpu.full) == 2 and len(select._calls) == 2


def test_out_argument_is_written_and_returned(gpu):
    t = _tensors()
    out = _gpu(torch.empty(64, 512, dtype=torch.int32))
    assert _hisa_call(t, out=out) is out
    gpu.bound.clear()
    assert _hisa_call(t, out=out) is out and len(gpu.full) == 1
    assert out.data_ptr() in {v for b in gpu.bound for v in b[5]}
    other = _gpu(torch.empty(64, 512, dtype=torch.int32))
    assert _hisa_call(t, out=other) is other and len(gpu.full) == 1  # same signature, another buffer
    assert _hisa_call(t) is not out and len(gpu.full) == 2  # out=None is another signature


def _changes():
    """(name, change) pairs: each makes a call that must miss the entry of the base call."""
    def retensor(name, fn):
        def change(t, kw):
            t[name] = fn(t[name])
        return change

    def param(name, value):
        def change(t, kw):
            kw[name] = value
        return change

    return [
        ("shape T", lambda t, kw: t.update(_tensors(T=32))),
        ("shape S", lambda t, kw: t.update(_tensors(S=2048))),
        ("dtype", lambda t, kw: t.update(_tensors(dtype=torch.bfloat16))),
        ("no k_scale", retensor("k_scale", lambda x: None)),
        ("no ranges", lambda t, kw: (t.pop("ks"), t.pop("ke"))),
        ("subclass", lambda t, kw: t.update({"weights": t["weights"].as_subclass(type("Other", (_OnGpu,), {}))})),
        ("block_size", param("block_size", 64)),
        ("block_topk", param("block_topk", 16)),
        ("topk", param("topk", 256)),
        ("pool_dtype", param("pool_dtype", "float32")),
        ("order", param("order", "score")),
        ("index_base", param("index_base", "absolute")),
        ("backend", param("backend", "auto")),
        ("dtype=", param("dtype", "float8_e4m3fn")),
    ]


@pytest.mark.parametrize("name,change", _changes(), ids=[c[0] for c in _changes()])
def test_a_changed_signature_misses(gpu, name, change):
    t = _tensors()
    _hisa_call(t)
    kw = {}
    change(t, kw)
    _hisa_call(t, **kw)
    assert len(gpu.full) == 2 and len(select._calls) == 2  # the full path ran and recorded it
    gpu.bound.clear()
    _hisa_call(t, **kw)
    assert len(gpu.full) == 2 and gpu.bound  # and now that one hits


def test_another_stream_or_device_misses(gpu):
    t = _tensors()
    _hisa_call(t)
    gpu.state.torch_stream = 5000  # torch's current stream changed
    gpu.bound.clear(), gpu.direct.clear()
    _hisa_call(t)
    assert len(gpu.full) == 2 and {x[4] for x in gpu.direct} == {5000}  # the full path, on that stream
    _hisa_call(t)
    assert len(gpu.full) == 2 and {x[4] for x in gpu.bound} == {5000}  # its own entry, its own workspace
    gpu.state.torch_stream = 1000
    _hisa_call(t)
    assert len(gpu.full) == 2
    entries = len(select._calls)
    gpu.state.device = 1  # CuPy's current device is not the tensors': the full path (it enters theirs)
    for _ in range(2):
        _hisa_call(t)
    assert len(gpu.full) == 4 and gpu.state.device == 1
    gpu.state.device = 0
    t1 = _tensors(cls=_OnGpu1)  # tensors on another device than the current one: likewise
    for _ in range(2):
        gpu.direct.clear()
        _hisa_call(t1)
        assert gpu.direct  # launched through CuPy inside the device scope
    assert len(gpu.full) == 6 and len(select._calls) == entries and gpu.state.device == 0


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), str(e)
    return None


def _bad_inputs():
    """Calls that must raise, each with a signature next to a recorded one."""
    def bad_tensor(name, fn):
        return lambda t, kw: t.update({name: fn(t[name])})

    def bad_param(name, value):
        return lambda t, kw: kw.update({name: value})

    return [
        ("k dtype", bad_tensor("k", lambda x: _gpu(torch.zeros(4096, 128, dtype=torch.bfloat16)))),
        ("weights dtype", bad_tensor("weights", lambda x: _gpu(torch.zeros(64, 64, dtype=torch.float16)))),
        ("ks dtype", bad_tensor("ks", lambda x: _gpu(torch.zeros(64, dtype=torch.int64)))),
        ("k_scale shape", bad_tensor("k_scale", lambda x: _gpu(torch.ones(100)))),
        ("k shape", bad_tensor("k", lambda x: _gpu(torch.zeros(4096, 64).to(torch.float8_e4m3fn)))),
        ("ke missing", lambda t, kw: t.update(ke=None)),
        ("k non-contiguous", bad_tensor("k", lambda x: _gpu(torch.zeros(128, 4096).to(torch.float8_e4m3fn).t()))),
        ("k strided rows", bad_tensor("k", lambda x: _gpu(torch.zeros(4096, 256).to(torch.float8_e4m3fn)[:, :128]))),
        ("q misaligned", bad_tensor("q", lambda x: _gpu(torch.zeros(64 * 64 * 128 + 1, dtype=torch.uint8)
                                                       .view(torch.float8_e4m3fn)[1:].view(64, 64, 128)))),
        ("k on cuda:1", bad_tensor("k", lambda x: x.as_subclass(_OnGpu1))),
        ("k on the host", bad_tensor("k", lambda x: torch.zeros(4096, 128).to(torch.float8_e4m3fn))),
        ("H unsupported", lambda t, kw: t.update(_tensors(H=24))),
        ("block_size bool", bad_param("block_size", True)),
        ("block_size float", bad_param("block_size", 128.0)),
        ("topk numpy", bad_param("topk", np.float64(512))),
        ("topk bool", bad_param("topk", True)),  # True == 1: next to the recorded topk=1 call
        ("topk float", bad_param("topk", 1.0)),
        ("block_topk too small", bad_param("block_topk", 2)),
        ("pool_dtype", bad_param("pool_dtype", "float16")),
        ("order", bad_param("order", "random")),
        ("backend", bad_param("backend", "torch")),
        ("dtype unhashable", bad_param("dtype", ["float8_e4m3fn"])),
        ("validate not a bool", bad_param("validate", 0)),
        ("out shape", bad_param("out", _gpu(torch.empty(64, 256, dtype=torch.int32)))),
        ("out dtype", bad_param("out", _gpu(torch.empty(64, 512, dtype=torch.int64)))),
    ]


@pytest.mark.parametrize("name,change", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_the_same_with_the_cache(gpu, name, change):
    base = _tensors()
    _hisa_call(base)
    _hisa_call(base, out=_gpu(torch.empty(64, 512, dtype=torch.int32)))
    _hisa_call(base, topk=1)
    assert len(select._calls) == 3
    t, kw = dict(base), {}
    change(t, kw)
    with_cache = _error(lambda: _hisa_call(t, **kw))
    assert with_cache is not None and with_cache[0] in (TypeError, ValueError), with_cache
    select.FAST_PATH = False
    try:
        without = _error(lambda: _hisa_call(t, **kw))
    finally:
        select.FAST_PATH = True
    assert with_cache == without
    assert _error(lambda: _hisa_call(t, **kw)) == without  # and again (nothing was recorded for it)


def test_validate_true_always_takes_the_full_path(gpu, monkeypatch):
    t = _tensors()
    checks = []
    monkeypatch.setattr(select, "_check_values", lambda inp, validate, S: checks.append(validate))
    for _ in range(3):
        _hisa_call(t, validate=True)
    assert len(gpu.full) == 3 and checks == [True] * 3 and not select._calls and not gpu.bound


def test_knob_and_released_workspace_fall_back_then_rebind(gpu):
    t = _tensors()
    _hisa_call(t)
    _hisa_call(t)
    assert len(gpu.full) == 1
    cb.release_workspace()  # the bound plan's scratch buffers are gone
    gpu.bound.clear()
    _hisa_call(t)
    assert len(gpu.full) == 2 and not gpu.bound
    _hisa_call(t)
    assert len(gpu.full) == 2 and gpu.bound  # bound anew by the full-path call
    select.FAST_PATH = False
    try:
        _hisa_call(t)
        assert len(gpu.full) == 3
    finally:
        select.FAST_PATH = True
    select.clear_call_cache()
    _hisa_call(t)
    assert len(gpu.full) == 4


def test_uncovered_calls_are_remembered_as_such(gpu, monkeypatch):
    t = _tensors()
    binds = []
    bind = cb.bind_hisa_select
    monkeypatch.setattr(cb, "bind_hisa_select", lambda *a, **kw: binds.append(1) or None)
    for _ in range(3):
        _hisa_call(t)
    assert len(gpu.full) == 3 and binds == [1]  # not bound, and not tried again
    monkeypatch.setattr(cb, "bind_hisa_select", bind)
    select.clear_call_cache()
    _hisa_call(_tensors(T=0))  # nothing to launch for zero rows: nothing bound
    assert list(select._calls.values()) == [select._UNCOVERED]


def test_host_and_other_framework_calls_never_enter_the_cache(gpu):
    t = _tensors(T=16, S=512)
    host = {n: torch.Tensor(x.as_subclass(torch.Tensor)) for n, x in t.items()}
    hisa_cupy.hisa_select(host["q"], host["k"], host["weights"], k_scale=host["k_scale"], block_size=128,
                          block_topk=4, topk=64, validate=False)
    assert not select._calls


def test_a_view_of_a_call_time_array_is_never_bound_as_fixed(monkeypatch):
    # a stage that passed a view (out[r0:], q[1:]) would hand the binder a new object whose
    # address changes with every call: binding refuses it instead of freezing a stale address
    _Fake(monkeypatch)
    a = _inputs(16, 4096)
    b = cb._Binder((a["q"], None, a["out"]))
    var = b.ptr(a["out"], 4096)
    assert isinstance(var, cb._Var) and (var.index, var.offset) == (2, 4096)
    for view in (a["q"][1:], a["out"][3:], a["out"][:, 5:]):
        with pytest.raises(cb._Unbindable):
            b.ptr(view)
    assert b.ptr(pointer_array((4,), np.float32)).value != 0 and b.ptr(None).value == 0  # other memory: fixed
    p = _run_hisa(a)
    assert _bind_hisa(a, **p) is not None
    # the refinement's top-k handed a view of out (the block top-m's view of workspace memory is fine)
    monkeypatch.setattr(cb, "_launch_select", lambda *args, out_idx, out_off=0, em=None, **kw: em.ptr(out_idx[1:]))
    assert _bind_hisa(a, **p) is None


def test_released_workspace_memory_is_not_kept_by_bound_plans(monkeypatch):
    import gc
    import weakref

    _Fake(monkeypatch)
    a = _inputs(16, 4096)
    p = _run_hisa(a)
    bound = _bind_hisa(a, **p)
    ws = cb.workspace(0)
    refs = [weakref.ref(buf) for buf in ws._bufs.values()]
    assert refs and all(r() is not None for r in refs)
    del ws
    cb.release_workspace()
    gc.collect()
    assert all(r() is None for r in refs)  # the plan is alive, its scratch memory is not
    assert bound(_ptrs(a)) is False
