"""Fill the compiled-kernel cache on a machine without a GPU, so device calls skip NVRTC.

cupy_backend keys each compiled kernel by a hash of (expanded source, name expression, options,
NVRTC version) -- `cupy_backend.cache_key` -- not by the GPU, so a cache built here with the
device's NVRTC (13.0 on the H200 image: `pip install --target /tmp/nvrtc13
"nvidia-cuda-nvrtc==13.0.*"`, then `LD_LIBRARY_PATH=/tmp/nvrtc13/nvidia/cu13/lib`) is found
there. Compiling is most of the GPU tests' time on the device (minutes per changed source file);
here it costs no device time.

    LD_LIBRARY_PATH=/tmp/nvrtc13/nvidia/cu13/lib python bench/precompile_kernels.py \\
        --tree .snap/main --tree .snap/wip-x --from-cache .kcache/kernels.txz --instances \\
        --cache /tmp/kc --jobs 2 --pack .kcache/kernels.txz

Name expressions come from an earlier cache's `.name` files (lowered names, demangled with
c++filt: the kernels a device call actually used; a cache directory or a packed one), from
`--names FILE` (one per line), and/or from cupy_backend.kernel_instances() (`--instances`). The
source file of each follows from the kernel's name. Kernels already in the cache are skipped.
`--pack` then writes exactly the entries of the given trees' kernels (xz; ~2 MB for 370
kernels) for the device call to unpack into its cache (bench/device_session.sh, KCACHE_IN).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tarfile
import time

#: kernel name prefix -> source file under kernels/cuda
FILE_OF_PREFIX = {"pool_": "pool.cu", "block_": "block_select.cu", "refine_": "refine.cu",
                  "dense_": "dense.cu", "topk_": "topk.cu"}


def source_file(name_expr: str) -> str:
    for prefix, filename in FILE_OF_PREFIX.items():
        if name_expr.startswith(prefix):
            return filename
    raise ValueError(f"no source file known for kernel {name_expr!r} (prefixes: {sorted(FILE_OF_PREFIX)})")


def names_from_cache(path: str) -> list[str]:
    """Name expressions of the kernels in a cache: a directory, or an archive of one (its
    `.name` files, demangled)."""
    lowered = []
    if os.path.isdir(path):
        for entry in sorted(os.listdir(path)):
            if entry.endswith(".name"):
                with open(os.path.join(path, entry), encoding="utf-8") as f:
                    lowered.append(f.read().strip())
    else:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".name"):
                    lowered.append(tar.extractfile(member).read().decode().strip())
    return demangle([name for name in lowered if name])


def demangle(lowered: list[str]) -> list[str]:
    """Kernel name expressions of mangled (lowered) names, through c++filt: "void
    refine_union_wgmma_kernel<2, 0, 0, 64, 128>(void const*, ...)" -> the expression."""
    if not lowered:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(lowered), capture_output=True, text=True, check=True)
    return [line.removeprefix("void ").split("(")[0] for line in out.stdout.splitlines()]


def backend_of(tree: str):
    """The tree's kernels.cupy_backend module (a fresh import: each tree has its own sources)."""
    for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.abspath(tree))
    try:
        from kernels import cupy_backend
    finally:
        sys.path.pop(0)
    return cupy_backend


def cache_keys(cb, exprs, arch: str) -> dict:
    """{name expression: cache key} of the instances ``exprs`` of backend module ``cb``'s sources."""
    sources = {}
    keys = {}
    for expr in exprs:
        filename = source_file(expr)
        if filename not in sources:
            sources[filename] = cb.load_source(filename)
        keys[expr] = cb.cache_key(sources[filename], expr, arch)
    return keys


def pack(cache: str, keys, path: str) -> int:
    """Write the entries of ``keys`` in ``cache`` (``<key>.bin``, ``<key>.name`` and a -lineinfo
    entry's ``lineinfo/<key>/``) to the xz archive ``path``, named as in the cache; returns how
    many kernels it holds. A key without a binary is an error: the archive would not serve."""
    missing = [k for k in keys if not os.path.exists(os.path.join(cache, k + ".bin"))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} kernels are not in {cache}, e.g. {missing[0]}")
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:xz") as tar:
        for key in sorted(set(keys)):
            for suffix in (".bin", ".name"):
                tar.add(os.path.join(cache, key + suffix), arcname=key + suffix)
            kept = os.path.join(cache, "lineinfo", key)
            if os.path.isdir(kept):
                tar.add(kept, arcname=f"lineinfo/{key}")
    os.replace(tmp, path)
    return len(set(keys))


def _compile(tree: str, cache: str, name_expr: str, arch: str):
    os.environ["HISA_CUPY_CACHE_DIR"] = cache
    cb = backend_of(tree)
    start = time.perf_counter()
    cb._nvrtc_compile(cb.load_source(source_file(name_expr)), name_expr, arch)
    return name_expr, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], metavar="DIR",
                   help="repository tree whose kernels to compile (repeatable; default: .)")
    p.add_argument("--cache", required=True, help="cache directory to fill (HISA_CUPY_CACHE_DIR on the device)")
    p.add_argument("--from-cache", action="append", default=[], metavar="PATH",
                   help="take the name expressions of the kernels in this cache, a directory or an archive (repeatable)")
    p.add_argument("--names", action="append", default=[], metavar="FILE", help="name expressions, one per line")
    p.add_argument("--instances", action="store_true", help="add cupy_backend.kernel_instances()")
    p.add_argument("--only", default="", help="keep only expressions containing this text (e.g. refine_union)")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--pack", metavar="FILE", help="then write the trees' kernels from the cache to this xz archive")
    args = p.parse_args(argv)

    trees = [os.path.abspath(t) for t in (args.tree or ["."])]
    cache = os.path.abspath(args.cache)
    os.environ["HISA_CUPY_CACHE_DIR"] = cache  # cache_key's options follow HISA_CUPY_LINEINFO, as the compile's do
    given = set()
    for path in args.from_cache:
        given.update(names_from_cache(path))
    for path in args.names:
        with open(path, encoding="utf-8") as f:
            given.update(line.strip() for line in f if line.strip())
    os.makedirs(cache, exist_ok=True)
    failed = 0
    all_keys = []
    for tree in trees:
        cb = backend_of(tree)
        exprs = set(given) | ({e for _, e in cb.kernel_instances()} if args.instances else set())
        exprs = sorted(e for e in exprs if args.only in e)
        if not exprs:
            print("no name expressions given", file=sys.stderr)
            return 2
        keys = cache_keys(cb, exprs, args.arch)
        todo = [e for e in exprs if not os.path.exists(os.path.join(cache, keys[e] + ".bin"))]
        start = time.perf_counter()
        with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_compile, tree, cache, e, args.arch) for e in todo]
            for fut in cf.as_completed(futures):
                try:
                    fut.result()
                except Exception as e:  # report and go on: one bad instance must not stop the rest
                    failed += 1
                    print(f"failed: {e}", file=sys.stderr)
        print(f"{len(exprs)} kernels of {tree}: {len(todo)} to compile, {failed} failed so far, "
              f"{time.perf_counter() - start:.0f} s")
        all_keys += list(keys.values())
    if failed:
        return 1
    if args.pack:
        n = pack(cache, all_keys, args.pack)
        print(f"{n} kernels packed into {args.pack} ({os.path.getsize(args.pack)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
