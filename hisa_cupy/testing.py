"""Test helpers: SPEC §9 exact-arithmetic inputs and selection assertions.

* :func:`exact_inputs` draws inputs on which every backend must match the reference bit for bit.
* :func:`assert_selection_equal` checks exact equality of index arrays, with a readable diff.
* :func:`assert_values_identical` checks that score arrays hold the same bits (signed zeros and
  NaN payloads included).
* :func:`assert_selection_equivalent` is the SPEC §9 tolerance-aware check for general inputs.
* :func:`to_numpy` turns NumPy / PyTorch / JAX / CuPy arrays into host NumPy arrays (bf16 and
  fp8 framework dtypes become ``ml_dtypes`` arrays).
* :func:`score_keys` gives the kernels' uint32 ranking keys of float32 scores, for tests and
  bench/ tools that reason about the selects' key bits.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "exact_inputs",
    "to_numpy",
    "assert_selection_equal",
    "assert_values_identical",
    "assert_selection_equivalent",
    "score_keys",
]

EXACT_VALUES = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32)

_LOGICAL_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}


# --------------------------------------------------------------------------------------------
# array conversion
# --------------------------------------------------------------------------------------------
def _torch_to_numpy(x) -> np.ndarray:
    import torch

    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.resolve_conj().resolve_neg().contiguous()
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
    for name, ml_name in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2"),
                          ("float8_e4m3fnuz", "float8_e4m3fnuz"),
                          ("float8_e5m2fnuz", "float8_e5m2fnuz")):
        if hasattr(torch, name) and hasattr(ml_dtypes, ml_name):
            special[getattr(torch, name)] = (torch.uint8, getattr(ml_dtypes, ml_name))
    if x.dtype in special:
        phys, logical = special[x.dtype]
        return x.view(phys).numpy().view(logical)
    return x.numpy()


def to_numpy(x) -> np.ndarray:
    """Host NumPy copy/view of ``x`` (NumPy, PyTorch CPU/CUDA, JAX, CuPy or array-like).

    bf16 / fp8 framework dtypes come back as ``ml_dtypes`` arrays. CuPy arrays are returned
    in their own (physical) dtype.
    """
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__ or ""
    if module.startswith("torch"):
        return _torch_to_numpy(x)
    if module.startswith("cupy"):
        return x.get()
    # JAX arrays (and anything else with __array__) convert directly; JAX already maps its
    # bf16 / fp8 dtypes to ml_dtypes.
    return np.asarray(x)


def to_torch(x, device="cuda"):
    """torch tensor on ``device`` holding NumPy array ``x`` (None stays None), in the same logical
    dtype: ``ml_dtypes`` bf16 / fp8 become ``torch.bfloat16`` / ``torch.float8_e4m3fn`` (bit
    patterns copied, never converted)."""
    import torch

    if x is None:
        return None
    x = np.ascontiguousarray(x)
    name = str(x.dtype)
    if name == "float8_e4m3fn":
        return torch.from_numpy(x.view(np.uint8)).to(device).view(torch.float8_e4m3fn)
    if name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(x).to(device)


# --------------------------------------------------------------------------------------------
# SPEC §9 exact-arithmetic inputs
# --------------------------------------------------------------------------------------------
def _logical_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _LOGICAL_DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(_LOGICAL_DTYPES)}, got {dtype!r}")
        return _LOGICAL_DTYPES[dtype]
    return np.dtype(dtype)


def _draw_exact(rng, shape, zero_frac: float) -> np.ndarray:
    """Values in {-1, -0.5, 0, 0.5, 1}; zeros with probability ``zero_frac``."""
    nonzero = EXACT_VALUES[[0, 1, 3, 4]]
    vals = nonzero[rng.integers(0, 4, size=shape)]
    vals[rng.random(shape) < zero_frac] = 0.0
    return vals.astype(np.float32)


def _ragged_ranges(rng, T: int, S: int):
    """Random ``[ks, ke)`` per row, including empty (``ke == ks``) and inverted (``ke < ks``)."""
    ks = rng.integers(0, S + 1, size=T)
    ke = rng.integers(0, S + 1, size=T)
    # Half of the rows get ordered, non-empty ranges where possible.
    swap = rng.random(T) < 0.5
    lo, hi = np.minimum(ks, ke), np.maximum(ks, ke)
    ks = np.where(swap, lo, ks)
    ke = np.where(swap, hi, ke)
    # Some full-width rows and explicitly empty rows.
    if T >= 3:
        ks[0], ke[0] = 0, S
        ks[1] = ke[1] = rng.integers(0, S + 1)
    return ks.astype(np.int32), ke.astype(np.int32)


def _packed_ranges(rng, T: int, S: int):
    """Several causal sequences packed along the key axis.

    Sequence j owns key positions ``[start_j, end_j)`` and contributes ``T_j`` query rows: the
    last ``T_j`` positions of that sequence, so its rows see ``[start_j, p + 1)`` for query
    position ``p``. Rows are laid out sequence after sequence.
    """
    if T == 0 or S == 0:
        return np.zeros(T, np.int32), np.zeros(T, np.int32)
    n_seq = int(min(T, max(1, S), rng.integers(2, 5)))
    # Query rows per sequence (each >= 1), then sequence lengths (each >= its row count).
    t_cuts = np.sort(rng.choice(np.arange(1, T), size=n_seq - 1, replace=False)) if n_seq > 1 else []
    t_counts = np.diff(np.concatenate([[0], t_cuts, [T]])).astype(np.int64)
    if t_counts.sum() > S:  # not enough keys: fall back to one sequence per key position
        t_counts = np.minimum(t_counts, 1)
    spare = S - int(t_counts.sum())
    extra = rng.multinomial(spare, np.ones(n_seq) / n_seq) if spare > 0 else np.zeros(n_seq, int)
    lengths = t_counts + extra
    ks, ke = [], []
    start = 0
    for Tj, Lj in zip(t_counts, lengths):
        for i in range(Tj):
            ks.append(start)
            ke.append(start + Lj - Tj + i + 1)
        start += Lj
    ks = np.array(ks, dtype=np.int64)
    ke = np.array(ke, dtype=np.int64)
    if ks.shape[0] < T:  # only when T > S: remaining rows are empty
        pad = T - ks.shape[0]
        ks = np.concatenate([ks, np.full(pad, S)])
        ke = np.concatenate([ke, np.full(pad, S)])
    return ks.astype(np.int32), ke.astype(np.int32)


def exact_inputs(T: int, S: int, H: int, D: int, *, dtype="float32", seed: int = 0,
                 block_size: int = 128, zero_frac: float = 0.3, ragged: bool = False,
                 packed: bool = False) -> dict:
    """SPEC §9 exact-arithmetic inputs.

    q ``[T, H, D]`` and k ``[S, D]`` in the logical ``dtype`` ("float32", "float16",
    "bfloat16", "float8_e4m3fn" or a NumPy/ml_dtypes dtype), weights float32 ``[T, H]``, all
    drawn from {-1, -0.5, 0, 0.5, 1}; k_scale float32 ones ``[S]``. Ties are made common: about
    a quarter of the key rows are copies of other key rows, and zeros appear with probability
    ``zero_frac``. ks/ke are None (causal default) unless ``ragged`` (random ranges including
    empty rows with ``ke <= ks``) or ``packed`` (several causal sequences packed together).
    Bit-exactness needs ``S % block_size == 0`` and B, H, D <= 128 (not enforced here).

    Returns ``dict(q=, k=, weights=, k_scale=, ks=, ke=)``. The same seed gives the same values
    for every dtype.
    """
    if ragged and packed:
        raise ValueError("ragged and packed are exclusive")
    logical = _logical_dtype(dtype)
    rng = np.random.default_rng(seed)
    q = _draw_exact(rng, (T, H, D), zero_frac)
    k = _draw_exact(rng, (S, D), zero_frac)
    if S >= 4:  # duplicated keys give exact score ties in every row
        dup = rng.choice(S, size=S // 4, replace=False)
        k[dup] = k[rng.integers(0, S, size=dup.shape[0])]
    weights = _draw_exact(rng, (T, H), zero_frac)
    ks = ke = None
    if ragged:
        ks, ke = _ragged_ranges(rng, T, S)
    elif packed:
        ks, ke = _packed_ranges(rng, T, S)
    return dict(
        q=q.astype(logical),
        k=k.astype(logical),
        weights=weights,
        k_scale=np.ones(S, dtype=np.float32),
        ks=ks,
        ke=ke,
    )


# --------------------------------------------------------------------------------------------
# assertions
# --------------------------------------------------------------------------------------------
def _valid(row) -> np.ndarray:
    return row[row != -1]


def _fmt(values, limit: int = 12) -> str:
    values = list(np.asarray(values).tolist())
    if len(values) > limit:
        return "[" + ", ".join(map(str, values[:limit])) + f", ... ({len(values)} total)]"
    return str(values)


def _as_index_pair(actual, expected, err_msg: str):
    a = to_numpy(actual)
    e = to_numpy(expected)
    prefix = f"{err_msg}: " if err_msg else ""
    if a.shape != e.shape:
        raise AssertionError(f"{prefix}shape mismatch: actual {a.shape} vs expected {e.shape}")
    if a.ndim != 2:
        raise AssertionError(f"{prefix}expected 2-D [T, k] index arrays, got shape {a.shape}")
    for name, arr in (("actual", a), ("expected", e)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise AssertionError(f"{prefix}{name} must be an integer index array, got {arr.dtype}")
    return a.astype(np.int64), e.astype(np.int64), prefix, a.dtype


def assert_selection_equal(actual, expected, *, err_msg: str = "") -> None:
    """Exact equality of ``[T, k]`` int32 index arrays (including order and -1 padding).

    ``actual`` must be int32 (SPEC §7); ``expected`` may be any integer dtype. On mismatch the
    message lists the number of differing rows and, for the first few, the valid counts and
    the indices only present on either side.
    """
    a, e, prefix, a_dtype = _as_index_pair(actual, expected, err_msg)
    if a_dtype != np.int32:
        raise AssertionError(f"{prefix}actual dtype is {a_dtype}, expected int32")
    bad = np.nonzero((a != e).any(axis=1))[0]
    if bad.shape[0] == 0:
        return
    lines = [f"{prefix}selections differ in {bad.shape[0]} of {a.shape[0]} rows "
             f"(first differing rows shown)"]
    for t in bad[:5]:
        av, ev = _valid(a[t]), _valid(e[t])
        only_a = np.setdiff1d(av, ev)
        only_e = np.setdiff1d(ev, av)
        lines.append(f"  row {t}: valid {av.shape[0]} vs {ev.shape[0]}; "
                     f"only in actual {_fmt(only_a)}; only in expected {_fmt(only_e)}")
        if only_a.shape[0] == 0 and only_e.shape[0] == 0:
            lines.append(f"    same set, different order/padding:\n"
                         f"    actual   {_fmt(a[t], 24)}\n    expected {_fmt(e[t], 24)}")
    raise AssertionError("\n".join(lines))


def assert_values_identical(actual, expected, *, err_msg: str = "") -> None:
    """The same float32 values bit for bit: ``actual`` (any array type) and ``expected`` (NumPy),
    equal in shape, dtype float32, and every element's bits -- unlike ``==``, -0.0 differs from
    0.0 and one NaN from another with a different payload. For top-k values: a selection's values
    are the input's own elements, so once the indices agree the bits must too."""
    prefix = f"{err_msg}: " if err_msg else ""
    a, e = to_numpy(actual), np.asarray(expected)
    if a.dtype != np.float32 or e.dtype != np.float32:
        raise AssertionError(f"{prefix}dtypes {a.dtype} and {e.dtype}, expected float32")
    if a.shape != e.shape:
        raise AssertionError(f"{prefix}shapes {a.shape} and {e.shape} differ")
    ab, eb = a.view(np.uint32), e.view(np.uint32)
    bad = np.argwhere(ab != eb)
    if bad.shape[0]:
        at = tuple(int(i) for i in bad[0])
        raise AssertionError(f"{prefix}{bad.shape[0]} values differ in their bits; first at {at}: "
                             f"{float(a[at])!r} (0x{int(ab[at]):08x}) vs {float(e[at])!r} (0x{int(eb[at]):08x})")


def _lowest_selected(scores_row, selected) -> float:
    """Score of the last of ``selected`` under §3 (the row's k-th score); NaN ranks lowest."""
    s = scores_row[selected].astype(np.float64)
    if np.isnan(s).any():
        return float("nan")
    return float(s.min())


def assert_selection_equivalent(actual, expected, scores, *, ks=None, index_base: str = "relative",
                                rtol: float = 1e-3, atol: float = 1e-5, err_msg: str = "") -> None:
    """SPEC §9 tolerance-aware comparison of two selections.

    actual / expected ``[T, k]`` index arrays (any order, -1 padding), scores ``[T, N]`` scores
    at absolute positions (token scores ``I``, or block scores ``J`` for block selection, where
    indices are block ids and ``ks`` is None). Relative indices are shifted back by ``ks``
    (None = 0). Per row: the valid counts match, entries are unique and in ``[0, N)``, and every
    index in the symmetric difference has ``|s - kth| <= atol + rtol * |kth|``, where ``kth`` is
    the lowest score (§3) in the expected set. NaN scores match a NaN ``kth``.
    """
    if index_base not in ("relative", "absolute"):
        raise ValueError(f"index_base: expected 'relative' or 'absolute', got {index_base!r}")
    a, e, prefix, _ = _as_index_pair(actual, expected, err_msg)
    scores = to_numpy(scores).astype(np.float32)
    T = a.shape[0]
    if scores.ndim != 2 or scores.shape[0] != T:
        raise ValueError(f"scores: expected shape ({T}, N), got {scores.shape}")
    N = scores.shape[1]
    shift = np.zeros(T, np.int64)
    if index_base == "relative" and ks is not None:
        shift = to_numpy(ks).astype(np.int64).reshape(T)
    problems = []
    for t in range(T):
        av, ev = _valid(a[t]) + shift[t], _valid(e[t]) + shift[t]
        if av.shape[0] != ev.shape[0]:
            problems.append(f"  row {t}: {av.shape[0]} valid indices, expected {ev.shape[0]}")
            continue
        malformed = False
        for name, v in (("actual", av), ("expected", ev)):
            outside = (v < 0) | (v >= N)
            if outside.any():
                problems.append(f"  row {t}: {name} holds positions outside [0, {N}): "
                                f"{_fmt(v[outside])}")
                malformed = True
            elif np.unique(v).shape[0] != v.shape[0]:
                problems.append(f"  row {t}: {name} holds duplicate indices")
                malformed = True
        if malformed:
            continue
        diff = np.setxor1d(av, ev)
        if diff.shape[0] == 0:
            continue
        kth = _lowest_selected(scores[t], ev)
        s = scores[t, diff].astype(np.float64)
        if np.isnan(kth):
            ok = np.isnan(s)
        else:
            with np.errstate(invalid="ignore"):
                ok = (s == kth) | (np.abs(s - kth) <= atol + rtol * abs(kth))
        if not ok.all():
            only_a = np.setdiff1d(av, ev)
            only_e = np.setdiff1d(ev, av)
            problems.append(
                f"  row {t}: k-th score {kth!r}; only in actual {_fmt(only_a)} "
                f"scores {_fmt(scores[t, only_a])}; only in expected {_fmt(only_e)} "
                f"scores {_fmt(scores[t, only_e])}")
    if problems:
        head = f"{prefix}selections not equivalent in {len(problems)} row(s) (rtol={rtol}, atol={atol})"
        raise AssertionError("\n".join([head] + problems[:8]))


# --------------------------------------------------------------------------------------------
# ranking keys
# --------------------------------------------------------------------------------------------
def score_keys(scores) -> np.ndarray:
    """The kernels' ranking keys (common.cuh ``score_key``) of float32 ``scores``, any shape, as uint32.

    A larger key ranks higher, in SPEC §3 order: ``-0.0`` and ``+0.0`` get the same key, NaN gets
    1 (below every number, -inf included), a score >= 0 its bits with the sign bit set, a negative
    one its bits inverted. Key 0 (``HISA_KEY_NONE``, not a candidate) is never produced.
    """
    s = np.asarray(scores, dtype=np.float32)
    u = s.view(np.uint32).astype(np.uint64)
    u = np.where(u == 0x80000000, 0, u)
    key = np.where(u >> 31 == 1, ~u & 0xFFFFFFFF, u | 0x80000000)
    return np.where(np.isnan(s), 1, key).astype(np.uint32)


# --------------------------------------------------------------------------------------------
# bench/'s CPU replays
# --------------------------------------------------------------------------------------------
def add_replay_arguments(parser, *, rows: int, rows_help: str) -> None:
    """The workload arguments of bench/'s CPU replays of kernel rules on the reference's rows
    (threshold_levels_sim.py, warp_select_sim.py): ``--S`` keys, ``--T`` queries, ``--m`` blocks
    kept, ``--B`` block size, ``--rows`` rows sampled (default ``rows``), ``--kind`` workload and
    ``--seed``; defaults the target-1 shape 128K / 1024, m = 64, B = 128, segments."""
    parser.add_argument("--S", type=int, default=131072)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--B", type=int, default=128)
    parser.add_argument("--rows", type=int, default=rows, help=rows_help)
    parser.add_argument("--kind", default="segments")
    parser.add_argument("--seed", type=int, default=0)
