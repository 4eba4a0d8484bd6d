"""Where a kernel spends its issue slots and stalls, from an Nsight Compute SASS source export.

On the device machine (any profile_run configuration; ``-c 1`` profiles one launch):

    ncu --set full -k regex:topk_kernel -s 1 -c 1 -o topk -f python3 bench/profile_run.py --op topk
    ncu -i topk.ncu-rep --page source --csv --print-source sass > topk_sass.csv
    python3 bench/ncu_hotspots.py topk_sass.csv --rows 4096

With a build carrying line info (``HISA_CUPY_LINEINFO=1``, as bench/device_session.sh's ``ncu``
step does), ``--print-source cuda,sass`` exports each CUDA source line with its instructions, and
``--lines`` ranks the lines instead (``python3 bench/ncu_hotspots.py topk_source.csv --lines``).

Prints the executed warp instructions (in all, and per row when ``--rows`` is given), the share
of instructions and of stall samples per opcode, the stall reasons, and the hottest windows of
consecutive instructions. These are what told list mode's passes apart in bench/NOTES.md (v8).
The export has no source correlation, so windows are matched to code by their opcodes and
execution counts (a count of 16 per row is once per warp of a 512-thread CTA).
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys


def _opcode(sass: str) -> str:
    words = sass.split()
    if words and words[0].startswith("@"):  # predicate guard
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def load(path):
    """(header, rows) of the CSV export: the row after the kernel-name line is the header."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]


def summarize(header, rows, *, per_row=None, window=48, top=10):
    """The report as a list of lines."""
    col = {name: i for i, name in enumerate(header)}
    samples = [int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in rows]
    executed = [int(r[col["Instructions Executed"]] or 0) for r in rows]
    ops = [_opcode(r[col["Source"]]) for r in rows]
    total_s, total_x = max(1, sum(samples)), max(1, sum(executed))
    out = [f"{len(rows)} SASS instructions, {sum(executed)} warp instructions executed"
           + (f" ({sum(executed) / per_row:.0f} per row)" if per_row else "") + f", {sum(samples)} stall samples"]
    by_s, by_x = collections.Counter(), collections.Counter()
    for o, s, x in zip(ops, samples, executed):
        by_s[o] += s
        by_x[o] += x
    out.append("opcode      executed  samples")
    for o, x in by_x.most_common(top):
        out.append(f"  {o:9s} {100 * x / total_x:6.1f}%  {100 * by_s[o] / total_s:6.1f}%")
    stalls = collections.Counter()
    for name, i in col.items():
        if name.startswith("stall_") and "Not Issued" not in name:
            stalls[name[len("stall_"):]] = sum(int(r[i] or 0) for r in rows)
    out.append("stalls: " + ", ".join(f"{k} {100 * v / total_s:.1f}%" for k, v in stalls.most_common(8)))
    wins = []
    for a in range(0, len(rows), window):
        wins.append((sum(samples[a:a + window]), a, sum(executed[a:a + window]), max(executed[a:a + window])))
    out.append(f"hottest windows of {window} instructions (samples, executed, most executions of one instruction):")
    for s, a, x, mx in sorted(wins, reverse=True)[:top]:
        common = collections.Counter(ops[a:a + window]).most_common(5)
        reps = f"{mx / per_row:.1f} per row" if per_row else str(mx)
        out.append(f"  [{a}:{a + window}] {100 * s / total_s:5.1f}% {100 * x / total_x:5.1f}%  {reps:>14s}  "
                   + " ".join(f"{k}:{v}" for k, v in common))
    return out


def source_lines(path):
    """[(line, source text, executed, samples)] of a ``--print-source cuda,sass`` export (kernels
    built with -lineinfo: HISA_CUPY_LINEINFO=1): the rows that name a source line carry the
    counts of that line's instructions."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Line No")
    col = {name: i for i, name in enumerate(rows[start])}
    ix, isamp = col["Instructions Executed"], col["Warp Stall Sampling (All Samples)"]
    def count(v):  # "-" where a line has no instructions of its own
        return int(v) if v.strip().isdigit() else 0

    return [(int(r[0]), r[1].strip(), count(r[ix]), count(r[isamp]))
            for r in rows[start + 1:] if r and r[0].isdigit()]


def summarize_lines(lines, *, per_row=None, top=25):
    """The report of source_lines(): the lines that execute the most warp instructions."""
    total_x = max(1, sum(x for _, _, x, _ in lines))
    total_s = max(1, sum(s for _, _, _, s in lines))
    out = [f"{len(lines)} source lines, {total_x} warp instructions executed"
           + (f" ({total_x / per_row:.0f} per row)" if per_row else "")]
    out.append(" line  executed  samples" + ("  per row" if per_row else "") + "  source")
    for line, text, x, s in sorted(lines, key=lambda r: -r[2])[:top]:
        reps = f"  {x / per_row:7.0f}" if per_row else ""
        out.append(f"{line:5d}  {100 * x / total_x:7.1f}%  {100 * s / total_s:6.1f}%{reps}  {text[:100]}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="ncu --page source --csv --print-source sass export (cuda,sass with --lines)")
    p.add_argument("--lines", action="store_true", help="per source line (a cuda,sass export of a -lineinfo build)")
    p.add_argument("--rows", type=int, default=None, help="rows the kernel processed (per-row counts)")
    p.add_argument("--window", type=int, default=48)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    if args.lines:
        print("\n".join(summarize_lines(source_lines(args.csv), per_row=args.rows, top=args.top)))
        return 0
    header, rows = load(args.csv)
    print("\n".join(summarize(header, rows, per_row=args.rows, window=args.window, top=args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
