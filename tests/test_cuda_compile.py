"""Every CUDA source under kernels/cuda/ compiles with nvcc for sm_80, sm_90 and sm_90a.

The kernels are templates, so each source is compiled together with explicit instantiations of
the template arguments the CuPy backend uses (``cupy_backend.kernel_instances()``), after the
same ``#include`` expansion the backend does before NVRTC. No GPU is needed; nvcc is (it is on the
CI machine). A missing nvcc fails the test rather than skipping it.
"""
import collections
import os
import shutil
import subprocess

import pytest

from hisa_cupy.kernels import cupy_backend

CUDA_FILES = sorted(f for f in os.listdir(cupy_backend.CUDA_DIR) if f.endswith(".cu"))


def _nvcc():
    exe = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if exe is None:
        pytest.fail("nvcc not found: the CUDA sources must be compile-checked (install the CUDA toolkit)")
    return exe


def test_every_source_has_instances():
    files = {f for f, _ in cupy_backend.kernel_instances()}
    assert files == set(CUDA_FILES), f"sources without instantiations: {set(CUDA_FILES) - files}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("filename", CUDA_FILES)
def test_compiles(tmp_path, filename, arch):
    instances = collections.defaultdict(list)
    for f, expr in cupy_backend.kernel_instances():
        instances[f].append(expr)
    src = cupy_backend.load_source(filename)
    assert "#include \"" not in src, "local includes must be expanded"
    refs = ",\n".join(f"    (void*)&{e}" for e in instances[filename])
    (tmp_path / "unit.cu").write_text(src + f"\nvoid* hisa_instances[] = {{\n{refs}\n}};\n")
    proc = subprocess.run([_nvcc(), "-std=c++17", f"-arch={arch}", "-c", "unit.cu", "-o", "unit.o",
                           "-Werror", "all-warnings", "-Xptxas", "-v"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "unit.o").stat().st_size > 0
    # a named barrier whose id is in a register makes ptxas reserve all 16 of a CTA's barriers,
    # which caps the CTAs per SM (block_topm_warp_kernel: 4 per SM, two waves at T = 4096)
    usage = [line for line in proc.stderr.splitlines() if "registers" in line and "barriers" in line]
    assert usage, proc.stderr[-4000:]
    assert not [u for u in usage if "used 16 barriers" in u], usage


def test_host_constants_match_the_kernels():
    # sizes written both in cupy_backend (launch shapes, shared memory) and as #defines in the CUDA
    # sources; a mismatch would launch kernels with the wrong block or send warp mode rows longer
    # than it holds (items silently dropped)
    import re

    defines = {}
    for f in os.listdir(cupy_backend.CUDA_DIR):
        with open(os.path.join(cupy_backend.CUDA_DIR, f)) as src:
            defines.update(re.findall(r"^#define (\w+) (\d+)\b", src.read(), flags=re.M))
    for name in ("SCORE_TILE", "SCORE_THREADS", "SELECT_THREADS", "WARP_SELECT_ITEMS", "WARP_SELECT_ROWS",
                 "PAIR_RECORD_HEAD", "FILTER_WIDE_THREADS", "APPEND_CAP"):
        assert int(defines[name]) == getattr(cupy_backend, name), name
    for name in ("FILTER_CHUNK", "FILTER_SAMPLES"):  # topk.cu's filtered path
        assert int(defines[name]) == getattr(cupy_backend, "TOPK_" + name), name
    # register mode's longest row is SELECT_THREADS x REG_SELECT_R keys per thread
    assert int(defines["SELECT_THREADS"]) * int(defines["REG_SELECT_R"]) == cupy_backend.REG_SELECT_ITEMS


#: kernels whose body is a call of score_tile_wgmma (score_wgmma.cuh), which waits for the kernel
#: before them after its q and head-weight loads (the call's inputs), before anything else
LATE_WAIT_KERNELS = {"block_score_wgmma_kernel", "refine_score_wgmma_kernel", "refine_union_wgmma_kernel"}
#: kernels that trigger their dependents (grid_dependents_launch, common.cuh) as their second statement
EARLY_TRIGGER_KERNELS = {"pool_vec_kernel"}
#: kernels that do so where the host asks (their `early` argument)
HOST_TRIGGER_KERNELS = {"block_topm_warp_kernel"}
#: kernels that wait for their rows' ready flags first and for the kernel before them last
#: (refine.cu: the union kernel's CTAs publish each pair's keys, cupy_backend.UNION_READY)
READY_WAIT_KERNELS = {"refine_topk_ready_regs_kernel"}


def _kernel_bodies(src):
    """(name, body) of every __global__ function of src, comments taken out, whitespace folded."""
    import re

    src = re.sub(r"//[^\n]*", "", src)
    for m in re.finditer(r"__global__ void\b", src):
        body = src.index("{", m.end())  # the parameter lists hold no braces
        name = re.search(r"(\w+)\s*\(", src[m.end():body].replace("__launch_bounds__", "")).group(1)
        depth, end = 0, body
        for end in range(body, len(src)):
            depth += {"{": 1, "}": -1}.get(src[end], 0)
            if depth == 0:
                break
        yield name, re.sub(r"[\s\\]+", " ", src[body + 1:end]).strip()


def test_every_kernel_waits_for_its_predecessor_first():
    # with programmatic dependent launch (cupy_backend.USE_PDL) a kernel may be scheduled before
    # the kernel before it on the stream has finished; each kernel's first statement is
    # grid_dependency_sync() (common.cuh), which waits for it. A kernel without it would read or
    # overwrite buffers its predecessor still uses. The exceptions call score_tile_wgmma, which
    # waits right after its q and head-weight loads (test_score_tile_waits_before_its_other_reads).
    import re

    seen, late = 0, set()
    for filename in CUDA_FILES:
        for name, body in _kernel_bodies(cupy_backend.load_source(filename)):
            seen += 1
            if name in LATE_WAIT_KERNELS:
                late.add(name)
                assert "grid_dependency_sync" not in body, f"{filename}: {name} waits twice"
                call = body.index("score_tile_wgmma<")
                before = [st.strip() for st in body[:call].split(";") if st.strip()]  # index arithmetic only
                assert all(re.match(r"const (int|bool) ", st) and "[" not in st for st in before), (name, before)
                assert "ITEMS_TOKENS" not in body, f"{filename}: {name}: dense tiles do not wait inside"
                continue
            if name in READY_WAIT_KERNELS:
                # the flags (acquire loads), a CTA barrier, the select (coherent loads), then the wait
                late.add(name)
                assert body.count("grid_dependency_sync") == 1 and body.endswith("grid_dependency_sync();"), name
                spin = body.index("while (ld_acquire_gpu(ready + c0 + lane) != e)")
                select = body.index("row_select_regs<")
                assert spin < body.index("__syncthreads();", spin) < select, name
                # COHERENT (the eighth template argument) true; STRIDED (the ninth) either way
                assert re.match(r"row_select_regs<KEYS_U32, MAP_GATHER, 0, SORT_BITS, SELECT_THREADS, 0, 14, true[,>]",
                                body[select:]), f"{name}: its rows by coherent loads"
                assert "grid_dependents_launch" not in body, name
                continue
            assert body.startswith("grid_dependency_sync();"), f"{filename}: {name} starts with {body[:60]!r}"
            triggers = body.count("grid_dependents_launch()")
            if name in EARLY_TRIGGER_KERNELS:
                assert body.startswith("grid_dependency_sync(); grid_dependents_launch();"), name
            elif name in HOST_TRIGGER_KERNELS:
                assert body.startswith("grid_dependency_sync(); if (early) grid_dependents_launch();"), name
            else:
                assert triggers == 0, f"{filename}: {name} triggers its dependents"  # filtered_select's is its own
    assert late == LATE_WAIT_KERNELS | READY_WAIT_KERNELS
    assert seen >= 27


def test_score_tile_waits_before_its_other_reads():
    # score_tile_wgmma (score_wgmma.cuh) on every path but dense: the row ranges (ks, ke), q and the
    # head weights are loaded, then grid_dependency_sync(), and only then the keys, the block lists
    # or the pair records of the kernel before (staged after the union / tile range is worked out)
    import re

    src = re.sub(r"//[^\n]*", "", cupy_backend.load_source("refine.cu"))
    fn = src[src.index("__device__ __forceinline__ void score_tile_wgmma("):]
    wait = fn.index("grid_dependency_sync")
    prefetch = fn.rindex("if constexpr (PREFETCH) {", 0, wait)
    block = re.sub(r"\s+", " ", fn[prefetch:fn.index("}", wait) + 1])
    assert re.fullmatch(r"if constexpr \(PREFETCH\) \{ #pragma unroll for \(int it = 0; it < QITERS; \+\+it\) "
                        r"q_load\(it, qraw\[it\]\); head_weights<N, H, ROWS, true>\([^;]*\); "
                        r"grid_dependency_sync\(\); if \(trigger\) grid_dependents_launch\(\); \}", block), block
    for first_use in ("unions + ", "blocks[", "stage(j_first", "orow(r)[n]", "tile_has_candidate(j, f)"):
        assert fn.index(first_use) > wait, first_use
    # q's rows go through early_loads (else ptxas moves their loads past the wait)
    head = fn[:prefetch]
    assert "if constexpr (PREFETCH) q_rows = early_loads(q_rows);" in head


def test_pdl_launch_structures_match_the_driver():
    # cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out (64-bit)
    import ctypes

    cfg, attr = cupy_backend._LaunchConfig, cupy_backend._LaunchAttribute
    assert ctypes.sizeof(attr) == 72 and attr.value.offset == 8
    assert ctypes.sizeof(cfg) == 56
    assert (cfg.grid.offset, cfg.block.offset, cfg.smem.offset) == (0, 12, 24)
    assert (cfg.stream.offset, cfg.attrs.offset, cfg.nattrs.offset) == (32, 40, 48)
    assert cupy_backend._CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6
