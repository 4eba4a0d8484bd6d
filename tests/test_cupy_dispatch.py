"""The CuPy backend's host-side dispatch, without a GPU: which kernel instances a call launches,
with which grid and shared memory, how rows are chunked and when the fp8 keys are copied to f16.

A NumPy stand-in plays CuPy (arrays with ``.data.ptr``, a device with a chosen compute
capability) and every launch is recorded instead of run, so these tests pin the engine choice of
docs/internals.md ("Engine choice") on every architecture; the kernels themselves are tested on a
GPU (tests/gpu).
"""
import ctypes
import pathlib
import types

import numpy as np
import pytest

from hisa_cupy.kernels import cupy_backend as cb

from fake_arrays import pointer_array  # tests/fake_arrays.py
from fake_nvrtc import install_fake_nvrtc  # tests/fake_nvrtc.py


def _value(arg):
    """The integer a launch argument holds: NumPy scalar, CuPy CScalar or CIntptr (an address)."""
    if isinstance(arg, (int, np.integer)):
        return int(arg)
    if hasattr(arg, "value"):  # CScalar
        return int(arg.value)
    return ctypes.c_int64.from_address(arg.ptr).value  # CIntptr: ptr is the address of its intptr_t


class _Fake:
    """Recording stand-in for CuPy and the compiled kernels on a device of capability ``cc``."""

    def __init__(self, monkeypatch, cc, smem_optin=227 * 1024):
        self.launches = []
        self.opt_in = {}
        device = types.SimpleNamespace(id=0)
        cuda = types.SimpleNamespace(Device=lambda *a: device,
                                     runtime=types.SimpleNamespace(getDevice=lambda: 0),
                                     get_current_stream=lambda: types.SimpleNamespace(ptr=0))
        fake_cupy = types.SimpleNamespace(cuda=cuda, empty=lambda shape, dtype: pointer_array(shape, dtype),
                                         zeros=lambda shape, dtype: pointer_array(shape, dtype))
        self.cupy = fake_cupy
        monkeypatch.setattr(cb, "_cupy", lambda: fake_cupy)
        monkeypatch.setattr(cb, "_device_facts", lambda device_id: {"cc": cc, "smem_optin": smem_optin,
                                                                     "sms": 132})
        monkeypatch.setattr(cb, "_workspaces", {})
        monkeypatch.setattr(cb, "_smem_opted_in", {})
        monkeypatch.setattr(cb, "_kernels", {})  # kernels and plans of the device this fake plays
        monkeypatch.setattr(cb, "_plans", {})
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
        # three CTAs per SM, as the union kernel gets on an H100 / H200 at m <= 64
        monkeypatch.setattr(driver, "occupancyMaxActiveBlocksPerMultiprocessor", lambda ptr, threads, smem: 3)

    def names(self):
        return [launch.name for launch in self.launches]


def _hisa(T=64, S=4096, H=64, D=128, m=8, topk=512, qdt=np.uint8, kdt=np.uint8, order="position", B=128):
    q, k = pointer_array((T, H, D), qdt), pointer_array((S, D), kdt)
    w, ksc, out = pointer_array((T, H), np.float32), pointer_array((S,), np.float32), pointer_array((T, topk), np.int32)
    cb.hisa_select(q, k, w, ksc, None, None, block_size=B, block_topk=m, topk=topk, pool_dtype="bfloat16",
                   index_base="relative", order=order, out=out, stream=0)
    return out


def test_hopper_fp8_goes_to_f16_wgmma_with_union_pairs(monkeypatch):
    # the f16 engine reads the e4m3 keys as they are (converted in registers: no copy launched)
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=65)
    assert fake.names() == ["pool_vec_kernel<0, 1, 128>", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>",
                            "block_topm_warp_kernel<8>", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>",
                            "refine_topk_warp_kernel"]
    union = fake.launches[3]
    # 65 rows in 33 pairs, each pair's union split over a few CTAs (few pairs here: 4), one CTA per
    # share in a 1-D grid (its layout: every pair in the head, 4 shares each)
    assert union.grid == (4 * 33, 1) and union.block == (cb.SCORE_THREADS,)
    assert [_value(a) for a in union.args[-5:-2]] == [33, 4, 4]
    # no ready flags: the refine top-k is in warp mode here (rows of 1024 candidates in position order)
    assert [_value(a) for a in union.args[-2:]] == [0, 0]
    assert union.smem == cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 8, kdt=cb.DT_E4M3) > 48 * 1024
    assert fake.opt_in  # above 48 KB the kernel was opted in


@pytest.mark.parametrize("B, knob, tile_map", [(128, True, True), (128, False, False), (64, True, False),
                                               (256, True, False)])
def test_union_tile_map_where_a_tile_is_a_block(monkeypatch, B, knob, tile_map):
    # the union kernel's per-tile map (refine.cu TILE_MAP) where a score tile is one block (B = 128)
    # and UNION_TILE_MAP is on; its per-item map elsewhere: blocks of half a tile or of two tiles
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "UNION_TILE_MAP", knob)
    _hisa(T=65, S=8192, m=16 * 128 // B, topk=512, B=B)
    assert fake.names()[3] == f"refine_union_wgmma_kernel<2, 0, 0, 64, 128{', true' if tile_map else ''}>"


@pytest.mark.parametrize("setting", ["on", "off", "many-waves"])
def test_union_ready_flags_wiring(monkeypatch, setting):
    # UNION_READY (the refine top-k in register mode: rows of 2048 candidates by score): the block
    # top-m gets the workspace's epoch word as its last argument, the union kernel its flags (the
    # word after it) and the same epoch, and the refine top-k (its ready twin) the flags, the epoch
    # and the union launch's layout after the select parameters. Off, or a union launch of
    # UNION_READY_MAX_WAVES waves or more (here its 132 CTAs: a third of a wave of 396): null
    # pointers and the plain register-mode top-k
    fake = _Fake(monkeypatch, cc=90)
    ready = setting == "on"
    monkeypatch.setattr(cb, "UNION_READY", setting != "off")
    if setting == "many-waves":
        monkeypatch.setattr(cb, "UNION_READY_MAX_WAVES", 132 / 396)
    _hisa(T=65, m=16, topk=512, order="score")
    assert fake.names()[2:] == ["block_topm_warp_kernel<8>", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>",
                                "refine_topk_ready_regs_kernel" if ready else "refine_topk_regs_kernel"]
    topm, union, top = fake.launches[2:]
    epoch = _value(topm.args[-1])
    assert [_value(a) for a in union.args[-2:]] == ([epoch + 4, epoch] if ready else [0, 0])
    layout = [_value(a) for a in union.args[-5:-2]]
    if ready:
        assert epoch != 0 and [_value(a) for a in top.args[-5:]] == [epoch + 4, epoch] + layout
        ws = cb.workspace(0)
        flags = ws.get("union_ready", (1 + union.grid[0],), np.uint32, zeroed=True)
        assert flags.data.ptr == epoch  # one zeroed buffer: the epoch, then one flag per union CTA
    else:
        assert epoch == 0


@pytest.mark.parametrize("T,S,expect", [(1024, 131072, True), (1024, 32768, True), (2048, 131072, False),
                                         (4096, 131072, False), (4096, 32768, False)])
def test_union_ready_by_the_union_launch_waves(monkeypatch, T, S, expect):
    # the default UNION_READY_MAX_WAVES on an H200's 132 SMs at three union CTAs each: the flags at
    # T = 1024 (3.4 waves with the fine tail), not at T = 2048 (3.9) or 4096 (7.3), where they measured
    # slower (bench/NOTES.md, session 47)
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=T, S=S, m=64, topk=2048, order="score")
    top = fake.names()[-1]
    assert top == ("refine_topk_ready_regs_kernel" if expect else "refine_topk_regs_kernel"), (T, S, fake.names())


def test_block_topm_records_the_pairs_unions_for_the_union_kernel(monkeypatch):
    # the warp-mode block top-m gets a records buffer (33 pairs of 4 + 6 m ints) and the grouped
    # order (fp8 keys: the union kernel's SPLIT_ROWS); the union kernel's records argument is the same
    # buffer. With PAIR_RECORDS off both get a null pointer (the union kernel merges the lists)
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=65, m=8)
    topm, union = fake.launches[2], fake.launches[3]
    records = _value(topm.args[-4])
    assert records != 0 and _value(topm.args[-3]) == 1 and _value(topm.args[-5]) == 65
    assert _value(union.args[-6]) == records and len(union.args) == 22
    ws = cb.workspace(0)
    assert ws.get("pair_unions", (33, cb.PAIR_RECORD_HEAD + 6 * 8), np.int32).data.ptr == records
    fake.launches.clear()
    monkeypatch.setattr(cb, "PAIR_RECORDS", False)
    _hisa(T=65, m=8)
    topm, union = fake.launches[2], fake.launches[3]
    assert _value(topm.args[-4]) == 0 and _value(union.args[-6]) == 0
    # 16-bit keys: the union kernel orders a pair's union by block, not by group
    fake.launches.clear()
    monkeypatch.setattr(cb, "PAIR_RECORDS", True)
    _hisa(T=65, m=8, qdt=np.float16, kdt=np.float16)
    topm, union = fake.launches[2], fake.launches[3]
    assert union.name.startswith("refine_union_wgmma_kernel<2, 2, 2,")
    assert _value(topm.args[-4]) != 0 and _value(topm.args[-3]) == 0 and _value(union.args[-6]) == _value(topm.args[-4])


def test_block_topm_triggers_the_union_launch_by_its_waves(monkeypatch):
    # block_topm_warp_kernel's last argument (`early`): 1 where the union launch after it has at
    # least TOPM_TRIGGER_WAVES waves, 0 where it has fewer or the knob is 0 (never). The default
    # (5.0) triggers at T = 4096 (2881 CTAs over 132 SMs x 3 slots: 7.3 waves), not at T = 2048
    # (1552: 3.9 waves) or 1024 (1345: 3.4), where the trigger measured slower on an H200
    fake = _Fake(monkeypatch, cc=90)
    for T, early in ((1024, 0), (2048, 0), (4096, 1)):
        fake.launches.clear()
        _hisa(T=T, S=32768, m=64, topk=2048)
        topm, union = fake.launches[2], fake.launches[3]
        assert union.grid == ({1024: 1345, 2048: 1552, 4096: 2881}[T], 1)
        assert _value(topm.args[-2]) == early, T
    # 33 pairs x 4 shares = 132 CTAs: a third of a wave (at least that many waves: exactly a third)
    for waves, early in ((0.0, 0), (0.3, 1), (132 / 396, 1), (0.4, 0), (1.0, 0)):
        monkeypatch.setattr(cb, "TOPM_TRIGGER_WAVES", waves)
        fake.launches.clear()
        _hisa(T=65, m=8)
        topm, union = fake.launches[2], fake.launches[3]
        assert topm.name.startswith("block_topm_warp_kernel") and union.grid == (132, 1)
        assert _value(topm.args[-2]) == early, waves


def test_union_splits(monkeypatch):
    # about 12 CTAs per SM, 2 to 4 per pair; a set knob wins
    assert [cb._union_splits(p, 132) for p in (2048, 1024, 512, 256, 8)] == [2, 2, 3, 4, 4]
    assert cb._union_splits(4096, 132) == 2
    monkeypatch.setattr(cb, "UNION_SPLITS", 1)
    assert cb._union_splits(8, 132) == 1


def test_union_layout(monkeypatch):
    # without the fine tail (test_union_fine_tail): where the pairs fill a wave of CTAs (396 slots
    # here), whole pairs first and the last pairs in shorter shares, as the makespan model picks: at
    # 512 and 2048 pairs the layouts that measured fastest on an H200 in session 30; fewer pairs
    # than slots keep the uniform split
    monkeypatch.setattr(cb, "UNION_FINE_TAIL_SPLITS", 0)
    assert cb._union_layout(512, 132, 396) == (380, 1, 3)
    assert cb._union_layout(2048, 132, 396) == (1949, 1, 4)
    assert cb._union_layout(200, 132, 396) == (200, 4, 4)
    for pairs in (396, 512, 700, 1024, 2048, 4096, 9999):  # never later than the uniform split in the model
        u = cb._union_splits(pairs, 132)
        assert cb._union_makespan(pairs, cb._union_layout(pairs, 132, 396), 396) <= cb._union_makespan(
            pairs, (pairs, u, u), 396)
    # the model: 396 slots, 512 whole pairs of cost 1.05: 396 end at 1.05, 116 more at 2.1
    assert cb._union_makespan(512, (512, 1, 1), 396) == pytest.approx(2.1)
    assert cb._union_makespan(512, (0, 1, 2), 396) == pytest.approx(3 * 0.55)  # 1024 halves: 3 rounds
    # the knobs: uniform, a set UNION_SPLITS, or a set tail
    monkeypatch.setattr(cb, "UNION_LAYOUT", "uniform")
    assert cb._union_layout(512, 132, 396) == (512, 3, 3)
    monkeypatch.setattr(cb, "UNION_LAYOUT", "model")
    monkeypatch.setattr(cb, "UNION_SPLITS", 2)
    assert cb._union_layout(512, 132, 396) == (512, 2, 2)
    monkeypatch.setattr(cb, "UNION_TAIL_SPLITS", 6)
    assert cb._union_layout(512, 132, 396) == (512 - 66, 2, 6)
    monkeypatch.setattr(cb, "UNION_TAIL_WAVES", 0.5)
    assert cb._union_layout(512, 132, 396) == (512 - 33, 2, 6)
    assert cb._union_layout(20, 132, 396) == (0, 2, 6)  # fewer pairs than the tail: all of them
    # a launch: the layout's three integers after the records, one CTA per share in a 1-D grid
    monkeypatch.setattr(cb, "UNION_SPLITS", 0)
    monkeypatch.setattr(cb, "UNION_TAIL_SPLITS", 0)
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=1024, S=16384, m=16)
    union = fake.launches[3]
    assert [_value(a) for a in union.args[-5:-2]] == [380, 1, 3] and union.grid == (380 + 132 * 3, 1)
    monkeypatch.setattr(cb, "UNION_FINE_TAIL_SPLITS", 8)  # the default: the fine tail
    fake.launches.clear()
    _hisa(T=1024, S=16384, m=16)
    union = fake.launches[3]
    assert [_value(a) for a in union.args[-5:-2]] == [393, 1, 8] and union.grid == (393 + 119 * 8, 1)


def test_block_score_half_form(monkeypatch):
    # BLOCK_SCORE_HALF = 2 (the default): block_score_wgmma_kernel's HALF form (one more template
    # argument, 2 x 64 rows x 256 bytes less shared memory) where a CTA scores at most 4 key tiles
    # and the launch fills two waves of three CTAs per SM (792 CTAs on 132 SMs): T = 4096 at 32K keys
    # (2 tiles per CTA, 2048 CTAs) and 64K (4 tiles), not 128K (8 tiles) nor T = 512 at 32K (256 CTAs)
    fake = _Fake(monkeypatch, cc=90)
    assert cb.BLOCK_SCORE_HALF == 2 and cb.BLOCK_SCORE_HALF_MAX_TILES == 4
    full = cb._wgmma_smem(cb.ENGINE_BF16, 64, 128, 2)
    for S, T, half in ((32768, 4096, True), (65536, 4096, True), (131072, 4096, False), (32768, 512, False),
                       (32768, 1584, True), (32768, 1582, False)):
        fake.launches.clear()
        _hisa(T=T, S=S, m=16)
        blocks = fake.launches[1]
        expect = "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2" + (", 1>" if half else ">")
        assert blocks.name == expect, (S, T)
        assert blocks.smem == (full - 2 * 64 * 256 if half else full)
    # the rule itself: the tiles, the waves (boundaries included), the knob's modes, the forms it
    # does not apply to (fp8 pooled keys on the register-A path, N = 64, the mma.sync engine)
    bf16 = (cb.ENGINE_BF16, cb.DT_BF16)
    assert cb._block_score_half(*bf16, 2, 64, 4, 792, 132)
    assert not cb._block_score_half(*bf16, 2, 64, 5, 4096, 132)
    assert not cb._block_score_half(*bf16, 2, 64, 4, 791, 132)
    assert cb._block_score_half(cb.ENGINE_F16, cb.DT_F16, 1, 128, 1, 792, 132)
    assert not cb._block_score_half(cb.ENGINE_F16, cb.DT_E4M3, 2, 64, 1, 4096, 132)
    assert not cb._block_score_half(*bf16, 2, 32, 1, 4096, 132)
    assert not cb._block_score_half(*bf16, 0, 64, 1, 4096, 132)
    assert not cb._block_score_half(cb.ENGINE_E4M3, cb.DT_E4M3, 2, 64, 1, 4096, 132)
    monkeypatch.setattr(cb, "BLOCK_SCORE_HALF", 1)
    assert cb._block_score_half(*bf16, 2, 64, 8, 100, 132)
    monkeypatch.setattr(cb, "BLOCK_SCORE_HALF", 0)
    assert not cb._block_score_half(*bf16, 2, 64, 1, 4096, 132)
    # the form's name and shared memory come from one place, and only for the wgmma engine
    choice = (cb.ENGINE_BF16, 2, cb.DT_BF16, cb.DT_BF16)
    assert cb._score_instance_of("block_score_kernel", choice, 64, 128, True, half=True) == (
        "block_score_wgmma_kernel<1, 1, 1, 64, 128, 2, 1>", full - 2 * 64 * 256, 2)
    with pytest.raises(ValueError, match="HALF"):
        cb._score_instance_of("block_score_kernel", (cb.ENGINE_BF16, 0, cb.DT_BF16, cb.DT_BF16), 64, 128, True,
                              half=True)


def test_union_fine_tail(monkeypatch):
    # the last round(0.3 * slots) pairs (119 of 396 slots) in 8 shares, the others whole, where the
    # whole pairs fill their last wave at least 3/4: 393 of 396 at 512 pairs, 4.87 waves at 2048,
    # exactly one wave at 515 and two of 264 slots at 607. Not at 1024 pairs (2.29 waves: 113 whole
    # pairs would end a pair's time after the rest), 4096 (10.04 waves), 512 pairs over 264 slots
    # (1.64) or fewer pairs than slots: the model's layout stays
    assert cb.UNION_FINE_TAIL_SPLITS == 8 and cb.UNION_FINE_TAIL_PAIRS == 0.3
    assert cb._union_layout(512, 132, 396) == (393, 1, 8)
    assert cb._union_layout(2048, 132, 396) == (1929, 1, 8)
    assert cb._union_layout(515, 132, 396) == (396, 1, 8)
    assert cb._union_layout(607, 132, 264) == (528, 1, 8)
    for pairs, slots in ((1024, 396), (4096, 396), (512, 264), (395, 396), (200, 396)):
        assert cb._union_fine_tail(pairs, slots) is None
        monkeypatch.setattr(cb, "UNION_FINE_TAIL_SPLITS", 0)
        model = cb._union_layout(pairs, 132, slots)
        monkeypatch.setattr(cb, "UNION_FINE_TAIL_SPLITS", 8)
        assert cb._union_layout(pairs, 132, slots) == model
    # its knobs, and the layout knobs that take precedence over it
    monkeypatch.setattr(cb, "UNION_FINE_TAIL_SPLITS", 6)
    assert cb._union_layout(512, 132, 396) == (393, 1, 6)
    monkeypatch.setattr(cb, "UNION_FINE_TAIL_PAIRS", 0.35)
    assert cb._union_layout(512, 132, 396) == (373, 1, 6)  # 139 tail pairs
    monkeypatch.setattr(cb, "UNION_FINE_TAIL_PAIRS", 0.25)  # 99: 413 whole pairs, 1.04 waves
    assert cb._union_layout(512, 132, 396) == (380, 1, 3)
    monkeypatch.setattr(cb, "UNION_LAYOUT", "uniform")
    assert cb._union_layout(512, 132, 396) == (512, 3, 3)
    monkeypatch.setattr(cb, "UNION_LAYOUT", "model")
    monkeypatch.setattr(cb, "UNION_TAIL_SPLITS", 4)
    assert cb._union_layout(512, 132, 396) == (512 - 99, 3, 4)
    monkeypatch.setattr(cb, "UNION_TAIL_SPLITS", 0)
    monkeypatch.setattr(cb, "UNION_SPLITS", 2)
    assert cb._union_layout(512, 132, 396) == (512, 2, 2)


def test_fp8_key_tiles_take_half_the_shared_memory():
    # the register-A path keeps e4m3 key tiles (128 x D bytes each, 2 buffers) beside the f16 q
    f16 = cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 64, kdt=cb.DT_F16)
    fp8 = cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 64, kdt=cb.DT_E4M3)
    assert f16 - fp8 == 2 * cb.SCORE_TILE * 128
    assert 3 * (fp8 + 1024) <= 228 * 1024  # three union CTAs fit on an H100 / H200 SM


def test_fp8_tensor_accumulate_keeps_fp8_operands(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "FP8_TENSOR_ACCUMULATE", True)
    _hisa()
    assert "refine_union_wgmma_kernel<3, 0, 0, 64, 128>" in fake.names()


@pytest.mark.parametrize("cc,engine", [(80, cb.ENGINE_BF16), (89, cb.ENGINE_E4M3)])
def test_other_architectures_use_mma_sync(monkeypatch, cc, engine):
    fake = _Fake(monkeypatch, cc=cc)
    _hisa()
    assert not any("wgmma" in n for n in fake.names())
    assert f"refine_score_kernel<{engine}, 0, 0, 64, 128>" in fake.names()


def test_wgmma_needs_d128(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    _hisa(D=64)
    assert not any("wgmma" in n for n in fake.names())
    assert "refine_score_kernel<3, 0, 0, 64, 64>" in fake.names()



def test_union_only_where_its_shared_memory_fits(monkeypatch):
    fake = _Fake(monkeypatch, cc=90, smem_optin=cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, 8, kdt=cb.DT_E4M3) - 1)
    _hisa(m=8)
    assert "refine_score_wgmma_kernel<2, 0, 0, 64, 128>" in fake.names()
    assert not any("union" in n for n in fake.names())


def test_refine_row_chunks_bound_the_candidate_workspace(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    T, m = 70, 8
    n = m * 128
    monkeypatch.setattr(cb, "REFINE_WORKSPACE_BYTES", 16 * n * 4 + 8)  # 16 rows of candidates
    monkeypatch.setattr(cb, "WARP_SELECT", False)  # one top-k CTA per row (warp mode: 4 rows per CTA)
    _hisa(T=T, m=m)
    scores = [x for x in fake.launches if x.name.startswith("refine_union")]
    topks = [x for x in fake.launches if x.name == "refine_topk_regs_kernel"]  # rows of 1024 <= 8192 items
    assert len(scores) == len(topks) == 5  # 16 + 16 + 16 + 16 + 6 rows
    row0 = [_value(x.args[11]) for x in scores]
    nrows = [_value(x.args[12]) for x in scores]
    assert row0 == [0, 16, 32, 48, 64] and nrows == [16, 16, 16, 16, 6]
    assert [x.grid[0] for x in topks] == nrows  # one top-k CTA per row of the chunk
    # every chunk reuses one [16, m * B] candidate buffer
    assert len({_value(x.args[13]) for x in scores}) == 1
    assert cb._workspaces[(0, 0)]._bufs["cand_keys"].nbytes == 16 * n * 4


def test_dense_fp8_on_the_f16_wgmma_engine(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    T, S = 8, 1000
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    out = pointer_array((T, 64), np.int32)
    cb.dense_select(q, k, pointer_array((T, 64), np.float32), None, None, None, topk=64, index_base="relative",
                    order="position", out=out, stream=0)
    assert fake.names() == ["dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>", "dense_topk_warp_kernel"]
    assert fake.launches[0].smem == cb._wgmma_smem(cb.ENGINE_F16, 64, 128, 2, kdt=cb.DT_E4M3)


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


# ---------------------------------------------------------------------------------- host path


def test_launch_arguments_are_cupy_c_values(monkeypatch):
    # every argument reaches CuPy's launch in its C form (nothing left for CuPy to convert per
    # launch) and holds the value the kernel expects
    CPointer = pytest.importorskip("cupy.cuda.function").CPointer
    fake = _Fake(monkeypatch, cc=90)
    T, S = 65, 4096
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    w, ksc, out = pointer_array((T, 64), np.float32), pointer_array((S,), np.float32), pointer_array((T, 512), np.int32)
    cb.hisa_select(q, k, w, ksc, None, None, block_size=128, block_topk=8, topk=512, pool_dtype="bfloat16",
                   index_base="relative", order="position", out=out, stream=0)
    for launch in fake.launches:
        assert all(isinstance(a, CPointer) for a in launch.args), launch.name
    pool = fake.launches[0]
    assert [_value(a) for a in pool.args] == [k.data.ptr, ksc.data.ptr, S, 128, 128, _value(pool.args[5]), 0]
    union = fake.launches[3]
    assert union.name.startswith("refine_union")
    assert [_value(a) for a in union.args[:3]] == [q.data.ptr, k.data.ptr, w.data.ptr]  # e4m3 keys as they are
    assert [_value(a) for a in union.args[7:13]] == [T, S, 128, 8, 0, T]  # T, S, B, m, row0, rows


def test_int_and_pointer_arguments():
    assert cb._i32(7) is cb._i32(7)  # made once per value
    assert _value(cb._i32(-3)) == -3 and _value(cb._i64(1 << 40)) == 1 << 40
    with pytest.raises(OverflowError):
        cb._i32(1 << 31)
    a = pointer_array((4, 4), np.float32)
    assert _value(cb._ptr(a)) == a.data.ptr and _value(cb._ptr(None)) == 0
    assert _value(cb._ptr_at(a, 8)) == a.data.ptr + 8 and _value(cb._ptr_at(None, 8)) == 0
    assert _value(cb._addr(np.uint64(a.data.ptr))) == a.data.ptr


def test_repeated_calls_reuse_plans_and_kernels(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    built, loaded = [], []
    plan, function = cb._refine_plan, cb._function
    monkeypatch.setattr(cb, "_refine_plan", lambda *a: built.append(a) or plan(*a))
    monkeypatch.setattr(cb, "_function", lambda *a: loaded.append(a) or function(*a))
    _hisa(T=65)
    first = [(x.name, x.grid, x.smem) for x in fake.launches]
    fake.launches.clear()
    _hisa(T=65)
    assert [(x.name, x.grid, x.smem) for x in fake.launches] == first
    assert len(built) == 1 and len(loaded) == len(first)  # planned and loaded once
    _hisa(T=33)  # another shape: its own plan
    assert len(built) == 2


def test_plans_follow_the_knobs(monkeypatch):
    # the knobs are part of every plan key: flipping one at run time takes effect at once
    fake = _Fake(monkeypatch, cc=90)
    _hisa()
    assert any("union" in n for n in fake.names())
    for use_union, expect in ((False, False), (True, True)):
        fake.launches.clear()
        monkeypatch.setattr(cb, "USE_UNION_PAIRS", use_union)
        _hisa()
        assert any("union" in n for n in fake.names()) == expect
    fake.launches.clear()
    monkeypatch.setattr(cb, "USE_WGMMA", False)
    _hisa()
    assert not any("wgmma" in n for n in fake.names())


def test_score_ctas_per_sm_sets_the_block_stage_split(monkeypatch):
    # 128K keys = 1024 blocks = 8 tiles per pair of rows, T = 1024 (512 pairs) on 132 SMs: aiming
    # at 8 CTAs per SM gives 3 tiles per CTA (3 CTAs per pair); at 1 or 2 (the default), one CTA
    # takes all 8; at 4 the 7 tiles a CTA could take become 4 + 4 (two CTAs, evenly)
    fake = _Fake(monkeypatch, cc=90)
    assert cb.SCORE_CTAS_PER_SM == 2
    for per_sm, grid, tpc in ((8, (3, 512), 3), (4, (2, 512), 4), (2, (1, 512), 8), (1, (1, 512), 8)):
        monkeypatch.setattr(cb, "SCORE_CTAS_PER_SM", per_sm)
        fake.launches.clear()
        _hisa(T=1024, S=131072, m=64, topk=2048)
        blocks = fake.launches[1]
        assert blocks.name.startswith("block_score_wgmma_kernel") and blocks.grid == grid
        assert _value(blocks.args[-1]) == tpc


def test_device_follows_the_current_device(monkeypatch):
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(fake.cupy.cuda.runtime, "getDevice", lambda: 3)
    _hisa()
    assert list(cb._workspaces) == [(3, 0)]
    assert {key[-1] for key in cb._kernels} == {3}  # kernels are looked up per device


def test_public_call_with_torch_cuda_tensors(monkeypatch):
    # hisa_cupy.hisa_select end to end on torch tensors that claim to be on cuda:0: the adapters
    # wrap their pointers (real CuPy arrays, no device touched), the output comes from torch and
    # is handed back as it is, and the backend's launches read the callers' own memory
    torch = pytest.importorskip("torch")
    cupy = pytest.importorskip("cupy")
    import hisa_cupy
    from hisa_cupy.adapters import arrays

    class OnGpu(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl
        is_cuda = property(lambda self: True)

        def get_device(self):
            return 0

    fake = _Fake(monkeypatch, cc=90)
    cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDevice=lambda: 0),
                                 get_current_stream=lambda: types.SimpleNamespace(ptr=0),
                                 UnownedMemory=cupy.cuda.UnownedMemory, MemoryPointer=cupy.cuda.MemoryPointer)
    monkeypatch.setattr(arrays, "_cupy", lambda: types.SimpleNamespace(cuda=cuda, ndarray=cupy.ndarray))
    monkeypatch.setattr(arrays, "_torch_raw_stream", lambda device: 0)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, dtype=None, device=None: empty(*s, dtype=dtype).as_subclass(OnGpu))
    T, S = 64, 4096
    q = torch.zeros(T, 64, 128, dtype=torch.float8_e4m3fn).as_subclass(OnGpu)
    k = torch.zeros(S, 128, dtype=torch.float8_e4m3fn).as_subclass(OnGpu)
    w, ksc = torch.zeros(T, 64).as_subclass(OnGpu), torch.ones(S).as_subclass(OnGpu)
    ks, ke = torch.zeros(T, dtype=torch.int32).as_subclass(OnGpu), torch.ones(T, dtype=torch.int32).as_subclass(OnGpu)
    for _ in range(2):  # the second call runs on the plans of the first
        fake.launches.clear()
        res = hisa_cupy.hisa_select(q, k, w, k_scale=ksc, ks=ks, ke=ke, block_size=128, block_topk=8, topk=512,
                                    backend="cupy", validate=False)
        assert isinstance(res, torch.Tensor) and res.dtype == torch.int32 and tuple(res.shape) == (T, 512)
        assert fake.names() == ["pool_vec_kernel<0, 1, 128>", "block_score_wgmma_kernel<1, 0, 1, 64, 128, 2>",
                                "block_topm_warp_kernel<8>", "refine_union_wgmma_kernel<2, 0, 0, 64, 128, true>",
                                "refine_topk_warp_kernel"]
        pool, union, topk = fake.launches[0], fake.launches[3], fake.launches[4]
        assert _value(pool.args[0]) == k.data_ptr() and _value(pool.args[1]) == ksc.data_ptr()
        assert [_value(a) for a in union.args[:6:2]] == [q.data_ptr(), w.data_ptr(), ks.data_ptr()]
        assert _value(union.args[5]) == ke.data_ptr()
        assert res.data_ptr() in {_value(a) for a in topk.args}  # the top-k writes the returned tensor


def test_warp_select_where_rows_are_short_and_in_position_order():
    assert cb._warp_select("block_topm_kernel", True, cb.WARP_SELECT_ITEMS, False)
    assert cb._warp_select("refine_topk_kernel", True, 1, False)
    assert not cb._warp_select("block_topm_kernel", True, cb.WARP_SELECT_ITEMS + 1, False)  # too long
    assert not cb._warp_select("refine_topk_kernel", True, 512, True)  # order by score
    assert not cb._warp_select("topk_kernel", False, 512, False)  # fp32 scores (hisa_cupy.topk)
    assert not cb._warp_select("dense_topk_kernel", True, 0, False)


def test_block_topm_keys_per_lane_fit_the_rows():
    # block_topm_warp_kernel<R> holds rows of at most 32 R blocks; the fewest keys per lane that
    # hold a row are taken (its search and in-order pass take R steps), up to warp mode's longest
    assert cb.WARP_KEYS_PER_LANE[-1] * 32 == cb.WARP_SELECT_ITEMS
    picks = {n: cb._warp_keys_per_lane(n) for n in (1, 31, 256, 257, 512, 513, 1000, 1024)}
    assert picks == {1: 8, 31: 8, 256: 8, 257: 16, 512: 16, 513: 32, 1000: 32, 1024: 32}
    assert {e for f, e in cb.kernel_instances() if e.startswith("block_topm_warp_kernel")} == {
        "block_topm_warp_kernel<8>", "block_topm_warp_kernel<16>", "block_topm_warp_kernel<32>"}


def test_warp_select_launch(monkeypatch):
    # T = 65 rows of 32 blocks: 17 CTAs of 4 warps, the row count appended after out_val (then the
    # pairs' records, their order and `early`), no shared memory; with the knob off the 512-thread kernel,
    # one CTA per row
    fake = _Fake(monkeypatch, cc=90)
    _hisa(T=65)
    topm = fake.launches[2]
    assert topm.name == "block_topm_warp_kernel<8>" and topm.grid == (17,) and topm.block == (128,)
    assert topm.smem == 0 and len(topm.args) == 30 and _value(topm.args[-5]) == 65
    assert _value(topm.args[5]) == 8 and _value(topm.args[3]) == 32  # k = m, ncols = blocks
    fake.launches.clear()
    monkeypatch.setattr(cb, "WARP_SELECT", False)  # register mode: one CTA per row, no row count
    _hisa(T=65)
    topm = fake.launches[2]
    assert topm.name == "block_topm_regs_kernel" and topm.grid == (65,) and topm.block == (cb.SELECT_THREADS,)
    assert len(topm.args) == 25 and topm.smem == cb._reg_select_plan(8, 32, False, 232448)[1]
    fake.launches.clear()
    monkeypatch.setattr(cb, "REG_SELECT", False)
    _hisa(T=65)
    topm = fake.launches[2]
    assert topm.name == "block_topm_kernel" and topm.grid == (65,) and topm.block == (cb.SELECT_THREADS,)
    assert len(topm.args) == 25


def test_reg_select_plan():
    # (sort_cap, smem): position order needs no lists; by score, the selected list and the sort's
    # scratch hold the next power of two >= k entries (at least SELECT_LIST_MIN)
    fixed = cb.SELECT_LIST_FIXED_SMEM
    assert cb._reg_select_plan(2048, 8192, False, 232448) == (0, fixed)
    assert cb._reg_select_plan(2048, 8192, True, 232448) == (2048, fixed + 16 * 2048)
    assert cb._reg_select_plan(3000, 5000, True, 232448) == (4096, fixed + 16 * 4096)
    assert cb._reg_select_plan(100, 1025, True, 232448) == (512, fixed + 16 * 512)
    assert cb._reg_select_plan(2048, cb.REG_SELECT_ITEMS + 1, False, 232448) is None  # row too long
    assert cb._reg_select_plan(8192, 8192, True, 101376) is None  # the lists do not fit
    assert cb._reg_select_plan(9000, 8192, False, 101376) == (0, fixed)  # any k in position order


def test_reg_select_launches(monkeypatch):
    # hisa_cupy.topk over 8192 columns: topk_regs_kernel, one CTA per row, with register mode's
    # shared memory; over 8193 columns, or with the knob off: list mode
    fake = _Fake(monkeypatch, cc=90)
    reg_smem = cb._reg_select_plan(2048, 8192, True, 232448)[1]
    for n, reg, name in ((8192, True, "topk_regs_kernel"), (8193, True, "topk_kernel"), (8192, False, "topk_kernel")):
        monkeypatch.setattr(cb, "REG_SELECT", reg)
        fake.launches.clear()
        cb.topk(pointer_array((3, n), np.float32), None, k=2048, out_values=pointer_array((3, 2048), np.float32),
                out_indices=pointer_array((3, 2048), np.int32), stream=0)
        assert fake.names() == [name] and fake.launches[0].grid == (3,)
        assert (fake.launches[0].smem == reg_smem) == (name != "topk_kernel")


def test_topk_split_choice():
    # few long rows: as many chunks as keep R * P <= SMs (one chunk CTA per SM) with chunks of
    # >= max(4k, 8192) columns (a multiple of 4 each); never with lengths
    assert cb._topk_split(64, 131072, 2048, False, 132) == 2  # one chunk CTA per SM at most
    assert cb._topk_split(4096, 8192, 2048, False, 132) == 1  # many rows fill the GPU already
    assert cb._topk_split(8, 131072, 2048, False, 132) == 16
    assert cb._topk_split(8, 131072, 8192, False, 132) == 4  # chunks of >= 4k columns
    assert cb._topk_split(64, 131072 + 4, 2048, False, 132) == 1  # 4P does not divide N
    assert cb._topk_split(64, 131072, 2048, True, 132) == 1  # lengths


def _topk_64x131072(monkeypatch, fake, reg):
    """The launches of hisa_cupy.topk(k = 2048) on [64 x 131072] with REG_SELECT = reg, and the
    arrays: (launches, scores, values, indices)."""
    scores = pointer_array((64, 131072), np.float32)
    vals, idx = pointer_array((64, 2048), np.float32), pointer_array((64, 2048), np.int32)
    monkeypatch.setattr(cb, "REG_SELECT", reg)
    fake.launches.clear()
    cb.topk(scores, None, k=2048, out_values=vals, out_indices=idx, stream=0)
    return list(fake.launches), scores, vals, idx


def test_topk_split_launches(monkeypatch):
    # [64 x 131072], k = 2048 on 132 SMs: 128 chunk rows of 65536 columns in position order into
    # the kept buffers (positions in the whole row: MAP_CHUNKS with m = 2 chunks of B = 65536), then
    # one merge row per input row over its 2 * 2048 kept values, the kept columns read back through
    # them (MAP_GATHER with m = 4096, B = 1), by score into the outputs; 4096 kept items fit
    # register mode (its merge twin), or list mode with REG_SELECT off
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "TOPK_FILTER", False)  # which takes these rows first
    for reg, merge_name in ((True, "topk_merge_regs_kernel"), (False, "topk_merge_kernel")):
        launches, scores, vals, idx = _topk_64x131072(monkeypatch, fake, reg)
        assert [x.name for x in launches] == ["topk_chunks_kernel", merge_name]
        chunks, merge = launches
        kept_v = cb._workspaces[(0, 0)]._bufs["topk_kept_values"]
        kept_i = cb._workspaces[(0, 0)]._bufs["topk_kept_indices"]
        a = [_value(x) for x in chunks.args]
        # SELECT_PARAMS: keys, scores, ld, ncols, lengths, k, cache_cap, row0, T, S, ks, ke, blocks, m, B,
        # col0, relative, by_score, sort_cap, lists, cand_cap, ring, out_idx, out_ld, out_val
        assert chunks.grid == (128,) and a[1] == scores.data.ptr and a[2:4] == [65536, 65536] and a[5] == 2048
        assert a[13:15] == [2, 65536] and a[17] == 0 and a[22] == kept_i.data.ptr and a[24] == kept_v.data.ptr
        b = [_value(x) for x in merge.args]
        assert merge.grid == (64,) and b[1] == kept_v.data.ptr and b[2:4] == [4096, 4096] and b[12] == kept_i.data.ptr
        assert b[13:15] == [4096, 1] and b[17] == 1 and b[22] == idx.data.ptr and b[24] == vals.data.ptr
    monkeypatch.setattr(cb, "TOPK_SPLIT", 1)
    assert [x.name for x in _topk_64x131072(monkeypatch, fake, True)[0]] == ["topk_kernel"]



def test_pool_batch_knob_picks_the_instance(monkeypatch):
    # POOL_BATCH selects pool.cu's BATCH template argument of pool_kernel (every allowed value is
    # compiled by tests/test_cuda_compile.py); it is part of the plan keys, and other values are
    # refused
    fake = _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "POOL_VEC", False)
    for batch in cb.POOL_BATCHES:
        monkeypatch.setattr(cb, "POOL_BATCH", batch)
        fake.launches.clear()
        _hisa()
        assert fake.names()[0] == f"pool_kernel<0, 1, {batch}>"
    assert ("pool.cu", "pool_kernel<2, 2, 64>") in cb.kernel_instances()
    monkeypatch.setattr(cb, "POOL_BATCH", 24)
    with pytest.raises(ValueError, match="POOL_BATCH must be one of"):
        _hisa()


def test_pool_vec_where_the_keys_allow_it(monkeypatch):
    # pool_vec_kernel (128 threads, one CTA per block) takes keys whose rows are whole 16-byte
    # vectors, 16-byte aligned, D <= 128; others (and POOL_VEC = False) go to pool_kernel (one
    # thread per dimension); the alignment is part of the plan key
    fake = _Fake(monkeypatch, cc=90)

    def pool(k, pool_dtype="bfloat16"):
        fake.launches.clear()
        cb.pool_keys(k, None, block_size=128, pool_dtype=pool_dtype, stream=0)
        (launch,) = fake.launches
        return launch

    k = pointer_array((1000, 128), np.uint8)
    launch = pool(k)
    # D = 128 (POOL_FIXED_SIZE): fixed at compile time (POOL_FIXED), still passed
    assert launch.name == "pool_vec_kernel<0, 1, 128>" and launch.grid == (8,) and launch.block == (128,)
    assert [_value(x) for x in launch.args[2:5]] == [1000, 128, 128]
    monkeypatch.setattr(cb, "POOL_FIXED", False)
    assert pool(k).name == "pool_vec_kernel<0, 1>"
    monkeypatch.setattr(cb, "POOL_FIXED", True)
    assert pool(pointer_array((1000, 64), np.uint16), "float8_e4m3fn").name == "pool_vec_kernel<1, 2>"
    assert pool(pointer_array((1000, 32), np.float32), "float32").name == "pool_vec_kernel<3, 0>"
    assert pool(pointer_array((1000, 40), np.uint8)).name == "pool_kernel<0, 1, 16>"  # 40-byte rows
    assert pool(pointer_array((1000, 160), np.uint16)).name == "pool_kernel<1, 1, 16>"  # D > 128
    base = pointer_array((1000 * 128 + 16,), np.uint8)
    off = (8 - base.data.ptr) % 16
    unaligned = base[off:off + 1000 * 128].reshape(1000, 128)
    assert unaligned.data.ptr % 16 == 8
    assert pool(unaligned).name == "pool_kernel<0, 1, 16>"
    assert pool(k).name == "pool_vec_kernel<0, 1, 128>"  # the aligned plan is still there
    monkeypatch.setattr(cb, "POOL_VEC", False)
    assert pool(k).name == "pool_kernel<0, 1, 16>"
    assert ("pool.cu", "pool_vec_kernel<0, 2>") in cb.kernel_instances()
    assert ("pool.cu", "pool_vec_kernel<1, 2, 128>") in cb.kernel_instances()


def test_every_knob_is_documented():
    # docs/internals.md's table of tuning knobs names every setting the plans depend on (and the
    # per-call TOPK_SPLIT), with its current default
    import inspect
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "internals.md").read_text()
    table = doc[doc.index("**Tuning knobs.**"):doc.index("Intermediate ranking keys")]
    names = re.findall(r"\b[A-Z][A-Z0-9_]+\b", inspect.getsource(cb._knobs).split("return", 1)[1])
    for name in [n for n in names if n != "SCORE_TILE"] + ["TOPK_SPLIT"]:
        row = next((line for line in table.splitlines() if f"`{name}`" in line), None)
        assert row is not None, f"{name} missing from the knob table of docs/internals.md"
        value = getattr(cb, name)
        if isinstance(value, bool) or name in ("UNION_SPLITS", "TOPK_SPLIT", "SCORE_CTAS_PER_SM", "POOL_BATCH",
                                                 "MAX_ROWS_PER_CTA", "MAX_ROWS_PER_LAUNCH"):
            assert f"| {value}" in row, f"{name}: default {value} not in {row!r}"


def test_tile_split_is_even_and_adds_no_ctas(monkeypatch):
    # _tiles_per_cta spreads a row's tiles evenly: the same number of CTAs per row as the plain
    # split (ntiles / the target tile count, rounded up), none of them empty, at most 32 tiles each,
    # and the longest CTA as short as that many CTAs allow (each takes tpc consecutive tiles)
    _Fake(monkeypatch, cc=90)  # 132 SMs
    for per_sm in (1, 2, 8):
        monkeypatch.setattr(cb, "SCORE_CTAS_PER_SM", per_sm)
        for ntiles in range(1, 200, 3):
            for rows in (1, 7, 64, 512, 4096):
                plain = max(1, min(32, ntiles, ntiles * rows // (132 * per_sm)))
                tpc = cb._tiles_per_cta(ntiles, rows)
                ctas = -(-ntiles // tpc)
                assert ctas == -(-ntiles // plain) and tpc <= plain <= 32
                assert (ctas - 1) * tpc < ntiles <= ctas * tpc  # the last CTA is not empty
                assert tpc == -(-ntiles // ctas)


def test_nvrtc_compile_cache_and_lineinfo(monkeypatch, tmp_path):
    # one compile per (source, instance, options); HISA_CUPY_LINEINFO=1 adds -lineinfo as its own
    # cache entry and names the program after a kept copy of the source (what a profiler opens)
    fake = install_fake_nvrtc(monkeypatch)
    monkeypatch.setenv("HISA_CUPY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HISA_CUPY_LINEINFO", raising=False)
    src = "__global__ void k() {}\n"

    plain = cb._nvrtc_compile(src, "k", "sm_90a")
    assert plain == (b"cubin of k: -std=c++17 -ftz=true -arch=sm_90a", "lowered_k")
    assert fake.programs[-1]["name"] == "k.cu"
    assert cb._nvrtc_compile(src, "k", "sm_90a") == plain and len(fake.programs) == 1  # from the disk cache

    monkeypatch.setenv("HISA_CUPY_LINEINFO", "1")
    binary, lowered = cb._nvrtc_compile(src, "k", "sm_90a")
    assert len(fake.programs) == 2 and "-lineinfo" in fake.programs[-1]["options"]
    assert binary != plain[0] and lowered == "lowered_k"
    kept = pathlib.Path(fake.programs[-1]["name"])
    assert kept.is_absolute() and kept.name == "k.cu" and kept.read_text() == src
    assert kept.parent.parent == tmp_path / "lineinfo"
    assert cb._nvrtc_compile(src, "k", "sm_90a") == (binary, lowered) and len(fake.programs) == 2


def test_topk_filter_choice():
    # long rows with k small against N, no lengths, at most 1024 rows: P chunks of 8192 columns, a
    # list of 8192 candidate slots per row, aiming at 2.5k candidates per row (up to 4096 for small
    # k); a full row's sample rank (expect * 2048 / N) must be >= 32
    assert cb._topk_filter(64, 131072, 2048, False) == (16, 8192, 5120)  # sample rank 80
    assert cb._topk_filter(64, 131072, 1, False) == (16, 8192, 4096)  # small k: half the slots
    assert cb._topk_filter(8, 65536, 2048, False) == (8, 8192, 5120)
    assert cb._topk_filter(5, 100003, 700, False) == (13, 8192, 3126)  # a partial last chunk; rank 64
    assert cb._topk_filter(4, 262144, 2048, False) == (32, 8192, 5120)  # sample rank 40
    assert cb._topk_filter(4, 1 << 20, 2048, False) is None  # sample rank 10: too thin
    assert cb._topk_filter(64, 131072, 4096, False) is None  # k > 8192 / 4
    assert cb._topk_filter(64, 131072, 2048, True) is None  # lengths
    assert cb._topk_filter(2000, 131072, 2048, False) is None  # workspace
    assert cb._topk_filter(64, 32767, 512, False) is None  # short rows
    assert cb._topk_filter(64, 40000, 2048, False) is None  # N < 32k


def test_topk_filter_launches(monkeypatch):
    # [64 x 131072], k = 2048 on 132 SMs: topk_filter_kernel on a (4, 64) grid (16 chunks per row,
    # 4 CTAs per row: one wave of 256 CTAs), writing a list of 8192 candidate slots, 16 chunk
    # states and a chunk counter per row; then the candidates' select (register mode, MAP_GATHER
    # over the candidate columns, by score, with states / P / n / next_chunk / failed after the
    # select parameters; 64 rows are one wave, so register mode at 1024 threads where
    # FILTER_WIDE_SELECT is on) and the rescue of the marked rows over the whole row (list mode,
    # failed last)
    fake = _Fake(monkeypatch, cc=90)
    for wide, reg, name, threads in ((True, True, "topk_filtered_wide_kernel", 1024),
                                     (False, True, "topk_filtered_regs_kernel", 512),
                                     (True, False, "topk_filtered_kernel", 512)):
        monkeypatch.setattr(cb, "FILTER_WIDE_SELECT", wide)
        launches, scores, vals, idx = _topk_64x131072(monkeypatch, fake, reg)
        assert [x.name for x in launches] == ["topk_filter_kernel", name, "topk_rescue_kernel"]
        filt, sel, rescue = launches
        bufs = cb._workspaces[(0, 0)]._bufs
        cv, ci = bufs["filter_cand_words"], bufs["filter_cand_indices"]
        states, nxt = bufs["filter_chunk_states"], bufs["filter_next_chunk"]
        failed = bufs["filter_failed_rows"]
        assert filt.grid == (4, 64) and filt.block == (512,)
        # FILTER_PARAMS: keys, scores, ld, ncols, row0, T, S, ks, ke, ranged, P, expect, n, min_len,
        # cand_word, cand_idx, states, next_chunk
        assert [_value(x) for x in filt.args] == [0, scores.data.ptr, 131072, 131072, 0, 64, 131072, 0, 0, 0, 16,
                                                  5120, 8192, 0, cv.data.ptr, ci.data.ptr, states.data.ptr,
                                                  nxt.data.ptr]
        b = [_value(x) for x in sel.args]
        assert sel.block == (threads,)
        if reg:  # register mode: no list, the selected list and its scratch (2 x 2048 entries) behind 16.5 KB
            assert sel.smem == cb.SELECT_LIST_FIXED_SMEM + 16 * 2048 and b[19] == 0 and b[18] == 2048
        assert sel.grid == (64,) and b[1] == cv.data.ptr and b[2:4] == [8192, 8192] and b[5] == 2048
        assert b[12] == ci.data.ptr and b[13:15] == [8192, 1] and b[17] == 1 and b[22] == idx.data.ptr
        # early = 1: 64 rows, one CTA each, are one wave (the select triggers the rescue's launch)
        assert b[24] == vals.data.ptr and b[25:] == [states.data.ptr, 16, 8192, nxt.data.ptr, failed.data.ptr, 1]
        c = [_value(x) for x in rescue.args]
        assert rescue.grid == (64,) and c[1] == scores.data.ptr and c[2:4] == [131072, 131072] and c[17] == 1
        assert c[22] == idx.data.ptr and c[24] == vals.data.ptr and c[25:] == [failed.data.ptr]
    # 200 rows: more than the SMs, so no early trigger, and the 512-thread select
    monkeypatch.setattr(cb, "REG_SELECT", True)
    monkeypatch.setattr(cb, "FILTER_WIDE_SELECT", True)
    fake.launches.clear()
    cb.topk(pointer_array((200, 131072), np.float32), None, k=2048, out_values=pointer_array((200, 2048), np.float32),
            out_indices=pointer_array((200, 2048), np.int32), stream=0)
    assert fake.launches[1].name == "topk_filtered_regs_kernel" and _value(fake.launches[1].args[-1]) == 0
    monkeypatch.setattr(cb, "TOPK_FILTER", False)
    assert _topk_64x131072(monkeypatch, fake, True)[0][0].name == "topk_chunks_kernel"


def test_filtered_select_kernel_choice(monkeypatch):
    # the 1024-thread select for launches of one wave (rows <= SMs) with register mode on, in
    # hisa_cupy.topk and dense_select; launches past one wave keep the <stem>_filtered_kernel
    # twins (register or list mode by the select plan)
    monkeypatch.setattr(cb, "FILTER_WIDE_SELECT", True)
    monkeypatch.setattr(cb, "REG_SELECT", True)
    assert cb._filtered_select_kernel("topk", 1, 132) == "topk_filtered_wide_kernel"
    assert cb._filtered_select_kernel("topk", 132, 132) == "topk_filtered_wide_kernel"
    assert cb._filtered_select_kernel("topk", 133, 132) == "topk_filtered_kernel"
    assert cb._filtered_select_kernel("dense", 16, 132) == "dense_filtered_wide_kernel"
    assert cb._filtered_select_kernel("dense", 512, 132) == "dense_filtered_kernel"
    monkeypatch.setattr(cb, "REG_SELECT", False)
    assert cb._filtered_select_kernel("topk", 64, 132) == "topk_filtered_kernel"
    monkeypatch.setattr(cb, "REG_SELECT", True)
    monkeypatch.setattr(cb, "FILTER_WIDE_SELECT", False)
    assert cb._filtered_select_kernel("topk", 64, 132) == "topk_filtered_kernel"
    assert cb.FILTER_WIDE_THREADS == 1024 and ("topk.cu", "topk_filtered_wide_kernel") in cb.kernel_instances()
    assert ("dense.cu", "dense_filtered_wide_kernel") in cb.kernel_instances()
    # the wide kernels are register mode only: rows past REG_SELECT_ITEMS are refused, not sent to
    # another mode under the wide kernel's name
    _Fake(monkeypatch, cc=90)
    with pytest.raises(ValueError, match="register mode only"):
        cb._launch_select("topk.cu", "topk_filtered_wide_kernel", rows=1, scores=pointer_array((1, 9000), np.float32),
                          ld=9000, ncols=9000, k=2048, T=1, S=9000, out_idx=pointer_array((1, 2048), np.int32),
                          out_ld=2048)


def test_filter_state_buffers_start_at_zero(monkeypatch):
    # the filter's chunk states and chunk counters must be zero before its first launch (the
    # select returns them to zero after each call): their buffers are allocated zeroed, and grow
    # zeroed; the candidate lists need no zeroing
    fake = _Fake(monkeypatch, cc=90)
    made = []
    for fn in ("empty", "zeros"):
        monkeypatch.setattr(fake.cupy, fn, lambda shape, dtype, fn=fn: made.append(fn) or pointer_array(shape, dtype))
    ws = cb._Workspace()
    ws.get("a", (4, 16), np.uint32, zeroed=True)
    ws.get("b", (4, 16), np.uint32)
    ws.get("a", (2, 8), np.uint32, zeroed=True)  # fits: the same (zero) buffer
    ws.get("a", (64, 16), np.uint32, zeroed=True)  # grows
    assert made == ["zeros", "empty", "zeros"]
    made.clear()
    _topk_64x131072(monkeypatch, fake, True)
    bufs = cb._workspaces[(0, 0)]._bufs
    assert sorted(b for b in bufs if b.startswith("filter_")) == [
        "filter_cand_indices", "filter_cand_words", "filter_chunk_states", "filter_failed_rows", "filter_next_chunk"]
    assert made.count("zeros") == 2 and made.count("empty") >= 3


def test_filter_states_zeroed_after_a_call_that_stopped(monkeypatch):
    # a call that stops between the filter and the select that zeroes its states (here the select's
    # launch raises) leaves the workspace marked, and the next call zeroes the whole state and
    # counter buffers before its filter runs (a larger earlier call may have used more of them),
    # then clears the mark; calls that complete zero nothing
    fake = _Fake(monkeypatch, cc=90)
    _topk_64x131072(monkeypatch, fake, True)
    ws = cb._workspaces[(0, 0)]
    states, nxt = ws.buffer("filter_chunk_states"), ws.buffer("filter_next_chunk")
    assert not ws.stale and states.nbytes == 64 * 16 * 4 and nxt.nbytes == 64 * 4
    real = cb._launch_select

    def failing(filename, kernel, **kw):
        if kernel.startswith("topk_filtered"):
            raise RuntimeError("launch failed")
        return real(filename, kernel, **kw)

    monkeypatch.setattr(cb, "_launch_select", failing)
    with pytest.raises(RuntimeError, match="launch failed"):
        _topk_64x131072(monkeypatch, fake, True)
    assert ws.stale == {"filter_chunk_states", "filter_next_chunk"}
    monkeypatch.setattr(cb, "_launch_select", real)
    states[:], nxt[:] = 7, 7  # what the filter left behind
    scores = pointer_array((8, 131072), np.float32)  # fewer rows: a smaller view of the same buffers
    cb.topk(scores, None, k=2048, out_values=pointer_array((8, 2048), np.float32),
            out_indices=pointer_array((8, 2048), np.int32), stream=0)
    assert not ws.stale and not states.any() and not nxt.any()
    states[:] = 7
    _topk_64x131072(monkeypatch, fake, True)
    assert (states == 7).all()  # a clean workspace is left to the select


def test_dense_filter_launches(monkeypatch):
    # dense_select over S = 131072 with topk = 2048, rows in chunks of 16 (DENSE_WORKSPACE_BYTES):
    # each chunk's scores, then the filtered top-k of its 16 rows over the ranking keys (ranged:
    # the rows' [ks, ke), from row r0 of ks / ke on, T - r0 rows of them; rows shorter than 65536
    # go straight to the rescue), its candidates' select (positions through MAP_GATHER, relative
    # to ks) and the rescue (list mode over the chunk's keys); with DENSE_FILTER off, list mode
    fake = _Fake(monkeypatch, cc=90)
    T, S = 40, 131072
    monkeypatch.setattr(cb, "DENSE_WORKSPACE_BYTES", 16 * S * 4)
    monkeypatch.setattr(cb, "DENSE_THRESHOLD", False)  # the filtered path (test_dense_threshold_launches: the other)
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    w, ksc, out = pointer_array((T, 64), np.float32), pointer_array((S,), np.float32), pointer_array((T, 2048), np.int32)
    ks, ke = pointer_array((T,), np.int32), pointer_array((T,), np.int32)
    cb.dense_select(q, k, w, ksc, ks, ke, topk=2048, index_base="relative", order="position", out=out, stream=0)
    score = "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"
    # chunks of at most 16 rows are one wave each: the 1024-thread select
    assert fake.names() == [score, "dense_filter_kernel", "dense_filtered_wide_kernel", "dense_rescue_kernel"] * 3
    bufs = cb._workspaces[(0, 0)]._bufs
    keys, cand, cidx = bufs["dense_keys"], bufs["filter_cand_words"], bufs["filter_cand_indices"]
    for i, r0 in enumerate((0, 16, 32)):
        nr = min(16, T - r0)
        filt, sel, rescue = fake.launches[4 * i + 1: 4 * i + 4]
        a = [_value(x) for x in filt.args]
        assert filt.grid == (16, nr) and a[:7] == [keys.data.ptr, 0, S, S, 0, T - r0, S]  # a CTA per chunk
        assert a[7:14] == [ks.data.ptr + 4 * r0, ke.data.ptr + 4 * r0, 1, 16, 5120, 8192, 65536]
        assert a[14] == cand.data.ptr and a[15] == cidx.data.ptr
        b = [_value(x) for x in sel.args]
        assert sel.grid == (nr,) and sel.block == (1024,) and b[0] == cand.data.ptr and b[2:4] == [8192, 8192]
        assert b[7:10] == [0, T - r0, S]
        assert b[10:12] == [ks.data.ptr + 4 * r0, ke.data.ptr + 4 * r0] and b[12] == cidx.data.ptr
        assert b[13:15] == [8192, 1] and b[16:18] == [1, 0] and b[22] == out.data.ptr + r0 * 2048 * 4
        assert b[-1] == 1  # early: at most 16 rows, one wave
        c = [_value(x) for x in rescue.args]
        assert rescue.grid == (nr,) and c[0] == keys.data.ptr and c[2:4] == [S, S] and c[7:9] == [0, T - r0]
        assert c[10] == ks.data.ptr + 4 * r0 and c[22] == out.data.ptr + r0 * 2048 * 4
        assert c[25] == b[29]  # the rescue reads the marks the select writes
        assert a[16:18] == b[25:29:3]  # the select reads (and zeroes) the filter's states and counter
    fake.launches.clear()
    monkeypatch.setattr(cb, "DENSE_FILTER", False)
    cb.dense_select(q, k, w, ksc, ks, ke, topk=2048, index_base="relative", order="position", out=out, stream=0)
    assert fake.names() == [score, "dense_topk_kernel"] * 3


def test_dense_chunks_fit_the_filter(monkeypatch):
    # S = 98304: DENSE_WORKSPACE_BYTES (512 MB) would hold 1365 rows per chunk, more than the
    # filtered top-k takes (TOPK_FILTER_MAX_ROWS), which would send every row to list mode; the
    # chunks are cut to 1024 rows so that the filter takes them. Where the filter does not take
    # rows of S keys (topk too large for S, or DENSE_FILTER off) the chunks stay as the bytes allow
    _Fake(monkeypatch, cc=90)
    monkeypatch.setattr(cb, "DENSE_THRESHOLD", False)  # the filtered path
    T, S = 2048, 98304
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    filt = ["dense_filter_kernel", "dense_filtered_regs_kernel", "dense_rescue_kernel"]
    rows = cb._dense_plan(q, k, T, 64, 128, S, 2048)[2]
    assert rows == cb.TOPK_FILTER_MAX_ROWS == 1024 and cb._topk_filter(rows, S, 2048, False) is not None
    assert cb._dense_plan(q, k, T, 64, 128, S, 4096)[2] == (512 << 20) // (S * 4)  # 32k > S: no filter
    monkeypatch.setattr(cb, "DENSE_FILTER", False)
    assert cb._dense_plan(q, k, T, 64, 128, S, 2048)[2] == (512 << 20) // (S * 4)
    monkeypatch.setattr(cb, "DENSE_FILTER", True)
    fake = _Fake(monkeypatch, cc=90)
    w, ksc, out = pointer_array((T, 64), np.float32), pointer_array((S,), np.float32), pointer_array((T, 2048), np.int32)
    cb.dense_select(q, k, w, ksc, None, None, topk=2048, index_base="relative", order="position", out=out, stream=0)
    assert fake.names() == ["dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"] + filt + \
        ["dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"] + filt


def test_dense_threshold_launches(monkeypatch):
    # dense_select's threshold mode (DENSE_THRESHOLD) over S = 131072 fp8 keys, topk = 2048: the
    # sample (one key in every 128: 1024 per row, with each row's range of them; the failed pairs'
    # count zeroed), its scores (the dense score kernel over the sample, all rows at once), each
    # row's threshold (its 36th largest sampled key: the top 2048's share e = 16 of 1024 samples
    # plus 5 sqrt(e)), the appending score kernel over passes of rows (candidate lists of 8192
    # entries per row within DENSE_WORKSPACE_BYTES), each pass's select; then per chunk of the key
    # workspace (the same buffer as the lists) the rescue's score launch (DENSE_RESCUE_SLOTS failed
    # pairs at once, a tile group per CTA) and its select
    fake = _Fake(monkeypatch, cc=90)
    T, S = 40, 131072
    monkeypatch.setattr(cb, "DENSE_WORKSPACE_BYTES", 16 * S * 4)  # passes of 128 rows: one; key chunks of 16
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    w, ksc, out = pointer_array((T, 64), np.float32), pointer_array((S,), np.float32), pointer_array((T, 2048), np.int32)
    ks, ke = pointer_array((T,), np.int32), pointer_array((T,), np.int32)
    cb.dense_select(q, k, w, ksc, ks, ke, topk=2048, index_base="relative", order="score", out=out, stream=0)
    score = "dense_score_wgmma_kernel<2, 0, 0, 64, 128, 2>"
    rescue = ["dense_score_rescue_wgmma_kernel<2, 0, 0, 64, 128, 2>", "dense_rescue_kernel"]
    assert fake.names() == ["dense_sample_kernel", score, "dense_sample_threshold_kernel<32>",
                            "dense_score_append_wgmma_kernel<2, 0, 0, 64, 128, 2>",
                            "dense_select_unordered_kernel"] + rescue * 3
    bufs = cb._workspaces[(0, 0)]._bufs
    big = bufs["dense_keys"].data.ptr
    assert bufs["dense_keys"].nbytes == 16 * S * 4  # the rescue's keys; the lists take 40 * 8192 * 8 bytes of it
    smp, thr = fake.launches[0], fake.launches[2]
    a = [_value(x) for x in smp.args]
    assert a[:8] == [k.data.ptr, ksc.data.ptr, ks.data.ptr, ke.data.ptr, T, S, 128, 1024]
    assert smp.grid == (128,) and a[8] == bufs["dense_sample_k"].data.ptr and a[12] == bufs["dense_fail_count"].data.ptr
    a = [_value(x) for x in fake.launches[1].args]
    assert a[1] == bufs["dense_sample_k"].data.ptr and a[6:10] == [T, 1024, 0, T]
    assert fake.launches[1].grid[1] == T // 2
    a = [_value(x) for x in thr.args]
    assert a[1:5] == [1024, 1024, T, 36] and thr.grid == (T // 4,)
    app, sel = fake.launches[3], fake.launches[4]
    a = [_value(x) for x in app.args]
    assert a[6:10] == [T, S, 0, T] and a[11:13] == [big, big + T * 8192 * 4] and a[14] == 8192
    assert app.smem == fake.launches[1].smem + cb.APPEND_SMEM
    b = [_value(x) for x in sel.args]
    assert sel.grid == (T,) and sel.block == (512,) and b[5] == 2048 and b[16:18] == [1, 1]
    assert b[25:27] == [big, big + T * 8192 * 4]
    assert b[-2:] == [bufs["dense_fail_count"].data.ptr, bufs["dense_fail_pairs"].data.ptr]
    for i, r0 in enumerate((0, 16, 32)):
        res = fake.launches[5 + 2 * i]
        a = [_value(x) for x in res.args]
        assert res.grid == (-(-1024 // a[12]), cb.DENSE_RESCUE_SLOTS) and a[8:11] == [r0, min(16, T - r0), big]
        assert a[-2:] == [bufs["dense_fail_count"].data.ptr, bufs["dense_fail_pairs"].data.ptr]
    monkeypatch.setattr(cb, "DENSE_THRESHOLD", False)
    fake.launches.clear()
    cb.dense_select(q, k, w, ksc, ks, ke, topk=2048, index_base="relative", order="score", out=out, stream=0)
    assert "dense_sample_kernel" not in fake.names() and "dense_filter_kernel" in fake.names()
    # bf16 keys, S below DENSE_THRESHOLD_MIN_S, topk above 2048, or more samples than a row's threshold
    # takes: the filtered path
    monkeypatch.setattr(cb, "DENSE_THRESHOLD", True)
    assert cb._dense_threshold_plan(q, k, T, 64, 128, 32768, 2048) is None
    assert cb._dense_threshold_plan(q, k, T, 64, 128, S, 2049) is None  # lists would crowd their 8192 slots
    assert cb._dense_threshold_plan(q, k, T, 64, 128, 2048 * 128 + 128, 2048) is None  # 2049 samples
    assert cb._dense_threshold_plan(pointer_array((T, 64, 128), np.uint16), pointer_array((S, 128), np.uint16),
                                    T, 64, 128, S, 2048) is None


def test_threshold_counts_zeroed_after_a_call_that_stopped(monkeypatch):
    # dense_select's threshold mode: the appending kernel adds to each row's count and the select
    # zeroes it. A call that stops between them (here the select's launch raises) marks the counts
    # stale, and the next call zeroes the whole buffer before its appending kernel runs; calls that
    # complete zero nothing (the filtered path's states follow the same rule)
    fake = _Fake(monkeypatch, cc=90)
    T, S = 40, 131072
    q, k = pointer_array((T, 64, 128), np.uint8), pointer_array((S, 128), np.uint8)
    w, ksc, out = pointer_array((T, 64), np.float32), pointer_array((S,), np.float32), pointer_array((T, 2048), np.int32)

    def call():
        cb.dense_select(q, k, w, ksc, None, None, topk=2048, index_base="relative", order="position", out=out,
                        stream=0)

    call()
    ws = cb._workspaces[(0, 0)]
    counts = ws.buffer("dense_cand_counts")
    assert not ws.stale and counts.nbytes == T * 4
    real = cb._launch_select

    def failing(filename, kernel, **kw):
        if kernel == "dense_select_unordered_kernel":
            raise RuntimeError("launch failed")
        return real(filename, kernel, **kw)

    monkeypatch.setattr(cb, "_launch_select", failing)
    with pytest.raises(RuntimeError, match="launch failed"):
        call()
    assert ws.stale == {"dense_cand_counts"}
    monkeypatch.setattr(cb, "_launch_select", real)
    counts[:] = 7  # what the appending kernel left behind
    call()
    assert not ws.stale and not counts.any()
    counts[:] = 7
    call()
    assert (counts == 7).all()  # a clean workspace is left to the select
    assert fake.names().count("dense_select_unordered_kernel") == 3


def test_launch_checks_the_argument_count(monkeypatch):
    # _check_arity: every launch (the ordinary emitter and the binder that records bound calls)
    # compares its argument count with the kernel's parameter count (the driver's, _param_count)
    # and raises ValueError naming the kernel, before the driver would read past the arguments.
    # A count of 0 (a driver that cannot say) checks nothing.
    fake = _Fake(monkeypatch, cc=80)  # no PDL: the ordinary path launches through the fake
    monkeypatch.setattr(cb, "_param_counts", {})
    counts = {"block_topm_warp_kernel<8>": 1}
    monkeypatch.setattr(cb, "_param_count", lambda fn: counts.get(fn.name, 0))
    with pytest.raises(ValueError, match=r"block_select.cu: block_topm_warp_kernel<8>: expected 1 arguments"):
        _hisa(T=65)
    assert "block_topm_warp_kernel<8>" not in fake.names()  # raised before the launch
    fn = cb._kernel("block_select.cu", "block_topm_warp_kernel<8>", 0)
    counts["block_topm_warp_kernel<8>"] = 3
    monkeypatch.setattr(cb, "_param_counts", {})
    cb._DIRECT.launch(fn, (1,), (32,), (cb._i32(1), cb._i32(2), cb._i32(3)))
    assert fake.names()[-1] == "block_topm_warp_kernel<8>"
    with pytest.raises(ValueError, match="expected 3 arguments .*, got 2"):
        cb._DIRECT.launch(fn, (1,), (32,), (cb._i32(1), cb._i32(2)))
    binder = cb._Binder(())
    monkeypatch.setattr(cb, "_bindable_functions", lambda: (type(fn),))
    with pytest.raises(ValueError, match="got 4"):
        binder.launch(fn, (1,), (32,), (cb._i32(1),) * 4)
    binder.launch(fn, (1,), (32,), (cb._i32(1),) * 3)
    assert len(binder.launches) == 1
    counts["block_topm_warp_kernel<8>"] = 0  # unknown: no check
    monkeypatch.setattr(cb, "_param_counts", {})
    cb._DIRECT.launch(fn, (1,), (32,), ())


def test_param_count_only_asks_the_driver_about_cupy_functions(monkeypatch):
    # a stand-in's .ptr is no CUfunction: never handed to cuFuncGetParamInfo
    asked = []
    monkeypatch.setattr(cb, "_driver_param_info", lambda: lambda *a: asked.append(a) or 1)
    fn = types.SimpleNamespace(ptr=12345)
    assert cb._param_count(fn) == 0 and not asked
    # a CuPy Function's count: the first index the driver answers CUDA_ERROR_INVALID_VALUE (1) for;
    # another error: it cannot say (0)
    monkeypatch.setattr(cb, "_bindable_functions", lambda: (types.SimpleNamespace,))
    monkeypatch.setattr(cb, "_driver_param_info", lambda: lambda ptr, i, off, size: 0 if i < 5 else 1)
    assert cb._param_count(fn) == 5
    monkeypatch.setattr(cb, "_driver_param_info", lambda: lambda ptr, i, off, size: 0 if i < 2 else 801)
    assert cb._param_count(fn) == 0
    monkeypatch.setattr(cb, "_driver_param_info", lambda: False)  # no driver entry point
    assert cb._param_count(fn) == 0


def test_driver_entry_points(monkeypatch):
    # _driver_entry: the driver's function with its argument types and an int result, None where
    # the library or the entry point is missing; the graph API only whole (else False: no graphs)
    class Fn:
        argtypes = restype = None

    class Lib:
        def __init__(self, names):
            for n in names:
                setattr(self, n, Fn())

    names = [n for n, _ in cb._GRAPH_API]
    monkeypatch.setattr(cb.ctypes, "CDLL", lambda path: Lib(names + ["cuLaunchKernelEx"]))
    fn = cb._driver_entry("cuLaunchKernelEx", (ctypes.c_void_p,) * 4)
    assert fn.argtypes == [ctypes.c_void_p] * 4 and fn.restype is ctypes.c_int
    assert cb._driver_entry("cuFuncGetParamInfo", ()) is None
    monkeypatch.setattr(cb, "_graph_api", None)
    assert sorted(cb._driver_graph_api()) == sorted(names)
    monkeypatch.setattr(cb.ctypes, "CDLL", lambda path: Lib(names[:-1]))
    monkeypatch.setattr(cb, "_graph_api", None)
    assert cb._driver_graph_api() is False

    def no_library(path):
        raise OSError("no driver")

    monkeypatch.setattr(cb.ctypes, "CDLL", no_library)
    monkeypatch.setattr(cb, "_launch_kernel_ex", None)
    assert cb._driver_entry("cuGraphLaunch", ()) is None and cb._driver_launch_ex() is False
