"""Where a hisa_select call spends its host time (issue 5, target 5: < 60 us per call).

Runs ``hisa_select`` on torch CUDA inputs (fp8 q / k, per-token k_scale, explicit ks / ke,
validate=False, backend="cupy", S=8K, T=1024, m=64, k=2048: the target-5 configuration) and
prints, all without cProfile:

1. host time per call, plain calls (GPU idle at the start of each trial) and calls queued behind
   a ``torch.cuda._sleep`` (GPU busy, so the host never waits). The headline is a repeated call,
   which the call cache of ``hisa_cupy.select`` serves (the fast path); the same call with
   ``select.FAST_PATH = False`` (every call on the full path, as the first call of a signature
   runs) is printed beside it;
2. a breakdown of the fast path: the call key (``adapters.call_signature``), the cache look-up,
   the output allocation (the adapters' result maker), the bound launches
   (``cupy_backend._Bound``: one CUDA graph launch, or with ``CALL_GRAPHS`` off one cuLaunchKernel
   per kernel over preset parameter buffers) and one such cuLaunchKernel;
3. a breakdown of the full path: each phase of one call (parameter checks, the import of each
   argument, the checked inputs, device / stream set-up, the output allocation, each backend
   stage, a single kernel launch, the export) called directly many times with
   time.perf_counter, in microseconds per call.

Trials never queue more than ~480 kernel launches (the launch queue would fill and launches
would block, timing the GPU instead of the host) and synchronise between trials, outside the
timed region. Pieces timed alone run warmer (caches, branch predictors) than inside a call, so
their sum is usually below the full call; the difference is printed as "unattributed".

``--cprofile`` adds a cProfile of many calls (own time and cumulative; its overhead inflates
Python-heavy functions several times, so use it to find hot spots, not to measure them).

    python bench/host_profile.py [--trials 15] [--calls-only] [--cprofile] [--top 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: most kernel launches one timed trial may queue (the CUDA launch queue holds ~1000 entries)
MAX_QUEUED_LAUNCHES = 480


def per_call_us(fn, *, reps: int, trials: int, sync=None) -> tuple[float, float]:
    """(median, min) over ``trials`` of the mean wall time of ``fn()`` in microseconds; ``sync``
    (e.g. torch.cuda.synchronize) runs before every trial, outside the timed region."""
    times = []
    for _ in range(trials):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    if sync is not None:
        sync()
    return statistics.median(times), min(times)


def reps_for(launches: int, cap: int = 2000) -> int:
    """Repetitions per trial: as many as fit in MAX_QUEUED_LAUNCHES for a piece that launches
    ``launches`` kernels (``cap`` for host-only pieces)."""
    return cap if launches <= 0 else max(1, min(cap, MAX_QUEUED_LAUNCHES // launches))


def format_rows(rows, total_us: float | None = None) -> str:
    """The breakdown table: rows of (phase, median us, min us, launches per call, note)."""
    lines = [f"{'phase':<54} {'median us':>10} {'min us':>8} {'launches':>8}  note",
             "-" * 104]
    for name, med, mn, launches, note in rows:
        lines.append(f"{name:<54} {med:>10.2f} {mn:>8.2f} {launches:>8}  {note}")
    if total_us is not None:
        lines.append(f"{'(full call)':<54} {total_us:>10.2f}")
    return "\n".join(lines)


def device_tensor(arr, view=None):
    """NumPy array -> torch CUDA tensor (``view``: torch dtype to reinterpret the bits as)."""
    import torch

    t = torch.from_numpy(arr).to("cuda")
    return t if view is None else t.view(view)


def _count_launches(cb, fn) -> int:
    """Kernel launches of one ``fn()``: every launch of the full path fetches its kernel through
    _kernel once; the fast path launches a graph (_CallGraph.launch: its nodes count) or each kernel
    through _launch_kernel (cuLaunchKernel) or _launch_pdl (cuLaunchKernelEx)."""
    count = [0]
    kernel = cb._kernel
    launch = getattr(cb, "_launch_kernel", None)
    real_launch = launch or (cb._driver_launch() if hasattr(cb, "_driver_launch") else None)
    pdl = getattr(cb, "_launch_pdl", None)
    graph_class = getattr(cb, "_CallGraph", None)
    graph_launch = graph_class.launch if graph_class is not None else None
    in_bound = [False]  # the full path's launches count through _kernel already

    def counting(*a, **kw):
        count[0] += 1
        return kernel(*a, **kw)

    def counting_launch(*a):
        count[0] += 1
        return real_launch(*a)

    def counting_pdl(*a):
        count[0] += in_bound[0]  # a bound plan's PDL launch (the full path's counted through _kernel)
        return pdl(*a)

    def counting_graph(self, stream):
        count[0] += len(self._nodes)
        return graph_launch(self, stream)

    bound_call = cb._Bound.__call__ if hasattr(cb, "_Bound") else None

    def counting_bound(self, ptrs):
        in_bound[0] = True
        try:
            return bound_call(self, ptrs)
        finally:
            in_bound[0] = False

    patches = [(cb, "_kernel", counting)]  # (owner, attribute, counting stand-in), undone after fn()
    if real_launch is not None:
        patches.append((cb, "_launch_kernel", counting_launch))
    if pdl is not None:
        patches.append((cb, "_launch_pdl", counting_pdl))
    if graph_launch is not None:
        patches.append((graph_class, "launch", counting_graph))
    if bound_call is not None:
        patches.append((cb._Bound, "__call__", counting_bound))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, stand_in in patches:
        setattr(owner, name, stand_in)
    try:
        fn()
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return count[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=15, help="trials per measurement (median reported)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--calls-only", action="store_true",
                    help="only the host time per call (works on any version of the library: a baseline)")
    ap.add_argument("--cprofile", action="store_true", help="also profile many calls with cProfile")
    ap.add_argument("--calls", type=int, default=300, help="calls profiled with --cprofile")
    ap.add_argument("--top", type=int, default=40, help="functions listed per cProfile table")
    ap.add_argument("--out", default=None, help="directory for host_profile.txt and host_profile.json")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("bench/host_profile.py: no usable CUDA GPU on this machine (nothing to measure)")
        return 0
    import cupy

    import hisa_cupy
    from hisa_cupy import adapters as ad
    from hisa_cupy import select as sel
    from hisa_cupy import _validation as v
    from hisa_cupy.kernels import cupy_backend as cb
    from hisa_cupy.workloads import make_workload

    S, T, B, M, K = args.seq_len, args.queries, 128, 64, 2048
    w = make_workload("segments", seq_len=S, num_queries=T, seed=0)
    q = device_tensor(w.q.view("uint8"), torch.float8_e4m3fn)
    k = device_tensor(w.k.view("uint8"), torch.float8_e4m3fn)
    wt, ksc, ks, ke = (device_tensor(x) for x in (w.weights, w.k_scale, w.ks, w.ke))
    sync = torch.cuda.synchronize
    trials = args.trials

    def call():
        return hisa_cupy.hisa_select(q, k, wt, k_scale=ksc, ks=ks, ke=ke, block_size=B, block_topk=M, topk=K,
                                     backend="cupy", validate=False)

    for _ in range(10):  # compile, size the workspace, build the launch plans
        call()
    sync()
    launches = _count_launches(cb, call)
    n_calls = reps_for(launches, cap=200)
    lines = [f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CuPy {cupy.__version__}, "
             f"commit {os.environ.get('HISA_COMMIT', '?')}",
             f"hisa_select fp8 S={S} T={T} B={B} m={M} k={K}, torch CUDA inputs, validate=False: "
             f"{launches} kernel launches per call; {n_calls} calls per trial, {trials} trials"]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cupy": cupy.__version__,
              "commit": os.environ.get("HISA_COMMIT"), "S": S, "T": T, "launches_per_call": launches}

    # 1. host time per call
    def busy_us(fn):
        out = []
        for _ in range(trials):
            sync()
            torch.cuda._sleep(int(2e8))  # the GPU is busy for the whole trial: launches only queue
            t0 = time.perf_counter()
            for _ in range(n_calls):
                fn()
            out.append((time.perf_counter() - t0) / n_calls * 1e6)
        sync()
        return statistics.median(out), min(out)

    med, mn = per_call_us(call, reps=n_calls, trials=trials, sync=sync)
    bmed, bmn = busy_us(call)
    has_cache = hasattr(sel, "FAST_PATH") and hasattr(cb, "_Bound")
    lines.append(f"host time per call: {med:.1f} us median, {mn:.1f} min (GPU idle at trial start); "
                 f"{bmed:.1f} median, {bmn:.1f} min (queued behind a sleep)"
                 + (" -- repeated calls: the call cache (fast path)" if has_cache else ""))
    result.update(call_median_us=med, call_min_us=mn, call_busy_median_us=bmed, call_busy_min_us=bmn)
    if has_cache:
        sel.FAST_PATH = False
        try:
            fmed, fmn = per_call_us(call, reps=n_calls, trials=trials, sync=sync)
            fbmed, _ = busy_us(call)
        finally:
            sel.FAST_PATH = True
        lines.append(f"full path per call (select.FAST_PATH = False; what the first call of a signature runs): "
                     f"{fmed:.1f} us median, {fmn:.1f} min; {fbmed:.1f} median (queued behind a sleep)")
        result.update(full_path_median_us=fmed, full_path_min_us=fmn, full_path_busy_median_us=fbmed)

    if args.calls_only:
        print("\n".join(lines))
        return 0

    rows = []

    def phase(name, fn, note="", launches=None):
        n = _count_launches(cb, fn) if launches is None else launches
        m_, mn_ = per_call_us(fn, reps=reps_for(n), trials=trials, sync=sync if n else None)
        rows.append((name, m_, mn_, n, note))
        return m_

    def without(module, attr, stand_in, launches_left, fn=call):
        old = getattr(module, attr)
        setattr(module, attr, stand_in)
        try:
            return per_call_us(fn, reps=reps_for(launches_left, cap=200), trials=trials, sync=sync)[0]
        finally:
            setattr(module, attr, old)

    # 2. breakdown of the fast path (a call served from the call cache)
    if has_cache:
        arrays = (q, k, wt, ksc, ks, ke, None)
        ints, strs = (B, M, K), ("bfloat16", "relative", "position", "cupy")
        key, ptrs, stream = sel._call_key("hisa", arrays, ints, strs, None)
        entry = sel._calls.get(key)
        if entry is None or entry is sel._UNCOVERED:
            lines.append("fast path: this call is not in the call cache (nothing bound for it)")
        else:
            fast = {}
            fast["key"] = phase("call key (adapters.call_signature + key)",
                                lambda: sel._call_key("hisa", arrays, ints, strs, None))
            phase("  adapters.call_signature (7 arrays)", lambda: ad.call_signature(arrays),
                  "type, dtype, shape, contiguity, device, data_ptr; stream")
            fast["lookup"] = phase("cache look-up (select._calls)", lambda: sel._calls.get(key))
            fast["out"] = phase("output allocation (adapters.result_allocator)", entry.make,
                                "torch.empty, shape / dtype / device resolved once")
            res, ptrs[-1] = entry.make()
            bound = entry.bound
            assert bound(ptrs), "the bound plan declined the call it was made for"
            fast["launch"] = phase(f"bound launches ({bound.launches}, cupy_backend._Bound)", lambda: bound(ptrs),
                                   "checks, address slots, one graph launch (or cuLaunchKernel each)")
            launch = cb._launch_kernel or cb._driver_launch()
            f, grid, block, smem, params = bound.records()[0]
            phase("  one cuLaunchKernel, bound parameter buffer", lambda: launch(
                f, *grid, *block, smem, stream, params, 0), launches=1,
                note="the pool kernel; compare 'one launch ... prebuilt arguments' below")
            fast_full, _ = per_call_us(call, reps=n_calls, trials=trials, sync=sync)
            rows.append(("unattributed (full call - top-level phases)", fast_full - sum(fast.values()),
                         float("nan"), 0, "hisa_select's own frame, the entry's, phases colder inside a call"))
            lines.append("fast path breakdown (a repeated call; top-level phases unindented, indented rows are "
                         "parts of the row above or for comparison):")
            lines.append(format_rows(rows, total_us=fast_full))
            situ = [("output allocation", without(entry, "make", lambda: (res, ptrs[-1]), launches)),
                    ("bound launches (checks + graph launch)",
                     without(entry, "bound", lambda p: True, 0))]
            lines.append("in situ (full call minus the call with that phase replaced by a cached result / no-op):")
            for name, t in situ:
                lines.append(f"  {name:<52} {fast_full - t:>10.2f}")
            result["fast_breakdown"] = [dict(phase=r[0].strip(), median_us=r[1], min_us=r[2], launches=r[3],
                                             note=r[4]) for r in rows]
            result["fast_in_situ_us"] = {name: fast_full - t for name, t in situ}
            result["fast_full_call_us"] = fast_full
            rows = []

    # 3. breakdown of the full path (the first call of a signature; every call with FAST_PATH False)
    if has_cache:
        sel.FAST_PATH = False
    try:
        parts = {}
        parts["params"] = phase("parameter checks (selection_params, choices)", lambda: (
            v.selection_params(block_size=B, block_topk=M, topk=K),
            v.choice("bfloat16", "pool_dtype", v.POOL_DTYPES),
            v.choice("relative", "index_base", v.INDEX_BASES), v.choice("position", "order", v.ORDERS)))
        for name, x in (("q", q), ("k", k), ("weights", wt), ("k_scale", ksc), ("ks", ks), ("ke", ke)):
            phase(f"  import {name} (adapters.import_array)", lambda x=x, name=name: ad.import_array(x, name=name))
        parts["inputs"] = phase("inputs: 6 imports + metadata checks (_Inputs)",
                                lambda: sel._Inputs(q, k, wt, ksc, ks, ke, None))
        inp = sel._Inputs(q, k, wt, ksc, ks, ke, None)
        tensors, names = inp.tensors() + [None], sel._NAMES + ["out"]
        parts["exec"] = phase("device check, stream, backend (_Exec)", lambda: sel._Exec("cupy", tensors, names))
        ex = sel._Exec("cupy", tensors, names)

        def scope():
            with ex.scope():
                pass

        parts["scope"] = phase("device / stream scope, enter + exit", scope)
        parts["out"] = phase("output allocation (adapters.allocate_result)",
                             lambda: ad.allocate_result((T, K), dtype="int32", like=inp.q), "torch.empty + CuPy view")
        with ex.scope():
            a = [ex.arg(t) for t in inp.tensors()]
            out = ad.allocate_result((T, K), dtype="int32", like=inp.q)
            stream = ex.stream
            kw = dict(block_size=B, block_topk=M, topk=K, pool_dtype="bfloat16", index_base="relative",
                      order="position")
            parts["backend"] = phase("backend: hisa_select (all stages)",
                                     lambda: cb.hisa_select(*a, out=out.data, stream=stream, **kw))
            ws = cb.workspace(stream)
            nb = -(-S // B)
            pooled = ws.get("pooled", (nb, a[1].shape[1]), np.uint16)
            blocks = ws.get("blocks", (T, M), np.int32)
            phase("  backend: pool_keys", lambda: cb.pool_keys(a[1], a[3], block_size=B, pool_dtype="bfloat16",
                                                               stream=stream, out=pooled))
            phase("  backend: select_blocks (scores + top-m)", lambda: cb.select_blocks(
                a[0], pooled, a[2], None, a[4], a[5], seq_len=S, block_size=B, block_topk=M, out=blocks,
                stream=stream))
            phase("  backend: refine (scores + top-k)", lambda: cb.refine(
                a[0], a[1], a[2], a[3], blocks, a[4], a[5], block_size=B, topk=K, index_base="relative",
                order="position", out=out.data, stream=stream, blocks_from_select=True))
            keys = ws.get("block_keys", (T, nb), np.uint32)
            try:
                phase("  _launch_select (block top-m, 1 launch)", lambda: cb._launch_select(
                    "block_select.cu", "block_topm_kernel", rows=T, keys=keys, ld=nb, ncols=nb, k=M, T=T, S=S,
                    out_idx=blocks, out_ld=M,  # warp mode: no records, no early trigger, no epoch
                    extra=(None, 0, 0, None) if cb._block_topm_warp(nb) else ()))
            except (TypeError, ValueError) as e:  # its signature changed (ValueError: _check_arity)
                rows.append(("  _launch_select (block top-m, 1 launch)", float("nan"), float("nan"), 1,
                             str(e)[:40]))
            fn = cb._kernel("pool.cu", f"pool_kernel<{cb._dt_code(a[1])}, 1, {cb.POOL_BATCH}>", 0)
            pre = (cb._ptr(a[1]), cb._ptr(a[3]), cb._i32(S), cb._i32(a[1].shape[1]), cb._i32(B), cb._ptr(pooled),
                   cb._ptr(None))
            grid, block = (nb,), (max(32, a[1].shape[1]),)
            phase("  one launch (pool kernel), prebuilt arguments", lambda: fn(grid, block, pre), launches=1)
            phase("  one launch, arguments built (cupy_backend helpers)", lambda: fn(grid, block, (
                cb._ptr(a[1]), cb._ptr(a[3]), cb._i32(S), cb._i32(a[1].shape[1]), cb._i32(B), cb._ptr(pooled),
                cb._ptr(None))), launches=1)
            phase("  one launch, NumPy scalar arguments (before)", lambda: fn(grid, block, (
                np.uint64(a[1].data.ptr), np.uint64(a[3].data.ptr), np.int32(S), np.int32(a[1].shape[1]),
                np.int32(B), np.uint64(pooled.data.ptr), np.uint64(0))), launches=1)
            ex._native = [out]  # as ex.output leaves it in a call
            parts["finish"] = phase("finish: hand the output back", lambda: ex.finish(out.data, "int32"),
                                    "the torch tensor itself: no export")
            legacy = cupy.empty((T, K), dtype=np.int32)
            phase("  for comparison: export_array of a CuPy result", lambda: ad.export_array(
                legacy, dtype="int32", like=inp.q), "torch.from_dlpack (the path before allocate_result)")
        full, _ = per_call_us(call, reps=n_calls, trials=trials, sync=sync)
        attributed = sum(parts.values())
        rows.append(("unattributed (full call - top-level phases)", full - attributed, float("nan"), 0,
                     "glue, and phases running colder inside a call"))
        title = "full path breakdown (the first call of a signature" + (
            ", timed with select.FAST_PATH = False" if has_cache else "") + \
            "; top-level phases unindented, indented rows are parts of the row above):"
        lines.append(title)
        lines.append(format_rows(rows, total_us=full))

        # in situ: the full call minus the same call with one phase replaced by its cached result
        cached_out = ad.allocate_result((T, K), dtype="int32", like=inp.q)
        situ = [("inputs (_Inputs)", without(sel, "_Inputs", lambda *a, **kw: inp, launches)),
                ("output allocation", without(ad, "allocate_result", lambda *a, **kw: cached_out, launches)),
                ("backend (all stages and launches)", without(cb, "hisa_select", lambda *a, out=None, **kw: out, 0))]
        lines.append("in situ (full call minus the call with that phase replaced by a cached result / no-op):")
        for name, t in situ:
            lines.append(f"  {name:<52} {full - t:>10.2f}")
        result["breakdown"] = [dict(phase=r[0].strip(), median_us=r[1], min_us=r[2], launches=r[3], note=r[4])
                               for r in rows]
        result["in_situ_us"] = {name: full - t for name, t in situ}
        result["full_call_us"] = full
    finally:
        if has_cache:
            sel.FAST_PATH = True

    if args.cprofile:
        prof = cProfile.Profile()
        n = max(1, min(args.calls, MAX_QUEUED_LAUNCHES // max(1, launches)))
        for start in range(0, args.calls, n):
            sync()
            prof.enable()
            for _ in range(min(n, args.calls - start)):
                call()
            prof.disable()
        sync()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
            lines.append(f"--- cProfile by {key} ({args.calls} calls) ---\n" + s.getvalue())
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_profile.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "host_profile.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
