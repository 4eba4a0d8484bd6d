"""The package builds as a wheel that holds the CUDA sources and both subpackages, and the
installed package finds its kernels. (pyproject maps hisa_cupy.kernels <- kernels/ and
hisa_cupy.adapters <- adapters/ and ships kernels/cuda/*.cu / *.cuh as package data.)"""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
             "results"}


def _source_cuda_files():
    files = sorted(p.name for p in (ROOT / "kernels" / "cuda").glob("*.cu"))
    assert files, "kernels/cuda/ holds no .cu file"
    return files


def _copy_tree(dst: Path) -> Path:
    """Copy the source tree (without build outputs and virtual environments) so that the build
    writes its build/ and egg-info into a temporary directory, not into the checkout."""
    def ignore(directory, names):
        return [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")]

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_tree(tmp / "src")
    out = tmp / "dist"
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
               str(src)]
    else:  # pip can build it too
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--wheel-dir", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out.glob("hisa_cupy-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_cuda_sources_and_subpackages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for cu in _source_cuda_files():
        assert f"hisa_cupy/kernels/cuda/{cu}" in names, cu
    for cuh in sorted(p.name for p in (ROOT / "kernels" / "cuda").glob("*.cuh")):
        assert f"hisa_cupy/kernels/cuda/{cuh}" in names, cuh
    for module in ("hisa_cupy/__init__.py", "hisa_cupy/__main__.py", "hisa_cupy/reference.py",
                   "hisa_cupy/workloads.py", "hisa_cupy/kernels/__init__.py",
                   "hisa_cupy/adapters/__init__.py"):
        assert module in names, module
    for py in (ROOT / "kernels").glob("*.py"):
        assert f"hisa_cupy/kernels/{py.name}" in names, py.name
    for py in (ROOT / "adapters").glob("*.py"):
        assert f"hisa_cupy/adapters/{py.name}" in names, py.name
    # Nothing outside the package namespace (no stray top-level kernels/ or tests/).
    top = {n.split("/")[0] for n in names}
    assert top <= {"hisa_cupy"} | {n for n in top if n.endswith(".dist-info")}, top


def test_installed_wheel_imports_and_finds_kernels(wheel, tmp_path):
    """Unpack the wheel into a fresh directory and import from there in a subprocess."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import sys, pathlib; sys.path.insert(0, sys.argv[1]);"
        "import hisa_cupy, hisa_cupy.kernels, hisa_cupy.adapters;"
        "root = pathlib.Path(sys.argv[1]).resolve();"
        "assert pathlib.Path(hisa_cupy.__file__).resolve().is_relative_to(root), hisa_cupy.__file__;"
        "cuda = pathlib.Path(hisa_cupy.kernels.__file__).parent / 'cuda';"
        "print(' '.join(sorted(p.name for p in cuda.glob('*.cu'))))"
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == _source_cuda_files()


def test_installed_package_kernels_dir_has_cuda_sources():
    import hisa_cupy.adapters
    import hisa_cupy.kernels

    cuda = Path(hisa_cupy.kernels.__file__).parent / "cuda"
    found = sorted(p.name for p in cuda.glob("*.cu"))
    assert found and set(_source_cuda_files()) <= set(found)
    assert Path(hisa_cupy.adapters.__file__).parent.name in ("adapters",)
