"""The SM clock and power draw while a workload runs back to back (is the GPU at its power limit?).

bench/NOTES.md, session 31: the union kernel's MMA chain with its head sums ran at 828-853
TFLOP/s for 2000 tiles per CTA and at 747-762 for 4000, "where the clocks fall". A card at its
power limit lowers its SM clock, and then the tensor rate a kernel can reach is the clock's, not
the datasheet's. This samples ``nvidia-smi`` (SM clock, power draw and limit, temperature, the
active clock-event reasons) every ``--interval-ms`` while each workload runs for ``--seconds``,
and prints per workload the medians over its run (its first 20% left out: the clock settles),
with the f16 tensor peak at that clock (4096 FLOP per clock per SM: the H100 / H200 dense rate).

Workloads: ``idle``; ``hisa`` (hisa_select at --S / --T, fp8 segments inputs, m = 64, k = 2048);
``dense`` (dense_select at the same shape); ``matmul`` (torch.matmul of two 8192 x 8192 f16
matrices). Each is called back to back until its time is up, the host waiting for the GPU after every
8 calls (so that the queue stays short and the host's clock is the GPU's); ms/call is the run's wall
time over its calls. ``protocol``: the same hisa_select timed as bench/kernels.py times the targets
(its ``Timer``, 3 warm-up calls: 10 calls each behind a sleep kernel and a 256 MB L2 flush, the
host waiting after each, then 10 without the sleep for the wall times), round after round until the
time is up, with the last round's median GPU time: the clock the run of record's numbers are taken at.

    python3 bench/clock_power.py [--S 131072] [--T 4096] [--seconds 3] [--workloads idle,hisa,matmul]

Prints one line per workload; --json OUT also writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

FIELDS = ("timestamp", "clocks.sm", "power.draw", "power.limit", "temperature.gpu", "clocks_event_reasons.active")
#: f16 dense tensor FLOP per clock per SM (H100 / H200: 989.4 TFLOP/s at 1830 MHz on 132 SMs)
F16_FLOP_PER_CLOCK_SM = 4096
#: timed calls per round of the `protocol` workload (the Timer's reps, each also run once more for its wall time)
PROTOCOL_REPS = 10


def parse_samples(text: str):
    """(seconds since the epoch, SM MHz, W, W limit, C, reasons) per nvidia-smi CSV line (noheader,
    nounits); lines that do not parse are skipped."""
    import datetime

    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS):
            continue
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((stamp, float(parts[1]), float(parts[2]), float(parts[3]), float(parts[4]), parts[5]))
        except ValueError:
            continue
    return rows


def summarize(rows, t0: float, t1: float, skip: float = 0.2):
    """Medians of the samples in [t0 + skip * (t1 - t0), t1] and the reasons seen there."""
    lo = t0 + skip * (t1 - t0)
    sel = [r for r in rows if lo <= r[0] <= t1]
    if not sel:
        return None
    return {"samples": len(sel), "sm_mhz": statistics.median(r[1] for r in sel),
            "sm_mhz_min": min(r[1] for r in sel), "power_w": statistics.median(r[2] for r in sel),
            "power_limit_w": statistics.median(r[3] for r in sel), "temp_c": statistics.median(r[4] for r in sel),
            "reasons": sorted({r[5] for r in sel})}


def bench_kernels_module():
    """bench/kernels.py, loaded by path (the repository root's `kernels` package holds the name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def protocol_timer():
    """bench/kernels.py's Timer (L2 flushed by writes, its default 3 warm-up calls): what the run of
    record times each target with."""
    return bench_kernels_module().Timer(reps=PROTOCOL_REPS, warmup=3, flush="write")


def f16_peak_tflops(sm_mhz: float, sms: int) -> float:
    return F16_FLOP_PER_CLOCK_SM * sms * sm_mhz * 1e6 / 1e12


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--S", type=int, default=131072)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--interval-ms", type=int, default=20)
    p.add_argument("--workloads", default="idle,hisa,dense,matmul")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    known = ("idle", "hisa", "dense", "matmul", "protocol")
    for n in names:
        if n not in known:
            p.error(f"unknown workload {n!r} (known: {', '.join(known)})")

    import torch

    if not torch.cuda.is_available():
        print("clock_power.py: no CUDA device; nothing to measure")
        return 0
    import hisa_cupy
    from hisa_cupy.testing import to_torch
    from hisa_cupy.workloads import make_workload

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    calls = {"idle": None}
    if {"hisa", "dense", "protocol"} & set(names):  # only the inputs the named workloads use
        wl = make_workload("segments", seq_len=args.S, num_queries=args.T, seed=0)
        q, k, w, ksc = (to_torch(x) for x in (wl.q, wl.k, wl.weights, wl.k_scale))
        kw = dict(k_scale=ksc, topk=2048, out=torch.empty(args.T, 2048, dtype=torch.int32, device=dev),
                  validate=False)
        calls["hisa"] = lambda: hisa_cupy.hisa_select(q, k, w, block_topk=64, **kw)
        calls["dense"] = lambda: hisa_cupy.dense_select(q, k, w, **kw)
    protocol = {}  # the protocol workload's last round: its stats and how many calls a round makes
    if "protocol" in names:
        timer = protocol_timer()
        hisa = calls["hisa"]

        def protocol_round():
            protocol["stats"] = timer(hisa, reps=PROTOCOL_REPS)
            return protocol["stats"]

        calls["protocol"] = protocol_round
        protocol["calls_per_round"] = timer.warmup + 2 * PROTOCOL_REPS
    if "matmul" in names:
        a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
        calls["matmul"] = lambda: torch.matmul(a, b)
    for n in names:
        if calls[n] is not None:
            calls[n]()  # compile / plan outside the sampled run
    torch.cuda.synchronize()

    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as log:
        sampler = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                                    f"-lms={args.interval_ms}"], stdout=log, stderr=subprocess.STDOUT)
        spans = []
        try:
            time.sleep(0.5)
            for n in names:
                t0 = time.time()
                n_calls = 0
                while time.time() - t0 < args.seconds:
                    if calls[n] is None:
                        time.sleep(0.05)
                    elif n == "protocol":  # a round of the Timer (it synchronises itself)
                        calls[n]()
                        n_calls += protocol["calls_per_round"]
                    else:
                        for _ in range(8):
                            calls[n]()
                        n_calls += 8
                        torch.cuda.synchronize()  # bounded queue: the host's clock is the GPU's
                t1 = time.time()
                spans.append((n, t0, t1, n_calls))
                time.sleep(0.5)
        finally:
            sampler.terminate()
            sampler.wait()
        log.seek(0)
        text = log.read()
    rows = parse_samples(text)
    if not rows:
        print("clock_power.py: nvidia-smi gave no samples:\n" + text[:2000])
        return 1
    result = []
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, S={args.S} T={args.T}, {args.seconds:.1f} s per workload, "
          f"samples every {args.interval_ms} ms (medians after the first 20%)")
    for n, t0, t1, n_calls in spans:
        s = summarize(rows, t0, t1)
        if s is None:
            print(f"{n:8s} no samples")
            continue
        s.update(workload=n, calls=n_calls, ms_per_call=(t1 - t0) * 1e3 / n_calls if n_calls else None,
                 f16_peak_tflops=f16_peak_tflops(s["sm_mhz"], sms))
        if n == "protocol":
            s["protocol_median_ms"] = protocol["stats"]["median_ms"]
        result.append(s)
        per = f"{s['ms_per_call']:.3f} ms/call" if n_calls else ""
        if n == "protocol":
            per += f" (the protocol's median GPU time {s['protocol_median_ms']:.3f} ms)"
        print(f"{n:8s} SM {s['sm_mhz']:6.0f} MHz (min {s['sm_mhz_min']:.0f}), {s['power_w']:6.1f} W of "
              f"{s['power_limit_w']:.0f}, {s['temp_c']:.0f} C, f16 peak at this clock {s['f16_peak_tflops']:.0f} "
              f"TFLOP/s, {per}, reasons {' '.join(s['reasons'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
