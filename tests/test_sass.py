"""The wgmma score kernels keep every relu of their head sums in the machine code (no GPU needed).

nvcc compiles each kernel for sm_90a twice, to PTX and to a cubin, and nvdisasm (the
``nvidia-cuda-nvdisasm`` wheel of the test extras) disassembles the cubin: the SASS must hold as
many FMNMX instructions as the PTX has ``max.NaN.f32`` relus. A dense-kernel variant of session 24
(bench/NOTES.md) had right PTX and wrong keys: ptxas merged the relus of row 0's two MMA halves,
which read the same PTX accumulator registers with a ``wgmma.mma_async`` redefining them in
between (96 FMNMX against 128). The GPU tests caught that one by its keys; this catches the same
miscompile in any of these kernels without a GPU.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from hisa_cupy.kernels import cupy_backend

from test_cuda_compile import _nvcc

KERNELS = [
    ("dense.cu", "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("dense.cu", "dense_score_append_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("dense.cu", "dense_score_rescue_wgmma_kernel<2, 0, 0, 64, 128, 2>"),
    ("refine.cu", "refine_union_wgmma_kernel<2, 0, 0, 64, 128>"),
    ("block_select.cu", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>"),
]


def _nvdisasm():
    found = shutil.which("nvdisasm")
    for site in sys.path:
        found = found or next(iter(glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "nvdisasm"))), None)
    if found is None:
        pytest.fail("nvdisasm not found: install the test extras (nvidia-cuda-nvdisasm)")
    return found


def _function(text, splitter, stem):
    """The part of a PTX or SASS listing that belongs to the one kernel whose name contains stem."""
    parts = [p for p in re.split(splitter, text) if stem in p.split("(")[0].split(" ")[0]]
    assert len(parts) == 1, f"{stem}: {len(parts)} functions found"
    return parts[0]


@pytest.mark.parametrize("filename, expr", KERNELS)
def test_relus_survive_ptxas(tmp_path, filename, expr):
    src = cupy_backend.load_source(filename) + f"\nvoid* hisa_instances[] = {{ (void*)&{expr} }};\n"
    (tmp_path / "unit.cu").write_text(src)
    options = list(cupy_backend._COMPILE_OPTIONS) + ["-arch=sm_90a"]
    for kind in ("ptx", "cubin"):
        proc = subprocess.run([_nvcc(), *options, f"-{kind}", "unit.cu", "-o", f"unit.{kind}"], cwd=tmp_path,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    stem = expr.split("<")[0]
    ptx = _function((tmp_path / "unit.ptx").read_text(), r"\.visible \.entry ", stem)
    proc = subprocess.run([_nvdisasm(), "-c", "unit.cubin"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sass = _function(proc.stdout, r"//-+ \.text\.", stem)
    relus = ptx.count("max.NaN.f32")
    assert relus >= 128, f"{expr}: {relus} relus in the PTX (the head sums' count changed?)"
    assert len(re.findall(r"\bFMNMX\b", sass)) == relus, f"{expr}: ptxas dropped relus of the head sums"
