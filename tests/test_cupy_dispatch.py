"""The CuPy backend's host-side dispatch, without a GPU: which kernel instances a call launches,
with which grid and shared memory, how rows are chunked and when the fp8 keys are copied to f16.

A NumPy stand-in plays CuPy (arrays with ``.data.ptr``, a device with a chosen compute
capability) and every launch is recorded instead of run, so these tests pin the engine choice of
docs/internals.md ("Engine choice") on every architecture; the kernels themselves are tested on a
GPU (tests/gpu).
"""
import types

import numpy as np
import pytest

from hisa_cupy.kernels import cupy_backend as cb


class _Arr(np.ndarray):
    """NumPy array with CuPy's ``.data.ptr``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _arr(shape, dtype):
    return np.zeros(shape, dtype).view(_Arr)


class _Fake:
    """Recording stand-in for CuPy and the compiled kernels on a device of capability ``cc``."""

    def __init__(self, monkeypatch, cc, smem_optin=227 * 1024):
        self.launches = []
        self.opt_in = {}
        device = types.SimpleNamespace(id=0)
        cuda = types.SimpleNamespace(Device=lambda *a: device,
                                     get_current_stream=lambda: types.SimpleNamespace(ptr=0))
        fake_cupy = types.SimpleNamespace(cuda=cuda, empty=lambda shape, dtype: _arr(shape, dtype))
        monkeypatch.setattr(cb, "_cupy", lambda: fake_cupy)
        monkeypatch.setattr(cb, "_device_facts", lambda device_id: {"cc": cc, "smem_optin": smem_optin,
                                                                     "sms": 132})
        monkeypatch.setattr(cb, "_workspaces", {})
        monkeypatch.setattr(cb, "_smem_opted_in", {})
        self_ = self

        class _Fn:
            def __init__(self, filename, name):
                self.name, self.ptr = name, hash((filename, name))

            def __call__(self, grid, block, args, shared_mem=0):
                self_.launches.append(types.SimpleNamespace(name=self.name, grid=grid, block=block,
                                                            args=args, smem=shared_mem))

        monkeypatch.setattr(cb, "_function", lambda filename, name, device_id: _Fn(filename, name))
        from cupy_backends.cuda.api import driver

        monkeypatch.setattr(driver, "funcSetAttribute",
                            lambda ptr, attr, value: self_.opt_in.__setitem__(ptr, value))

    def names(self):
        return [launch.name for launch in self.launches]


def _hisa(T=64, S=4096, H=64, D=128, m=8, topk=512, qdt=np.uint8, kdt=np.uint8):
    q, k = _arr((T, H, D), qdt), _arr((S, D), kdt)
    w, ksc, out = _arr((T, H), np.float32), _arr((S,), np.float32), _arr((T, topk), np.int32)
    cb.hisa_select(q, k, w, ksc, None, None, block_size=128, block_topk=m, topk=topk, pool_dtype="bfloat16",
                   index_base="relative", order="position", out=out, stream=0)
    return out


def test_hopper_fp8_goes_to_f16_wgmma_with_union_pairs(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=65)
    assert fake.names() == ["pool_kernel<0, 1>", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>",
                            "block_topm_kernel", "e4m3_to_f16_kernel",
                            "refine_union_wgmma_kernel<2, 0, 2, 64, 128>", "refine_topk_kernel"]
    union = fake.launches[4]
    assert union.grid == (1, 33) and union.block == (cb.SCORE_THREADS,)  # 65 rows in pairs
    assert union.smem == cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 8) > 48 * 1024
    assert fake.opt_in  # above 48 KB the kernel was opted in


def test_fp8_tensor_accumulate_keeps_fp8_operands(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "FP8_TENSOR_ACCUMULATE", True)
    _hisa()
    assert "e4m3_to_f16_kernel" not in fake.names()
    assert "refine_union_wgmma_kernel<3, 0, 0, 64, 128>" in fake.names()


@pytest.mark.parametrize("cc,engine", [(80, cb.ENGINE_BF16), (89, cb.ENGINE_E4M3)])
def test_other_architectures_use_mma_sync(monkeypatch, cc, engine):
    fake = _Fake(monkeypatch, cc=cc)
    _hisa()
    assert not any("wgmma" in n or "e4m3_to_f16" in n for n in fake.names())
    assert f"refine_score_kernel<{engine}, 0, 0, 64, 128>" in fake.names()


def test_wgmma_needs_d128(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    _hisa(D=64)
    assert not any("wgmma" in n or "e4m3_to_f16" in n for n in fake.names())
    assert "refine_score_kernel<3, 0, 0, 64, 64>" in fake.names()


def test_large_f16_copy_falls_back_to_mma_sync(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "F16_KEYS_MAX_BYTES", 4096 * 128 * 2 - 1)  # one byte short of the copy
    _hisa(S=4096)
    assert "e4m3_to_f16_kernel" not in fake.names()
    assert "refine_score_kernel<3, 0, 0, 64, 128>" in fake.names()


def test_union_only_where_its_shared_memory_fits(monkeypatch):
    fake = _Fake(monkeypatch, cc=90, smem_optin=cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 8) - 1)
    _hisa(m=8)
    assert "refine_score_wgmma_kernel<2, 0, 2, 64, 128>" in fake.names()
    assert not any("union" in n for n in fake.names())


def test_refine_row_chunks_bound_the_candidate_workspace(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    T, m = 70, 8
    n = m * 128
    monkeypatch.setattr(cb, "REFINE_WORKSPACE_BYTES", 16 * n * 4 + 8)  # 16 rows of candidates
    _hisa(T=T, m=m)
    scores = [x for x in fake.launches if x.name.startswith("refine_union")]
    topks = [x for x in fake.launches if x.name == "refine_topk_kernel"]
    assert len(scores) == len(topks) == 5  # 16 + 16 + 16 + 16 + 6 rows
    row0 = [int(x.args[11]) for x in scores]
    nrows = [int(x.args[12]) for x in scores]
    assert row0 == [0, 16, 32, 48, 64] and nrows == [16, 16, 16, 16, 6]
    assert [x.grid[0] for x in topks] == nrows  # one top-k CTA per row of the chunk
    # every chunk reuses one [16, m * B] candidate buffer
    assert len({int(x.args[13]) for x in scores}) == 1
    assert cb._workspaces[(0, 0)]._bufs["cand_keys"].nbytes == 16 * n * 4


def test_dense_uses_the_f16_copy_on_hopper(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    T, S = 8, 1000
    q, k = _arr((T, 64, 128), np.uint8), _arr((S, 128), np.uint8)
    out = _arr((T, 64), np.int32)
    cb.dense_select(q, k, _arr((T, 64), np.float32), None, None, None, topk=64, index_base="relative",
                    order="position", out=out, stream=0)
    assert fake.names() == ["e4m3_to_f16_kernel", "dense_score_wgmma_kernel<2, 0, 2, 64, 128, 2>",
                            "dense_topk_kernel"]


def test_target_arch():
    assert cb.target_arch(90) == "sm_90a"  # wgmma needs the architecture-specific target
    assert cb.target_arch(80, (75, 80, 90)) == "sm_80"
    assert cb.target_arch(89) == "sm_89"
    assert cb.target_arch(120, (80, 90, 100)) == "compute_100"  # newer than NVRTC: PTX, JIT by the driver


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HISA_CUPY_CACHE_DIR", str(tmp_path))
    assert cb.cache_dir() == str(tmp_path)
    monkeypatch.delenv("HISA_CUPY_CACHE_DIR")
    assert cb.cache_dir().endswith("hisa_cupy")
