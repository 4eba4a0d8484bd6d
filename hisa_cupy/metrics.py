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


def _row_sets(a, b):
    """Per-row sizes of set(a[t]), set(b[t]) and their intersection, ignoring -1 (vectorised)."""
    a = to_numpy(a)
    b = to_numpy(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected two [T, k] index arrays with the same T, got {a.shape} and {b.shape}")
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    T = a.shape[0]
    # Encode (row, index) as one int64 key so that set operations run over all rows at once.
    lo = min(int(a.min(initial=0)), int(b.min(initial=0)))
    span = max(int(a.max(initial=0)), int(b.max(initial=0))) - lo + 1

    def keys(x):
        rows = np.broadcast_to(np.arange(T, dtype=np.int64)[:, None], x.shape)
        valid = x != -1
        return np.unique(rows[valid] * span + (x[valid] - lo))

    ka, kb = keys(a), keys(b)
    common = np.intersect1d(ka, kb, assume_unique=True)
    na = np.bincount(ka // span, minlength=T)
    nb = np.bincount(kb // span, minlength=T)
    ni = np.bincount(common // span, minlength=T)
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
