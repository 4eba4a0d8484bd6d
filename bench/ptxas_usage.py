"""Registers, stack frame, spills and static shared memory of the CuPy backend's kernels, as ptxas
reports them when NVRTC compiles them the way the backend does (its options plus ``-Xptxas=-v``).

Occupancy decisions rest on these numbers (bench/NOTES.md: register mode at 40 registers and
three CTAs per SM, the union kernel at 168 registers), and a few spilled bytes or a stack frame
can cost more than a variant gains, so check them here, without a GPU, before a device call:

    LD_LIBRARY_PATH=/tmp/nvrtc13/nvidia/cu13/lib python bench/ptxas_usage.py \\
        --tree .snap/wip-x topk_filter_kernel "refine_union_wgmma_kernel<2, 0, 0, 64, 128>"

Every entry function that the compile of a kernel's source file builds is listed (the file's
non-template kernels and the instances asked for), once per file. ``--names FILE`` reads name
expressions, one per line (the lists bench/precompile_kernels.py reads).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from precompile_kernels import backend_of, demangle, source_file  # noqa: E402  (bench/ is this script's directory)

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> list[dict]:
    """Per entry function of a ptxas ``-v`` log: {name (mangled), registers, stack, spill_stores,
    spill_loads, smem}, in the log's order. A function's lines follow its "Compiling entry
    function" line; one without a "Used N registers" line is left out."""
    out, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
            out.append(cur)
            cur = None
    return out


def usage(tree: str, exprs: list[str], arch: str) -> list[dict]:
    """Compile each source file of ``exprs`` once (with all of its expressions) and return the
    parsed ptxas lines of every entry function, with the file and the demangled name added."""
    from cupy_backends.cuda.libs import nvrtc

    cb = backend_of(tree)
    by_file: dict[str, list[str]] = {}
    for expr in exprs:
        by_file.setdefault(source_file(expr), []).append(expr)
    rows = []
    for filename, names in by_file.items():
        prog = nvrtc.createProgram(cb.load_source(filename), filename, [], [])
        try:
            for expr in names:
                nvrtc.addNameExpression(prog, expr)
            try:
                nvrtc.compileProgram(prog, list(cb._compile_options(arch)) + ["-Xptxas=-v"])
            except nvrtc.NVRTCError as e:
                raise RuntimeError(f"NVRTC failed on {filename}:\n{nvrtc.getProgramLog(prog)}") from e
            parsed = parse_ptxas_log(nvrtc.getProgramLog(prog))
        finally:
            nvrtc.destroyProgram(prog)
        mangled = [r["name"] for r in parsed]
        try:
            names = demangle(mangled)
        except (OSError, subprocess.CalledProcessError):  # no c++filt: the mangled names
            names = mangled
        for row, name in zip(parsed, names):
            rows.append(dict(row, file=filename, kernel=name))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="kernel name expressions, e.g. topk_filter_kernel")
    p.add_argument("--names", dest="names_file", action="append", default=[], metavar="FILE",
                   help="name expressions, one per line")
    p.add_argument("--tree", default=".", help="repository tree whose sources to compile (default: .)")
    p.add_argument("--arch", default="sm_90a")
    args = p.parse_args(argv)
    exprs = list(args.names)
    for path in args.names_file:
        with open(path, encoding="utf-8") as f:
            exprs += [line.strip() for line in f if line.strip()]
    if not exprs:
        p.error("no kernels named (give name expressions or --names FILE)")
    for r in usage(os.path.abspath(args.tree), exprs, args.arch):
        print(f"{r['file']:16s} {r['registers']:4d} regs  stack {r['stack']:4d}  spills {r['spill_stores']:4d} / "
              f"{r['spill_loads']:4d} B  smem {r['smem']:6d} B  {r['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
