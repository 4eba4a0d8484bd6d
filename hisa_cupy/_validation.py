"""Argument checks of SPEC §8: every message names the argument and says expected vs got.

Metadata checks (types, dtypes, shapes, devices, parameter values) run on every call before any
work. Value checks that need a device-to-host read (ks/ke bounds, k_scale > 0, block ids) run only
when ``validate=True``.
"""
from __future__ import annotations

import numbers

import numpy as np

INPUT_DTYPES = ("float8_e4m3fn", "bfloat16", "float16", "float32")
POOL_DTYPES = ("bfloat16", "float32", "float8_e4m3fn")
INDEX_BASES = ("relative", "absolute")
ORDERS = ("position", "score")
BACKENDS = ("auto", "cupy", "numba", "numpy")


def positive_int(value, name: str) -> int:
    if type(value) is int and value > 0:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"argument {name!r}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"argument {name!r}: expected a positive int, got {value}")
    return int(value)


def choice(value, name: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"argument {name!r}: expected one of {allowed}, got {value!r}")
    return value


def boolean(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"argument {name!r}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def dtype_in(t, name: str, allowed) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"argument {name!r}: expected dtype one of {tuple(allowed)}, got {t.dtype}")


def shape_is(t, name: str, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"argument {name!r}: expected shape {tuple(expected)} ({meaning}), got {tuple(t.shape)}")


def ndim_is(t, name: str, ndim: int, meaning: str) -> None:
    if len(t.shape) != ndim:
        raise ValueError(f"argument {name!r}: expected a {ndim}-D array {meaning}, got shape {tuple(t.shape)}")


def selection_params(*, block_size=None, block_topk=None, topk=None):
    """Positive sizes, block_topk >= 2 and block_topk * block_size >= topk (when all are given)."""
    out = {}
    if block_size is not None:
        out["block_size"] = positive_int(block_size, "block_size")
    if block_topk is not None:
        out["block_topk"] = positive_int(block_topk, "block_topk")
        if out["block_topk"] < 2:
            raise ValueError("argument 'block_topk': expected >= 2 (the first and the last eligible block "
                             f"are always kept), got {block_topk}")
    if topk is not None:
        out["topk"] = positive_int(topk, "topk")
    if block_size is not None and block_topk is not None and topk is not None:
        if out["block_topk"] * out["block_size"] < out["topk"]:
            raise ValueError(f"block_topk * block_size must be >= topk: expected >= {out['topk']}, got "
                             f"{out['block_topk']} * {out['block_size']} = {out['block_topk'] * out['block_size']}")
    return out


def _to_host(data):
    return data.get() if hasattr(data, "get") and not isinstance(data, np.ndarray) else np.asarray(data)


def ranges_in_bounds(ks, ke, S: int) -> None:
    """ks/ke values must lie in [0, S] (device read)."""
    for name, t in (("ks", ks), ("ke", ke)):
        if t is None or t.shape[0] == 0:
            continue
        v = _to_host(t.data)
        bad = np.flatnonzero((v < 0) | (v > S))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"argument {name!r}: expected values in [0, S={S}], got {name}[{i}] = {int(v[i])} "
                             f"({bad.size} bad entries; pass validate=False to clamp instead)")


def scale_positive(scale, name: str) -> None:
    """Scales must be finite and > 0 (device read)."""
    if scale is None or scale.shape[0] == 0:
        return
    v = _to_host(scale.data)
    bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"argument {name!r}: expected finite values > 0, got {name}[{i}] = {float(v[i])}")


def blocks_well_formed(blocks, nb: int) -> None:
    """Block ids per row: strictly ascending ids in [0, nb), then only -1 (device read)."""
    b = _to_host(blocks.data).astype(np.int64)
    if b.size == 0:
        return
    valid = b >= 0
    bad_range = np.argwhere(b >= nb)
    if bad_range.size:
        r, c = bad_range[0]
        raise ValueError(f"argument 'blocks': expected block ids in [0, {nb}) or -1, got blocks[{r}, {c}] = {b[r, c]}")
    bad_neg = np.argwhere(b < -1)
    if bad_neg.size:
        r, c = bad_neg[0]
        raise ValueError(f"argument 'blocks': expected block ids in [0, {nb}) or -1, got blocks[{r}, {c}] = {b[r, c]}")
    # -1 only after the valid ids, valid ids strictly ascending
    after_pad = np.argwhere(valid[:, 1:] & ~valid[:, :-1])
    if after_pad.size:
        r, c = after_pad[0]
        raise ValueError(f"argument 'blocks': expected -1 padding only at the end of a row, got row {r} = {b[r].tolist()}")
    desc = np.argwhere(valid[:, 1:] & (b[:, 1:] <= b[:, :-1]))
    if desc.size:
        r, c = desc[0]
        raise ValueError(f"argument 'blocks': expected strictly ascending block ids, got row {r} = {b[r].tolist()}")
