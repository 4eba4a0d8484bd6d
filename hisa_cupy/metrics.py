"""Selection-quality metrics: per-row IoU and recall of index sets.

Inputs are ``[T, k]`` integer index arrays from any framework (NumPy, PyTorch, JAX, CuPy);
``-1`` entries are padding and are ignored, duplicates within a row count once. The two
arguments may have different widths but must have the same number of rows and the same
index base (both relative or both absolute).
"""
from __future__ import annotations

import numpy as np

from .testing import to_numpy

__all__ = ["iou", "mean_iou", "recall"]


def _unique_rows(x) -> np.ndarray:
    """int64 copy of ``x`` with each row sorted and its padding (< 0) and repeated entries set to -1."""
    x = np.sort(x.astype(np.int64), axis=1)
    repeated = np.zeros(x.shape, dtype=bool)
    repeated[:, 1:] = x[:, 1:] == x[:, :-1]
    return np.where((x >= 0) & ~repeated, x, -1)


def _row_sets(a, b):
    """Per-row sizes of set(a[t]), set(b[t]) and their intersection, ignoring negatives.

    One sort per row of the two rows side by side: an index present in both sets shows up as two
    equal neighbours (each set holds it once). O(T k log k), fine for [4096, 2048] arrays.
    """
    a = to_numpy(a)
    b = to_numpy(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected two [T, k] index arrays with the same T, got {a.shape} and {b.shape}")
    a, b = _unique_rows(a), _unique_rows(b)
    both = np.concatenate([a, b], axis=1)
    both = np.where(both >= 0, both, -1 - np.arange(both.shape[1])[None, :])  # padding never pairs
    both.sort(axis=1)
    ni = ((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum(axis=1)
    na = (a >= 0).sum(axis=1)
    nb = (b >= 0).sum(axis=1)
    return na.astype(np.float64), nb.astype(np.float64), ni.astype(np.float64)


def iou(a, b) -> np.ndarray:
    """Per-row intersection over union of the index sets of ``a`` and ``b``: float64 ``[T]``.

    Two empty rows give 1.0.
    """
    na, nb, ni = _row_sets(a, b)
    union = na + nb - ni
    return np.where(union > 0, ni / np.maximum(union, 1.0), 1.0)


def mean_iou(a, b) -> float:
    """Mean of :func:`iou` over rows (1.0 for zero rows)."""
    values = iou(a, b)
    return float(values.mean()) if values.shape[0] else 1.0


def recall(selected, reference) -> np.ndarray:
    """Per-row fraction of ``reference``'s valid indices present in ``selected``: float64 ``[T]``.

    An empty reference row gives 1.0.
    """
    _, n_ref, n_common = _row_sets(selected, reference)
    return np.where(n_ref > 0, n_common / np.maximum(n_ref, 1.0), 1.0)
