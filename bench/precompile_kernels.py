"""Fill the compiled-kernel cache on a machine without a GPU, so device calls skip NVRTC.

cupy_backend keys each compiled kernel by a hash of (expanded source, name expression, options,
NVRTC version), not by the GPU, so a cache built here with the device's NVRTC (13.0 on the H200
image: `pip install --target /tmp/nvrtc13 "nvidia-cuda-nvrtc==13.0.*"`, then
`LD_LIBRARY_PATH=/tmp/nvrtc13/nvidia/cu13/lib`) is found there. Compiling is most of the GPU
tests' time on the device (minutes per changed source file); here it costs no device time.

    LD_LIBRARY_PATH=/tmp/nvrtc13/nvidia/cu13/lib python bench/precompile_kernels.py \
        --tree .snap/wip-x --from-cache /tmp/old_cache --instances --cache /tmp/kc --jobs 2

Name expressions come from an earlier cache's `.name` files (lowered names, demangled with
c++filt: the kernels a device call actually used), from `--names FILE` (one per line), and/or
from cupy_backend.kernel_instances() (`--instances`). The source file of each follows from the
kernel's name. Kernels already in the cache are skipped.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import time

#: kernel name prefix -> source file under kernels/cuda
FILE_OF_PREFIX = {"pool_": "pool.cu", "block_": "block_select.cu", "refine_": "refine.cu",
                  "dense_": "dense.cu", "topk_": "topk.cu"}


def source_file(name_expr: str) -> str:
    for prefix, filename in FILE_OF_PREFIX.items():
        if name_expr.startswith(prefix):
            return filename
    raise ValueError(f"no source file known for kernel {name_expr!r} (prefixes: {sorted(FILE_OF_PREFIX)})")


def names_from_cache(directory: str) -> list[str]:
    """Name expressions of the kernels in a cache directory (its `.name` files, demangled)."""
    lowered = []
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".name"):
            with open(os.path.join(directory, entry), encoding="utf-8") as f:
                text = f.read().strip()
            if text:
                lowered.append(text)
    if not lowered:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(lowered), capture_output=True, text=True, check=True)
    # "void refine_union_wgmma_kernel<2, 0, 0, 64, 128>(void const*, ...)" -> the expression
    return [line.removeprefix("void ").split("(")[0] for line in out.stdout.splitlines()]


def _compile(tree: str, cache: str, name_expr: str, arch: str):
    os.environ["HISA_CUPY_CACHE_DIR"] = cache
    sys.path.insert(0, tree)
    from kernels import cupy_backend as cb

    start = time.perf_counter()
    cb._nvrtc_compile(cb.load_source(source_file(name_expr)), name_expr, arch)
    return name_expr, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=".", help="repository tree whose kernels to compile (default: .)")
    p.add_argument("--cache", required=True, help="cache directory to fill (HISA_CUPY_CACHE_DIR on the device)")
    p.add_argument("--from-cache", action="append", default=[], metavar="DIR",
                   help="take the name expressions of the kernels cached in DIR (repeatable)")
    p.add_argument("--names", action="append", default=[], metavar="FILE", help="name expressions, one per line")
    p.add_argument("--instances", action="store_true", help="add cupy_backend.kernel_instances()")
    p.add_argument("--only", default="", help="keep only expressions containing this text (e.g. refine_union)")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    tree = os.path.abspath(args.tree)
    exprs = set()
    for directory in args.from_cache:
        exprs.update(names_from_cache(directory))
    for path in args.names:
        with open(path, encoding="utf-8") as f:
            exprs.update(line.strip() for line in f if line.strip())
    if args.instances:
        sys.path.insert(0, tree)
        from kernels import cupy_backend as cb
        exprs.update(expr for _, expr in cb.kernel_instances())
    exprs = sorted(e for e in exprs if args.only in e)
    if not exprs:
        print("no name expressions given", file=sys.stderr)
        return 2
    os.makedirs(args.cache, exist_ok=True)
    before = sum(name.endswith(".bin") for name in os.listdir(args.cache))
    start = time.perf_counter()
    failed = 0
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_compile, tree, os.path.abspath(args.cache), e, args.arch) for e in exprs]
        for fut in cf.as_completed(futures):
            try:
                fut.result()
            except Exception as e:  # report and go on: one bad instance must not stop the rest
                failed += 1
                print(f"failed: {e}", file=sys.stderr)
    after = sum(name.endswith(".bin") for name in os.listdir(args.cache))
    print(f"{len(exprs)} kernels of {tree}: {after - before} compiled, {failed} failed, "
          f"{time.perf_counter() - start:.0f} s; {after} in {args.cache}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
