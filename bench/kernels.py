#!/usr/bin/env python
"""Latency benchmark of the HISA indexer (DESIGN.md protocol) and the issue-5 speed targets.

Grid (the default): fp8 q and k as torch CUDA tensors (torch.float8_e4m3fn) with a per-token
k_scale and fp32 weights, H = 64, D = 128, B = 128, k = 2048, T in {1024, 4096} query rows at the
end of one causal context of S in {8K, 16K, 32K, 64K, 128K} keys, m = 64 (fixed 8K-token budget)
and m = S / (4B) (4:1, at least k / B). Data: ``random`` and ``segments`` from
hisa_cupy.workloads, never zeros.

Measured per configuration and backend (cupy; numba at small sizes only, it is much slower):
  * the HISA stages through the public stage functions (pool_keys, select_blocks, refine) and
    hisa_select end to end; dense_select; a torch reference (chunked torch.einsum in bf16,
    relu * weights head reduction as a batched matmul, torch.topk);
  * IoU of hisa vs dense (and of the torch reference vs dense, a sanity check);
  * peak extra device memory of one call (CuPy memory-pool growth after dropping the cached
    workspace + torch.cuda.max_memory_allocated growth).
Timing: CUDA events around each call on the current torch stream, clocks spun up and warm-up
calls first (NVRTC / JIT compilation excluded), L2 flushed before every timed call by writing a
256 MB buffer, median of ``--reps`` >= 20 runs. Every call uses ``validate=False`` (no host
synchronisation inside). Each row holds the GPU time (``median_ms``: the call's launches are
queued behind a ``torch.cuda._sleep`` so that host overhead is hidden) and the wall time a caller
that launches and waits sees (``wall_median_ms``); see ``Timer``.

``--targets`` also measures the issue-5 targets (hisa at 128K/4096, 128K/1024, 32K/4096 with
m = 64; hisa faster than dense at every S >= 16K; dense at 128K/4096 and its score-stage
TFLOP/s from a kernel profile; hisa_cupy.topk vs torch.topk; host overhead of one call; peak
workspace) and writes a targets table with the measured value and pass/fail. Informational rows
beside targets 1 and 3: the f16 and fp8 tensor-core rates torch reaches on this GPU, each target's
scoring FLOPs at the f16 rate (the floor of exact scoring, see ``floor_rows``) and the share of
that rate its goal asks for end to end.
``--targets-only`` skips the grid.

Outputs go to ``--out`` (default bench/results/): ``<gpu-slug>_<date>.json`` (all rows and the
run's metadata), ``.md`` (the tables, also printed last) and ``.png`` (latency vs context, log
scale). Without a CUDA GPU the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
H, D, B, K = 64, 128, 128, 2048
FULL_S = (8192, 16384, 32768, 65536, 131072)
FULL_T = (1024, 4096)
QUICK_S = (8192, 32768)
QUICK_T = (1024,)
FLUSH_BYTES = 256 << 20

# issue 5 targets (milliseconds unless said otherwise)
TARGET_HISA = [(131072, 4096, 1.0), (131072, 1024, 0.35), (32768, 4096, 0.8)]
TARGET_DENSE_MS = 14.0
TARGET_DENSE_TFLOPS = 600.0
TARGET_TOPK = [((4096, 8192), 0.1), ((64, 131072), 0.05)]
TARGET_TOPK_SPEEDUP = 5.0
TARGET_HOST_US = 60.0
WORKSPACE_SLACK = 64 << 20


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------
def cuda_ok():
    try:
        import torch
    except Exception as exc:
        return False, f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "CuPy sees no CUDA device"
    except Exception as exc:
        return False, f"CuPy cannot use the GPU ({type(exc).__name__}: {exc})"
    return True, torch.cuda.get_device_name(0)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def source_commit(root):
    """The commit of the code under ``root`` as git sees it, or None where git cannot say.

    HISA_COMMIT (the caller's word) comes first in the run's metadata, because git's answer can be
    wrong on the device machine: its copy of the tree may carry a stale .git (a run there once
    reported the previous session's commit), and a snapshot under .snap/ has no .git of its own,
    so git would answer for the repository around it. Hence None unless ``root`` is the top of
    its own repository, and "+modified" when tracked files differ from that commit (a stale .git
    under a newer tree shows up that way)."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, text=True, capture_output=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return None
        head = git("rev-parse", "--short", "HEAD").stdout.strip()
        if not head:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head + ("+modified" if dirty else "")
    except Exception:
        return None


def run_meta(args):
    import cupy
    import torch

    import hisa_cupy

    props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("HISA_COMMIT") or source_commit(ROOT)
    return dict(
        gpu=torch.cuda.get_device_name(0), sm=f"sm_{props.major}{props.minor}",
        sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
        date=datetime.date.today().isoformat(), time=datetime.datetime.now().isoformat(timespec="seconds"),
        hisa_cupy=hisa_cupy.__version__, commit=commit, torch=torch.__version__,
        cupy=cupy.__version__, cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
        driver=cupy.cuda.runtime.driverGetVersion(), python=platform.python_version(),
        H=H, D=D, B=B, k=K, dtype="float8_e4m3fn", reps=args.reps, flush=args.flush,
        argv=sys.argv[1:],
    )


# ------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------
class Timer:
    """CUDA-event timing on the current torch stream with an L2 flush before every run.

    Two numbers per measurement, both medians over ``reps`` runs:

    * ``median_ms`` -- GPU time: before each run a ``torch.cuda._sleep`` is queued that lasts
      longer than the host needs to launch the call, so every kernel of the call is already
      queued when the start event fires and the events time the device work alone (launch gaps
      inside the call included, host overhead hidden). This is the kernel speed the targets are
      about; the host side is measured separately (target 5).
    * ``wall_median_ms`` -- what a caller that launches and waits sees: events around the call
      with nothing queued ahead, so a host overhead larger than the GPU time shows up here.
    """

    def __init__(self, reps: int, warmup: int, flush: str):
        import torch

        self.torch = torch
        self.reps = reps
        self.warmup = warmup
        self.flush_mode = flush
        self.buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush != "none" else None
        self._spin_up()
        self.cycles_per_ms = self._calibrate_sleep()

    def _spin_up(self, seconds=1.0):
        """Run matrix products for about a second so the clocks are up before the first number."""
        torch = self.torch
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()

    def _calibrate_sleep(self) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def flush(self):
        if self.flush_mode == "write":
            self.buf.zero_()
        elif self.flush_mode == "read":
            self.buf.view(self.torch.int64).sum()

    @staticmethod
    def _stats(times, prefix=""):
        times = sorted(times)
        return {f"{prefix}median_ms": statistics.median(times), f"{prefix}p10_ms": times[len(times) // 10],
                f"{prefix}p90_ms": times[min(len(times) - 1, (9 * len(times)) // 10)]}

    def _run(self, fn, reps, sleep_cycles):
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            self.flush()
            starts[i].record()
            fn()
            ends[i].record()
            if sleep_cycles:
                torch.cuda.synchronize()  # keep the next sleep from piling up behind this run
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def __call__(self, fn, reps=None):
        torch = self.torch
        reps = reps or self.reps
        host = []
        for _ in range(self.warmup):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        # Sleep for 3x the host launch time (plus 0.5 ms), so that the launches finish first.
        host_ms = min(host) * 1e3 if host else 1.0
        sleep_cycles = int((3.0 * host_ms + 0.5) * self.cycles_per_ms)
        out = self._stats(self._run(fn, reps, sleep_cycles))
        out.update(self._stats(self._run(fn, reps, 0), "wall_"))
        out.update(reps=reps, host_launch_ms=host_ms)
        return out


def peak_extra_bytes(fn):
    """Device memory one cold call needs beyond its inputs: CuPy pool growth (after dropping the
    backend's cached workspace) plus torch caching-allocator peak growth."""
    import cupy
    import torch

    try:
        from hisa_cupy.kernels import cupy_backend

        cupy_backend.release_workspace()
    except Exception:
        pass
    torch.cuda.synchronize()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    cupy_before = pool.total_bytes()
    torch.cuda.reset_peak_memory_stats()
    torch_before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = (pool.total_bytes() - cupy_before) + (torch.cuda.max_memory_allocated() - torch_before)
    del result
    return int(extra)


def iou_gpu(a, b) -> float:
    """Mean per-row IoU of two [T, k] int32 index tensors (-1 padding, unique per row)."""
    import torch

    a = a.long()
    b = b.long()
    cat = torch.cat([a, b], dim=1)
    # Give padding entries distinct negative values so that they never pair up.
    pad = -1 - torch.arange(cat.shape[1], device=cat.device).expand_as(cat)
    cat = torch.where(cat >= 0, cat, pad)
    s, _ = torch.sort(cat, dim=1)
    inter = ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).sum(dim=1).double()
    union = (a >= 0).sum(dim=1).double() + (b >= 0).sum(dim=1).double() - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.mean())


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
class Inputs:
    """One workload on the GPU as torch tensors (fp8 via torch.float8_e4m3fn)."""

    def __init__(self, wl):
        from hisa_cupy.testing import to_torch

        self.S, self.T = wl.seq_len, wl.num_queries
        self.q, self.k, self.w, self.k_scale, self.ks, self.ke = (
            to_torch(x) for x in (wl.q, wl.k, wl.weights, wl.k_scale, wl.ks, wl.ke))
        self.ke_host = wl.ke.astype(np.int64)
        self.kind = wl.kind

    def rows(self, T):
        """The last T query rows (still the last T positions of the same causal sequence)."""
        sub = Inputs.__new__(Inputs)
        sub.__dict__.update(self.__dict__)
        lo = self.T - T
        sub.T = T
        sub.q, sub.w, sub.ks, sub.ke = self.q[lo:], self.w[lo:], self.ks[lo:], self.ke[lo:]
        sub.ke_host = self.ke_host[lo:]
        return sub

    def causal_pairs(self):
        return int(np.sum(self.ke_host))  # ks = 0

    def hisa_pairs(self, m):
        """(block-stage, token-stage) scored pairs of hisa_select with block_topk m: every eligible
        block of each row (its pooled key), then m blocks of B candidates (all eligible blocks where
        fewer); the counts of bench/NOTES.md's floor table."""
        eligible = -(-self.ke_host // B)  # ks = 0
        return int(np.sum(eligible)), int(np.sum(np.minimum(m, eligible) * B))


def block_topk_values(S):
    return sorted({64, max(S // (4 * B), K // B)})


def torch_reference(inp, topk=K, budget_bytes=2 << 30):
    """Dense DSA top-k the plain torch way: bf16 einsum logits in row chunks (keys up to the
    chunk's last visible position), relu, weighted head sum as a batched matmul, k_scale,
    causal mask, torch.topk. Returns int32 [T, topk] positions, -1 where fewer are visible."""
    import torch

    q, k, w, ksc = inp.q, inp.k, inp.w, inp.k_scale
    T, S = inp.T, inp.S
    kb = k.to(torch.bfloat16)
    out = torch.empty((T, topk), dtype=torch.int32, device=q.device)
    rows = max(1, budget_bytes // (H * S * 2))
    pos = torch.arange(S, device=q.device)
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        smax = int(inp.ke_host[t1 - 1])
        logits = torch.einsum("thd,sd->ths", q[t0:t1].to(torch.bfloat16), kb[:smax])
        logits.relu_()
        scores = torch.bmm(w[t0:t1].to(torch.bfloat16).unsqueeze(1), logits).squeeze(1).float()
        scores *= ksc[:smax]
        scores.masked_fill_(pos[:smax][None, :] >= inp.ke[t0:t1, None], float("-inf"))
        kk = min(topk, smax)
        vals, idx = torch.topk(scores, kk, dim=1)
        idx = idx.int().masked_fill_(vals == float("-inf"), -1)
        out[t0:t1, :kk] = idx
        out[t0:t1, kk:] = -1
    return out


# ------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------
def measure(rows, timer, base, op, fn, *, memory=True, reps=None, after=None):
    """Time ``fn`` and append one row. ``after(result)`` (optional) returns extra fields computed
    from one more call's result (IoU, ...). Failures become rows with an ``error`` field."""
    row = dict(base, op=op)
    result = None
    try:
        row.update(timer(fn, reps))
        if memory:
            row["peak_extra_bytes"] = peak_extra_bytes(fn)
        result = fn()
        if after is not None:
            row.update(after(result))
    except Exception as exc:  # keep going: one missing feature must not kill the run
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  {op} {base}: {row['error']}")
        result = None
    rows.append(row)
    if "median_ms" in row:
        log(f"  {base['kind']:8s} S={base['S']:6d} T={base['T']:4d} m={base.get('m', '-')!s:>3s} "
            f"{base['backend']:5s} {op:15s} {row['median_ms']:9.3f} ms")
    return result


def run_grid(args, timer, rows):
    import torch

    import hisa_cupy
    from hisa_cupy.workloads import make_workload

    seq_lens = args.seq_lens or (QUICK_S if args.quick else FULL_S)
    queries = args.queries or (QUICK_T if args.quick else FULL_T)
    for kind in args.kinds:
        for S in seq_lens:
            t0 = time.perf_counter()
            wl = make_workload(kind, seq_len=S, num_queries=max(queries), seed=args.seed)
            full = Inputs(wl)
            del wl
            log(f"[{kind} S={S}] workload built and copied in {time.perf_counter() - t0:.1f} s")
            for T in queries:
                inp = full.rows(T)
                measure_config(args, timer, rows, hisa_cupy, kind, S, T, inp)
                torch.cuda.empty_cache()
            del full
            torch.cuda.empty_cache()


def measure_config(args, timer, rows, hisa_cupy, kind, S, T, inp):
    """Every row of one (data, S, T): per backend dense, then per m the HISA stages and end to
    end; then the torch reference."""
    common = dict(k_scale=inp.k_scale, ks=inp.ks, ke=inp.ke, validate=False)
    dense_ref = None  # the cupy backend's dense selection, for IoUs
    for backend in args.backends:
        if backend == "numba" and (S > args.numba_max_seq or T > args.numba_max_queries):
            continue
        reps = args.reps if backend == "cupy" else max(5, args.numba_reps)
        on_cupy = backend == "cupy"
        base = dict(kind=kind, S=S, T=T, backend=backend)

        def dense_fn(backend=backend):
            return hisa_cupy.dense_select(inp.q, inp.k, inp.w, topk=K, backend=backend, **common)

        dense = measure(rows, timer, base, "dense_select", dense_fn, reps=reps, memory=on_cupy)
        if on_cupy:
            dense_ref = dense
        for m in block_topk_values(S):
            bm = dict(base, m=m)

            def hisa_fn(m=m, backend=backend):
                return hisa_cupy.hisa_select(inp.q, inp.k, inp.w, block_size=B, block_topk=m, topk=K,
                                             backend=backend, **common)

            def quality(idx):
                return {} if dense_ref is None else {"iou_vs_dense": iou_gpu(idx, dense_ref)}

            measure(rows, timer, bm, "hisa_select", hisa_fn, reps=reps, memory=on_cupy, after=quality)

            def pool_fn(backend=backend):
                return hisa_cupy.pool_keys(inp.k, k_scale=inp.k_scale, block_size=B, pool_dtype="bfloat16",
                                           backend=backend, validate=False)

            pooled = measure(rows, timer, bm, "pool_keys", pool_fn, reps=reps, memory=False)
            if pooled is None:
                continue

            def select_fn(m=m, backend=backend, pooled=pooled):
                return hisa_cupy.select_blocks(inp.q, pooled[0], inp.w, pooled_scale=pooled[1], ks=inp.ks,
                                               ke=inp.ke, block_size=B, block_topk=m, seq_len=S,
                                               backend=backend, validate=False)

            blocks = measure(rows, timer, bm, "select_blocks", select_fn, reps=reps, memory=False)
            if blocks is None:
                continue

            def refine_fn(backend=backend, blocks=blocks):
                return hisa_cupy.refine(inp.q, inp.k, inp.w, blocks, k_scale=inp.k_scale, ks=inp.ks, ke=inp.ke,
                                        block_size=B, topk=K, backend=backend, validate=False)

            measure(rows, timer, bm, "refine", refine_fn, reps=reps, memory=False)
    if not args.no_torch_ref:
        measure(rows, timer, dict(kind=kind, S=S, T=T, backend="torch"), "torch_reference",
                lambda: torch_reference(inp),
                after=lambda idx: {} if dense_ref is None else {"iou_vs_dense": iou_gpu(idx, dense_ref)})


# ------------------------------------------------------------------------------------------
# issue-5 targets
# ------------------------------------------------------------------------------------------
def profile_kernels(fn, calls=3):
    """Per-kernel device time (us per call) of ``fn`` from the torch profiler (CUPTI sees the
    kernels CuPy launches too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and ev.key:
            kernels[ev.key] = kernels.get(ev.key, 0.0) + float(t) / calls
    return kernels


def tensor_core_tflops(kind, n=8192, reps=10):
    """The best matrix-product rate torch reaches on this GPU, TFLOP/s (median of ``reps`` [n x n] @
    [n x n] products timed with CUDA events): ``kind`` "f16" (torch.matmul, fp32 accumulation: the
    engine exact scoring runs on) or "fp8" (torch._scaled_mm on e4m3, for comparison only: the fp8
    tensor cores' ~22-bit accumulation misses SPEC §9's tolerance)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    if kind == "f16":
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    elif kind == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        raise ValueError(f"kind must be 'f16' or 'fp8', got {kind!r}")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2.0 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def host_overhead_us(fn, calls=50, trials=7, busy=True):
    """Host time of one call with the GPU busy (a queued torch.cuda._sleep), so that the host
    never waits for the device: median over trials of (wall time of ``calls`` calls) / calls.
    ``busy=False`` (for calls that synchronise anyway) skips the sleep."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(trials):
        if busy:
            torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time at ~2 GHz: the queue never drains
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        per_call.append((t1 - t0) / calls * 1e6)
    return statistics.median(per_call), per_call


def rate_rows(target, rates, tid):
    """Informational target rows: the tensor-core rates measured on this GPU."""
    target(tid, "f16 tensor-core rate, torch.matmul [8192 x 8192]^2 (informational: the engine of exact "
           "scoring)", "this GPU", rates.get("f16"), "-", None, "TFLOP/s")
    target(tid, "fp8 tensor-core rate, torch._scaled_mm (informational: its ~22-bit accumulation misses "
           "SPEC §9's tolerance)", "this GPU", rates.get("fp8"), "-", None, "TFLOP/s")


def floor_rows(target, rates, tid, config, flops, goal_ms):
    """Informational target rows: the time of ``flops`` at the measured f16 rate (the floor of exact
    scoring: nothing else counted, nothing overlapped) and the share of that rate which the goal
    asks for end to end."""
    rate = rates.get("f16")
    floor = None if not rate else flops / (rate * 1e12) * 1e3
    share = None if not rate else 100.0 * flops / (goal_ms * 1e-3) / (rate * 1e12)
    target(tid, "scoring FLOPs at the measured f16 rate (informational: the exact-scoring floor)", config,
           floor, "-", None, "ms", flops=flops, f16_tflops=rate)
    target(tid, f"share of the measured f16 rate that {goal_ms} ms asks for end to end (informational)", config,
           share, "-", None, "%")


def run_targets(args, timer, rows):
    import torch

    import hisa_cupy
    from hisa_cupy.workloads import make_workload

    targets = []

    def target(tid, name, config, measured, goal, passed, unit, **more):
        targets.append(dict(id=tid, target=name, config=config, measured=measured, goal=goal,
                            unit=unit, passed=passed, **more))
        status = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        value = "–" if measured is None else f"{measured:.4g} {unit}"
        log(f"  target {tid}: {name} [{config}] = {value} (goal {goal}) {status}")

    kind = args.kinds[0]
    cache = {}

    def inputs(S, T):
        key = S
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[key] = Inputs(make_workload(kind, seq_len=S, num_queries=4096, seed=args.seed))
        return cache[key].rows(T)

    def hisa_fn(inp, m=64):
        return lambda: hisa_cupy.hisa_select(inp.q, inp.k, inp.w, k_scale=inp.k_scale, ks=inp.ks, ke=inp.ke,
                                             block_size=B, block_topk=m, topk=K, backend="cupy", validate=False)

    def dense_fn(inp):
        return lambda: hisa_cupy.dense_select(inp.q, inp.k, inp.w, k_scale=inp.k_scale, ks=inp.ks, ke=inp.ke,
                                              topk=K, backend="cupy", validate=False)

    walls = {}

    def timed(tag, fn):
        try:
            res = timer(fn)
            walls[tag] = res["wall_median_ms"]
            return res["median_ms"]
        except Exception as exc:
            log(f"  {tag}: {type(exc).__name__}: {exc}")
            return None

    # 5 is measured first: target 3 runs torch.profiler, and CUPTI stays attached to the process
    # after it (Kineto does not finalize it), which slows every later kernel launch by several
    # microseconds (pytorch/pytorch#144455). The rows are reported in their place below.
    inp = inputs(8192, 1024)
    host = {}
    try:
        host["busy"] = host_overhead_us(hisa_fn(inp))
        fn_v = lambda: hisa_cupy.hisa_select(inp.q, inp.k, inp.w, k_scale=inp.k_scale, ks=inp.ks,  # noqa: E731
                                             ke=inp.ke, block_size=B, block_topk=64, topk=K, backend="cupy")
        host["validate"] = host_overhead_us(fn_v, calls=20, trials=3, busy=False)
    except Exception as exc:
        log(f"  host overhead: {type(exc).__name__}: {exc}")

    # the tensor-core rates of this GPU, for the exact-scoring floors of targets 1 and 3
    rates = {}
    for kind_ in ("f16", "fp8"):
        try:
            rates[kind_] = tensor_core_tflops(kind_)
        except Exception as exc:
            log(f"  {kind_} tensor-core rate: {type(exc).__name__}: {exc}")

    # 1 + 2: hisa end to end; hisa faster than dense at every S >= 16K
    hisa_ms, dense_ms, pairs = {}, {}, {}
    for S in (16384, 32768, 65536, 131072):
        for T in (1024, 4096):
            inp = inputs(S, T)
            pairs[S, T] = inp.hisa_pairs(64)
            hisa_ms[S, T] = timed(f"hisa S={S} T={T}", hisa_fn(inp))
            dense_ms[S, T] = timed(f"dense S={S} T={T}", dense_fn(inp))
            rows.append(dict(kind=kind, S=S, T=T, m=64, backend="cupy", op="hisa_select", targets=True,
                             median_ms=hisa_ms[S, T]))
            rows.append(dict(kind=kind, S=S, T=T, backend="cupy", op="dense_select", targets=True,
                             median_ms=dense_ms[S, T]))
    for S, T, goal in TARGET_HISA:
        v = hisa_ms.get((S, T))
        target("1", "hisa_select end to end (GPU time)", f"S={S // 1024}K T={T} m=64 fp8 {kind}", v,
               f"<= {goal} ms", None if v is None else v <= goal, "ms",
               wall_ms=walls.get(f"hisa S={S} T={T}"))
    for S, T, goal in TARGET_HISA:
        w = walls.get(f"hisa S={S} T={T}")
        target("1", "hisa_select as a synchronous caller sees it (informational: host overhead included)",
               f"S={S // 1024}K T={T} m=64", w, "-", None, "ms")
    rate_rows(target, rates, "1")
    for S, T, goal in TARGET_HISA:
        blocks, tokens = pairs[S, T]
        floor_rows(target, rates, "1", f"S={S // 1024}K T={T} m=64", (blocks + tokens) * H * D * 2, goal)
    for (S, T), h in sorted(hisa_ms.items()):
        d = dense_ms.get((S, T))
        ok = None if h is None or d is None else h < d
        target("2", "hisa_select faster than dense_select", f"S={S // 1024}K T={T} m=64",
               None if ok is None else d / h, "> 1x", ok, "x", hisa_ms=h, dense_ms=d)

    # 3: dense at 128K/4096, score-stage rate from the kernel profile
    inp = inputs(131072, 4096)
    d = dense_ms.get((131072, 4096))
    target("3", "dense_select end to end", "S=128K T=4096", d, f"<= {TARGET_DENSE_MS} ms",
           None if d is None else d <= TARGET_DENSE_MS, "ms")
    flops = inp.causal_pairs() * H * D * 2
    floor_rows(target, rates, "3", "S=128K T=4096", flops, TARGET_DENSE_MS)
    try:
        kernels = profile_kernels(dense_fn(inp))
        pattern = re.compile(args.score_kernel_regex)
        score_us = sum(t for name, t in kernels.items() if pattern.search(name))
        tflops = flops / (score_us * 1e-6) / 1e12 if score_us > 0 else None
        target("3", "dense score stage TFLOP/s (causal pairs x H x D x 2)", "S=128K T=4096", tflops,
               f">= {TARGET_DENSE_TFLOPS}", None if tflops is None else tflops >= TARGET_DENSE_TFLOPS, "TFLOP/s",
               score_kernel_us=score_us, flops=flops, kernels_us=kernels)
    except Exception as exc:
        log(f"  profiler: {type(exc).__name__}: {exc}")
        lower = flops / (d * 1e-3) / 1e12 if d else None
        target("3", "dense TFLOP/s on the end-to-end time (lower bound of the score stage)", "S=128K T=4096",
               lower, f">= {TARGET_DENSE_TFLOPS}", None if lower is None else (True if lower >= TARGET_DENSE_TFLOPS
                                                                                 else None), "TFLOP/s")

    # 4: exact top-k vs torch.topk
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    for (R, N), goal in TARGET_TOPK:
        scores = torch.randn((R, N), device="cuda", generator=gen)
        ours = timed(f"topk {R}x{N}", lambda x=scores: hisa_cupy.topk(x, K))
        ref = timed(f"torch.topk {R}x{N}", lambda x=scores: torch.topk(x, K, dim=1))
        rows.append(dict(kind="randn", S=N, T=R, backend="cupy", op="topk", targets=True, median_ms=ours))
        rows.append(dict(kind="randn", S=N, T=R, backend="torch", op="torch.topk", targets=True, median_ms=ref))
        target("4", "hisa_cupy.topk k=2048", f"[{R} x {N}] fp32", ours, f"<= {goal} ms",
               None if ours is None else ours <= goal, "ms")
        speed = None if ours is None or ref is None else ref / ours
        target("4", "hisa_cupy.topk speedup vs torch.topk", f"[{R} x {N}] fp32", speed,
               f">= {TARGET_TOPK_SPEEDUP}x", None if speed is None else speed >= TARGET_TOPK_SPEEDUP, "x",
               torch_topk_ms=ref)
        del scores

    # 5: host overhead of one call (measured first, see above)
    if "busy" in host:
        us, trials = host["busy"]
        target("5", "host time per hisa_select call (validate=False, GPU busy)", "S=8K T=1024 m=64", us,
               f"< {TARGET_HOST_US} us", us < TARGET_HOST_US, "us", trials_us=trials,
               note="measured before any profiler use in the process")
    else:
        target("5", "host time per hisa_select call", "S=8K T=1024 m=64", None, f"< {TARGET_HOST_US} us",
               None, "us")
    if "validate" in host:
        target("5", "wall time per call with validate=True (informational: it synchronises, so this "
               "includes the GPU time)", "S=8K T=1024 m=64", host["validate"][0], "-", None, "us")

    # 6: peak workspace of the HISA path within the CuPy-backend bound
    S, T, m = 131072, 4096, 64
    inp = inputs(S, T)
    try:
        peak = peak_extra_bytes(hisa_fn(inp, m))
        bound = T * (S // B + m * B) * 4 + WORKSPACE_SLACK
        target("6", "peak extra device memory of hisa_select", f"S=128K T=4096 m=64 (bound {bound / 2**20:.0f} MiB)",
               peak / 2**20, f"<= {bound / 2**20:.0f} MiB", peak <= bound, "MiB")
    except Exception as exc:
        log(f"  peak memory: {type(exc).__name__}: {exc}")
    target("6", "exactness (bit-exact vs the reference)", "pytest -m gpu", None, "all GPU tests pass", None, "-")
    cache.clear()
    return targets


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def _fmt_ms(v):
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _find(rows, **kw):
    for r in rows:
        if not r.get("targets") and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def markdown(meta, rows, targets):
    lines = [f"# hisa_cupy benchmark: {meta['gpu']} ({meta['sm']}), {meta['date']}", "",
             f"fp8 q/k (torch.float8_e4m3fn) with per-token k_scale, fp32 weights, H={H} D={D} B={B} k={K}; "
             f"CUDA events, clocks spun up and warm-up calls first, L2 flushed ({meta['flush']}) before each run, "
             f"median of "
             f"{meta['reps']} runs; validate=False. hisa_cupy {meta['hisa_cupy']} "
             f"(commit {meta['commit']}), torch {meta['torch']}, CuPy {meta['cupy']}.", ""]
    grid = [r for r in rows if not r.get("targets")]
    keys = sorted({(r["kind"], r["S"], r["T"], r["m"]) for r in grid
                   if r.get("op") == "hisa_select" and r["backend"] == "cupy"})
    if keys:
        lines += ["GPU time in ms (cupy backend; launch overhead hidden behind a queued sleep, see "
                  "bench/kernels.py). *hisa wall* is the same call timed as a caller that launches and waits "
                  "sees it (host overhead included). Speedups are dense / hisa and torch reference / hisa.", "",
                  "| data | S | T | m | hisa_select | hisa wall | pool | select_blocks | refine | dense_select "
                  "| torch ref | vs dense | vs torch | IoU hisa/dense | hisa peak MiB | dense peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, S, T, m in keys:
            g = lambda op, **kw: _find(grid, kind=kind, S=S, T=T, backend=kw.get("backend", "cupy"),  # noqa: E731
                                       op=op, **({"m": m} if kw.get("with_m", True) else {}))
            h, p, s, rf = g("hisa_select"), g("pool_keys"), g("select_blocks"), g("refine")
            dn = g("dense_select", with_m=False)
            tr = g("torch_reference", backend="torch", with_m=False)
            val = lambda r: None if r is None else r.get("median_ms")  # noqa: E731
            hv, dv, tv = val(h), val(dn), val(tr)
            sp = lambda x: "–" if x is None or hv is None else f"{x / hv:.1f}x"  # noqa: E731
            iou = "–" if h is None or "iou_vs_dense" not in h else f"{h['iou_vs_dense']:.3f}"
            mem = lambda r: "–" if r is None or "peak_extra_bytes" not in r else f"{r['peak_extra_bytes'] / 2**20:.0f}"  # noqa: E731
            wall = None if h is None else h.get("wall_median_ms")
            lines.append(f"| {kind} | {S // 1024}K | {T} | {m} | {_fmt_ms(hv)} | {_fmt_ms(wall)} | {_fmt_ms(val(p))} | "
                         f"{_fmt_ms(val(s))} | {_fmt_ms(val(rf))} | {_fmt_ms(dv)} | {_fmt_ms(tv)} | {sp(dv)} | "
                         f"{sp(tv)} | {iou} | {mem(h)} | {mem(dn)} |")
        lines.append("")
    nkeys = sorted({(r["kind"], r["S"], r["T"], r["m"]) for r in grid
                    if r.get("op") == "hisa_select" and r["backend"] == "numba"})
    if nkeys:
        lines += ["Numba backend (ms) against the CuPy backend on the same inputs.", "",
                  "| data | S | T | m | numba hisa | cupy hisa | slower by | numba dense | cupy dense | slower by |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, S, T, m in nkeys:
            nh = _find(grid, kind=kind, S=S, T=T, m=m, backend="numba", op="hisa_select")
            ch = _find(grid, kind=kind, S=S, T=T, m=m, backend="cupy", op="hisa_select")
            nd = _find(grid, kind=kind, S=S, T=T, backend="numba", op="dense_select")
            cd = _find(grid, kind=kind, S=S, T=T, backend="cupy", op="dense_select")
            v = lambda r: None if r is None else r.get("median_ms")  # noqa: E731
            ratio = lambda a, b: "–" if v(a) is None or v(b) is None else f"{v(a) / v(b):.1f}x"  # noqa: E731
            lines.append(f"| {kind} | {S // 1024}K | {T} | {m} | {_fmt_ms(v(nh))} | {_fmt_ms(v(ch))} | "
                         f"{ratio(nh, ch)} | {_fmt_ms(v(nd))} | {_fmt_ms(v(cd))} | {ratio(nd, cd)} |")
        lines.append("")
    if meta.get("interrupted"):
        lines += ["**This run was interrupted: the tables hold only what was measured before.**", ""]
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += [f"{len(errors)} measurement(s) failed; see the `error` fields in the JSON.", ""]
    if targets:
        lines += ["## Issue-5 targets", "", "| # | target | configuration | measured | goal | result |",
                  "|---|---|---|---|---|---|"]
        for t in targets:
            m = t["measured"]
            value = "–" if m is None else (f"{m:.3g} {t['unit']}" if t["unit"] != "-" else "–")
            res = "n/a" if t["passed"] is None else ("**pass**" if t["passed"] else "**FAIL**")
            lines.append(f"| {t['id']} | {t['target']} | {t['config']} | {value} | {t['goal']} | {res} |")
        lines.append("")
    return "\n".join(lines)


def plot(meta, rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as exc:
        log(f"no plot: matplotlib is not available ({exc}); `pip install -e '.[bench]'`")
        return False
    grid = [r for r in rows if not r.get("targets") and r.get("median_ms") is not None]
    Ts = sorted({r["T"] for r in grid})
    if not Ts:
        return False
    kinds = sorted({r["kind"] for r in grid if r["backend"] != "torch"})
    kind = "random" if "random" in kinds else kinds[0]
    fig, axes = plt.subplots(1, len(Ts), figsize=(6.5 * len(Ts), 4.8), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        series = {}
        for r in grid:
            if r["T"] != T or r["kind"] != kind:
                continue
            if r["op"] == "hisa_select":
                S = r["S"]
                label = f"hisa_select {r['backend']} m=" + ("64" if r["m"] == 64 else "S/4B")
                if r["m"] == 64 and max(S // (4 * B), K // B) == 64:
                    series.setdefault(f"hisa_select {r['backend']} m=S/4B", []).append((S, r["median_ms"]))
            elif r["op"] == "dense_select":
                label = f"dense_select {r['backend']}"
            elif r["op"] == "torch_reference":
                label = "torch reference (einsum + topk)"
            else:
                continue
            series.setdefault(label, []).append((r["S"], r["median_ms"]))
        for label, pts in sorted(series.items()):
            pts = sorted(set(pts))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({r["S"] for r in grid}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{int(v) // 1024}K"))
        ax.set_xlabel("context length S (keys)")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"T={T} queries, {kind} data")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"hisa_cupy on {meta['gpu']}, fp8, H={H} D={D} B={B} k={K} ({meta['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def output_stem(out_dir: Path, meta) -> Path:
    stem = out_dir / f"{gpu_slug(meta['gpu'])}_{meta['date']}"
    if any(stem.with_suffix(s).exists() for s in (".json", ".md", ".png")):
        stem = out_dir / f"{stem.name}_{datetime.datetime.now().strftime('%H%M%S')}"
    return stem


# ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the protocol.")
    p.add_argument("--quick", action="store_true", help="small grid: S in {8K, 32K}, T = 1024")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default bench/results)")
    p.add_argument("--kinds", default="random,segments", help="workload kinds, comma separated")
    p.add_argument("--backends", default="cupy,numba", help="backends, comma separated (cupy, numba)")
    p.add_argument("--seq-lens", default=None, help="override S values, comma separated")
    p.add_argument("--queries", default=None, help="override T values, comma separated")
    p.add_argument("--reps", type=int, default=20, help="timed runs per measurement (>= 20 for the protocol)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--flush", choices=("write", "read", "none"), default="write",
                   help="L2 flush before each timed run: write (default) or read a 256 MB buffer")
    p.add_argument("--numba-max-seq", type=int, default=16384, help="largest S measured with numba")
    p.add_argument("--numba-max-queries", type=int, default=1024, help="largest T measured with numba")
    p.add_argument("--numba-reps", type=int, default=5, help="timed runs for numba rows")
    p.add_argument("--no-torch-ref", action="store_true", help="skip the torch reference")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--targets", action="store_true", help="also measure the issue-5 targets")
    p.add_argument("--targets-only", action="store_true", help="only the issue-5 targets, no grid")
    p.add_argument("--score-kernel-regex", default="score",
                   help="kernels counted as the dense score stage in the target-3 profile")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.backends = [b for b in args.backends.split(",") if b]
    from hisa_cupy.workloads import WORKLOAD_KINDS

    for k in args.kinds:
        if k not in WORKLOAD_KINDS:
            p.error(f"--kinds: unknown kind {k!r} (expected {WORKLOAD_KINDS})")
    for b in args.backends:
        if b not in ("cupy", "numba"):
            p.error(f"--backends: unknown backend {b!r} (expected cupy, numba)")
    args.seq_lens = tuple(int(x) for x in args.seq_lens.split(",")) if args.seq_lens else None
    args.queries = tuple(int(x) for x in args.queries.split(",")) if args.queries else None
    if args.reps < 20:
        log(f"note: --reps {args.reps} is below the protocol's 20")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ok, why = cuda_ok()
    if not ok:
        print(f"bench/kernels.py: no usable CUDA GPU ({why}). The benchmark measures the CUDA kernels; "
              "run it on an H100/H200 (`make bench`). Nothing to do here.")
        return 0
    meta = run_meta(args)
    log(f"GPU: {meta['gpu']} ({meta['sm']}, {meta['sms']} SMs)")
    timer = Timer(args.reps, args.warmup, args.flush)
    rows, targets = [], []
    t0 = time.perf_counter()

    def _stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)  # e.g. `timeout`: still write what was measured
    try:
        if not args.targets_only:
            run_grid(args, timer, rows)
        if args.targets or args.targets_only:
            targets = run_targets(args, timer, rows)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): writing the {len(rows)} rows measured so far")
        meta["interrupted"] = True
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args.out, meta)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, targets=targets), f, indent=1, default=float)
    md = markdown(meta, rows, targets)
    stem.with_suffix(".md").write_text(md)
    wrote = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if not args.no_plot and not args.targets_only and plot(meta, rows, stem.with_suffix(".png")):
        wrote.append(stem.with_suffix(".png"))
    log("wrote " + ", ".join(str(p) for p in wrote))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
