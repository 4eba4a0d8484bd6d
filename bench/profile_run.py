"""Run one configuration a few times, for a profiler to attach to (ncu / nsys).

    ncu -k regex:refine_union -s 2 -c 1 python bench/profile_run.py --op hisa --S 131072 --T 4096
    python bench/profile_run.py --op topk --rows 4096 --cols 8192 --times
    python bench/profile_run.py --op topk --scores wide --timeline --calls 20   # rows past the top-k window
    python bench/profile_run.py --op hisa --kernels --calls 10 --checksum   # an A/B of two trees

fp8 inputs from ``hisa_cupy.workloads`` (``--kind segments`` or ``random``), H=64, D=128, B=128,
k=2048, torch CUDA tensors, validate=False. ``--times`` also prints the median CUDA-event time of
the call (no L2 flush unless ``--flush``: a quick look, not a benchmark -- bench/kernels.py is the
protocol).
``--kernels --calls N`` profiles N calls and also prints each kernel's mean GPU time per call;
``--checksum`` prints a checksum of the call's output (equal checksums: the same indices in the
same places), so that two trees' outputs can be compared across processes. ``--timeline`` queues
--calls calls behind a ``torch.cuda._sleep`` (so the GPU never waits for the host) and prints,
per kernel of a call, its mean start, duration and the gap before it: what the launch boundaries
between a call's kernels cost on the GPU.
``--ab`` A/Bs knob settings in one process, on one workload (no process start or input
generation per setting): with ``--timeline``, each setting ("NAME=V,NAME=V" or "default", on top
of ``--knob``) is called once (kernel loads, plans), then runs ``--rounds`` rounds in the order
ABC CBA ABC ..., each its queued calls' span and the output's checksum, then the means per setting:

    python bench/profile_run.py --op hisa --S 131072 --T 1024 --timeline --calls 20 \
        --ab default --ab UNION_FINE_TAIL_SPLITS=0 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("hisa", "dense", "topk"), default="hisa")
    p.add_argument("--kind", choices=("segments", "random"), default="segments")
    p.add_argument("--S", type=int, default=131072)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--rows", type=int, default=4096, help="topk: rows")
    p.add_argument("--cols", type=int, default=8192, help="topk: row length")
    p.add_argument("--scores", choices=("randn", "wide"), default="randn",
                   help="topk: the rows' scores: randn, or magnitudes over 60 decades of both signs (wide: the k-th "
                        "largest far below the row's largest, where topk_regs_kernel's window gives way)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--times", action="store_true", help="print the median CUDA-event time per call")
    p.add_argument("--flush", action="store_true",
                   help="--times: write a 256 MB buffer before every timed call (the protocol's L2 flush)")
    p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help="set a cupy_backend module knob first, e.g. USE_UNION_PAIRS=0 (repeatable)")
    p.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...",
                   help="time the call once per value of one cupy_backend knob (implies --times)")
    p.add_argument("--kernels", action="store_true", help="print the GPU time of each kernel of --calls calls")
    p.add_argument("--calls", type=int, default=1, help="--kernels: calls profiled (per-call means printed)")
    p.add_argument("--checksum", action="store_true", help="print a checksum of the call's output")
    p.add_argument("--timeline", action="store_true",
                   help="print each kernel's mean start, duration and preceding gap over --calls queued calls")
    p.add_argument("--ab", action="append", default=[], metavar="NAME=V,NAME=V|default",
                   help="with --timeline: knob settings A/B'd in this process (repeatable; see above)")
    p.add_argument("--rounds", type=int, default=3, help="--ab: rounds (ABC CBA ABC ...)")
    args = p.parse_args(argv)
    if args.ab and not args.timeline:
        p.error("--ab needs --timeline")

    import torch

    import hisa_cupy
    from hisa_cupy.kernels import cupy_backend

    def set_knob(name, value):
        if not hasattr(cupy_backend, name):
            p.error(f"cupy_backend has no setting {name!r}")
        old = getattr(cupy_backend, name)
        setattr(cupy_backend, name, type(old)(int(value)) if isinstance(old, (bool, int)) else type(old)(value))

    for knob in args.knob:
        set_knob(*knob.partition("=")[::2])
    dev = torch.device("cuda")
    if args.op == "topk":
        g = torch.Generator(device=dev).manual_seed(0)
        scores = torch.randn(args.rows, args.cols, device=dev, generator=g)
        if args.scores == "wide":
            decades = torch.rand(args.rows, args.cols, device=dev, generator=g) * 60.0 - 30.0
            scores = torch.sign(scores) * torch.pow(10.0, decades)

        def call():
            return hisa_cupy.topk(scores, 2048)
    else:
        from hisa_cupy.workloads import make_workload

        from hisa_cupy.testing import to_torch

        wl = make_workload(args.kind, seq_len=args.S, num_queries=args.T, seed=0)
        q, k, w, ksc = (to_torch(x) for x in (wl.q, wl.k, wl.weights, wl.k_scale))
        out = torch.empty(args.T, 2048, dtype=torch.int32, device=dev)
        kw = dict(k_scale=ksc, topk=2048, out=out, validate=False)
        if args.op == "hisa":
            def call():
                return hisa_cupy.hisa_select(q, k, w, block_topk=args.m, **kw)
        else:
            def call():
                return hisa_cupy.dense_select(q, k, w, **kw)
    from stage_times import timed  # bench/ is this script's directory

    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if args.flush else None

    def run(label):
        reps = max(1, args.reps - 1)
        ms = timed(call, reps=reps, flush=flush)  # a first call, then the timed ones
        if args.times or args.sweep:
            shape = f"S={args.S} T={args.T} m={args.m}" if args.op != "topk" else f"{args.rows}x{args.cols}"
            print(f"{torch.cuda.get_device_name()} {args.op} {args.kind} {shape} {label}: median "
                  f"{ms:.4f} ms over {reps} calls (first call excluded, L2 {'flushed' if flush is not None else 'warm'})",
                  flush=True)

    if args.sweep:
        name, _, values = args.sweep.partition("=")
        for value in values.split(","):
            set_knob(name, value)
            run(" ".join(args.knob + [f"{name}={value}"]))
    else:
        run(" ".join(args.knob))
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        calls = max(1, args.calls)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(events.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))
        if calls > 1:
            per_call = {e.key: getattr(e, "device_time_total", 0) / calls for e in events if e.count >= calls}
            for name, us in sorted((kv for kv in per_call.items() if kv[1] > 0), key=lambda kv: -kv[1])[:10]:
                print(f"per call {us:10.1f} us  {name}")
    if args.ab:
        run_ab(args.ab, args.rounds, set_knob, call, max(2, args.calls))
    elif args.timeline:
        print_timeline(call, max(2, args.calls))
    if args.checksum and not args.ab:
        print(f"checksum {checksum(call())!r}")


def checksum(res) -> int:
    """The indices (and values) of a call's output weighted by their column: equal checksums, the
    same entries in the same places."""
    import torch

    outs = res if isinstance(res, tuple) else (res,)
    total = 0
    for o in outs:
        o = o.reshape(o.shape[0], -1)
        dt = torch.float64 if o.is_floating_point() else torch.int64  # int64: exact
        weights = torch.arange(1, o.shape[1] + 1, device=o.device, dtype=dt)
        total += (o.to(dt) * weights).sum().item()
    return total


def ab_order(n: int, rounds: int):
    """Setting indices of an A/B over n settings: rounds alternating forward and back (ABC CBA ...)."""
    return [i if r % 2 == 0 else n - 1 - i for r in range(rounds) for i in range(n)]


def run_ab(settings, rounds, set_knob, call, calls):
    """Timeline spans and checksums of ``call`` under each knob setting, in ab_order; each setting
    starts from the knobs as they were before the A/B."""
    from hisa_cupy.kernels import cupy_backend

    parsed = []
    for text in settings:
        pairs = [] if text == "default" else [kv.partition("=")[::2] for kv in text.split(",")]
        parsed.append((text, pairs))
    names = {name for _, pairs in parsed for name, _ in pairs}
    base = {name: getattr(cupy_backend, name) for name in names if hasattr(cupy_backend, name)}
    spans = {text: [] for text, _ in parsed}

    def apply(pairs):
        for name, value in base.items():
            setattr(cupy_backend, name, value)
        for name, value in pairs:
            set_knob(name, value)

    # one call per setting first: its kernels' first loads and its plans stay out of its first round
    # (a setting whose kernels no earlier call had loaded read 20-30 us slower there: session 39)
    for text, pairs in parsed:
        apply(pairs)
        call()
    for i in ab_order(len(parsed), rounds):
        text, pairs = parsed[i]
        apply(pairs)
        print(f"== ab {text}")
        spans[text].append(print_timeline(call, calls))
        print(f"checksum {checksum(call())!r}")
    for name, value in base.items():
        setattr(cupy_backend, name, value)
    for text, values in spans.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"ab mean {sum(values) / len(values):.2f} us over {len(values)} rounds ({shown}): {text}")


def print_timeline(call, calls):
    """Kernels of ``calls`` calls queued behind a sleep, grouped per call (every call launches the
    same kernels): mean start relative to the call's first kernel, duration, and gap after the
    kernel before (the first kernel's gap: after the previous call's last kernel). Returns the
    mean span of a call (first kernel start to last kernel end), NaN where the calls' kernels did
    not group."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(int(5e7))  # ~25 ms at ~2 GHz: every launch below is queued before the GPU gets to it
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda t: t[0])
    kernels = kernels[1:]  # the sleep (queued first; its kernel's name varies with torch's version)
    if not kernels or len(kernels) % calls:
        print(f"timeline: {len(kernels)} GPU events over {calls} calls, not the same per call")
        return float("nan")
    per = len(kernels) // calls
    rows = []
    for j in range(per):
        starts = [kernels[c * per + j][0] - kernels[c * per][0] for c in range(calls)]
        durs = [kernels[c * per + j][1] - kernels[c * per + j][0] for c in range(calls)]
        gaps = [kernels[c * per + j][0] - kernels[c * per + j - 1][1] for c in range(1 if j == 0 else 0, calls)]
        rows.append((sum(starts) / calls, sum(durs) / calls, sum(gaps) / len(gaps), kernels[j][2]))
    span = sum(kernels[c * per + per - 1][1] - kernels[c * per][0] for c in range(calls)) / calls
    print(f"timeline: {calls} queued calls, {per} GPU events each, span {span:.1f} us per call "
          f"(first kernel start to last kernel end), kernels {sum(r[1] for r in rows):.1f} us, "
          f"gaps {sum(r[2] for r in rows[1:]):.1f} us inside a call, {rows[0][2]:.1f} us between calls")
    for start, dur, gap, name in rows:
        print(f"  start {start:8.1f}  dur {dur:8.1f}  gap {gap:6.1f}  {name[:90]}")
    return span


if __name__ == "__main__":
    main()
