"""Launch plan of the row top-k kernel (row_select.cuh), without a GPU: which mode runs, how big
its lists are, when a row's keys are cached in shared memory, and where order='score' stops."""
import pytest

from hisa_cupy.kernels import cupy_backend as cb

HOPPER_OPTIN = 227 * 1024
SM86_OPTIN = 99 * 1024


def test_list_mode_for_usual_k():
    lists, cap, cand_cap, ring, cache_cap, smem = cb._select_plan(2048, 8192, True, HOPPER_OPTIN)
    assert lists and cap == 2048 and cand_cap == 2048 and not ring
    # histogram + scan + misc, two lists of 8-byte entries, then the 8192 cached keys
    assert cb.SELECT_LIST_FIXED_SMEM == (4096 + 64) * 4
    assert smem == cb.SELECT_LIST_FIXED_SMEM + 16 * 2048 + 8192 * 4
    assert cache_cap >= 8192
    assert smem <= HOPPER_OPTIN - 1024


def test_small_k_gets_the_minimum_list():
    lists, cap, _, _, _, _ = cb._select_plan(64, 1024, False, HOPPER_OPTIN)
    assert lists and cap == cb.SELECT_LIST_MIN


@pytest.mark.parametrize("k,cap", [(1, 512), (513, 1024), (1024, 1024), (1025, 2048), (4096, 4096)])
def test_list_size_is_next_power_of_two(k, cap):
    assert cb._select_plan(k, 100, True, HOPPER_OPTIN)[1] == cap


def test_long_rows_are_not_cached_and_stream_through_a_ring():
    # few rows (one CTA per SM): a ring of asynchronous copies and a long candidate list take
    # the shared memory a cache would
    lists, cap, cand_cap, ring, cache_cap, smem = cb._select_plan(2048, 131072, True, HOPPER_OPTIN, rows=64,
                                                                  sms=132)
    assert lists and ring and 131072 > cache_cap
    assert cand_cap >= 2 * cap and cand_cap % 8 == 0
    assert smem == cb.SELECT_LIST_FIXED_SMEM + 8 * cap + 8 * cand_cap + cb.SELECT_RING_BYTES
    assert smem <= HOPPER_OPTIN - 1024
    # many rows: 4 CTAs share an SM, no room for the ring; the candidate list shrinks
    _, _, cand_many, ring_many, _, smem_many = cb._select_plan(2048, 131072, True, HOPPER_OPTIN, rows=4096,
                                                               sms=132)
    assert not ring_many and cap <= cand_many < cand_cap
    assert 4 * (smem_many + 1024) <= HOPPER_OPTIN + 1024
    # never longer than the row
    assert cb._select_plan(512, 60000, True, HOPPER_OPTIN, rows=1)[2] <= 60000 + 8


def test_large_k_falls_back_to_in_order_mode():
    # 16384-entry lists (2 x 128 KB) exceed the opt-in limit: the in-order mode runs
    lists, cap, _, _, cache_cap, smem = cb._select_plan(16384, 65536, False, HOPPER_OPTIN)
    assert not lists and cap == 0
    assert smem <= HOPPER_OPTIN - 1024
    lists, cap, _, _, _, smem = cb._select_plan(16384, 65536, True, HOPPER_OPTIN)
    assert not lists and cap == 16384 and smem == cb.SELECT_FIXED_SMEM + 8 * 16384 + (
        65536 * 4 if 65536 * 4 + cb.SELECT_FIXED_SMEM + 8 * 16384 <= HOPPER_OPTIN - 1024 else 0)


def test_list_mode_limit_depends_on_the_device():
    assert cb._select_plan(8192, 100, True, HOPPER_OPTIN)[0]
    assert not cb._select_plan(8192, 100, True, SM86_OPTIN)[0]  # 2 lists x 64 KB > 98 KB


def test_score_order_beyond_the_bitonic_buffer_is_a_value_error():
    with pytest.raises(ValueError, match="too large for order='score'"):
        cb._select_plan(1 << 15, 100, True, HOPPER_OPTIN)
    # position order has no such limit
    assert not cb._select_plan(1 << 15, 100, False, HOPPER_OPTIN)[0]


# The cases of tests/gpu/test_row_select.py, with the host-decided part of the path each one's
# comment names: (k, N, R) -> (list mode, cached in shared memory, through the cp.async ring).
GPU_CASES = [
    ((2048, 8192, 64), (True, True, False)),
    ((2048, 131072, 4), (True, False, True)),
    ((3000, 5000, 8), (True, True, False)),
    ((3000, 40001, 4), (True, False, True)),
    ((100, 8192, 8), (True, True, False)),
    ((2048, 131072, 2), (True, False, True)),
    ((9000, 40000, 4), (False, False, False)),  # in-order mode, rows read from global memory
]


@pytest.mark.parametrize("case,expected", GPU_CASES)
def test_gpu_test_cases_take_the_paths_they_name(case, expected):
    k, N, R = case
    lists, _, _, ring, cache_cap, _ = cb._select_plan(k, N, True, HOPPER_OPTIN, rows=R, sms=132)
    assert (lists, N <= cache_cap, ring) == expected


def test_rows_are_not_cached_with_the_knob_off(monkeypatch):
    # SELECT_CACHE_ROWS = False reads every row from global memory: the split top-k's chunk rows
    # ([64 x 131072] at P = 4: 256 rows of 32768) then take two CTAs per SM instead of one
    knobs = cb._knobs()
    cached = cb._select_plan(2048, 32768, False, HOPPER_OPTIN, rows=256, sms=132)
    assert cached[4] >= 32768 and cached[5] > HOPPER_OPTIN // 2  # the chunk cached: one CTA per SM
    monkeypatch.setattr(cb, "SELECT_CACHE_ROWS", False)
    lists, cap, cand_cap, ring, cache_cap, smem = cb._select_plan(2048, 32768, False, HOPPER_OPTIN, rows=256,
                                                                  sms=132)
    assert lists and cache_cap == 0 and not ring and cand_cap > cap
    assert 2 * (smem + 1024) <= HOPPER_OPTIN + 1024
    # few rows still stream through the ring; the knob is part of every plan key
    assert cb._select_plan(2048, 8192, True, HOPPER_OPTIN, rows=1)[3]
    assert cb._knobs() != knobs
