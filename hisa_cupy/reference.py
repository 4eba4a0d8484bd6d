"""NumPy reference implementation of the selection semantics (SPEC.md §2-§7).

This module is the normative, executable statement of what every backend computes. It is
written for clarity, not speed: it loops over rows where that reads more naturally, and it only
vectorises the heavy part (query-key dot products) in row chunks so that memory stays bounded.

Conventions
-----------
* Arrays are NumPy arrays in *logical* dtypes: ``q``/``k`` are float32, float16,
  ``ml_dtypes.bfloat16`` or ``ml_dtypes.float8_e4m3fn`` (both the same dtype); ``weights`` is
  float32 ``[T, H]``; ``k_scale`` is float32 ``[S]`` or ``None`` (all ones).
* ``ks``/``ke`` are int32 ``[T]`` or ``None``. ``None`` means the causal default of SPEC §1
  (``ks = 0``, ``ke = S - T + t + 1``). Ranges are always clamped into ``[0, S]`` first (the
  documented ``validate=False`` behaviour); the reference validates nothing else.
* Positions are absolute key positions; outputs are int32 with ``-1`` padding (SPEC §7).

Numerics
--------
Scores are computed as the float32 rounding of the score evaluated in float64: products of
float32 values are exact in float64 and the sums carry 29 extra bits, so the result is the
correctly rounded score up to rare double-rounding cases, and -- unlike float32 BLAS, whose
rounding depends on the matrix shape -- it does not depend on which rows/columns are scored
together. On SPEC §9 exact-arithmetic inputs every intermediate is exact, so this equals any
float32 accumulation order bit for bit. ``relu(NaN)`` is NaN (NaN propagates like in
``torch.relu``), ``0 * inf`` is NaN, as in IEEE arithmetic.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "default_ranges",
    "clamp_ranges",
    "rank_order",
    "token_scores",
    "pool_keys",
    "block_scores",
    "select_blocks",
    "refine",
    "hisa_select",
    "dense_select",
    "block_sparse_select",
    "topk",
]

POOL_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}
INDEX_BASES = ("relative", "absolute")
ORDERS = ("position", "score")
FP8_MAX = np.float32(448.0)
FP8_MIN_SCALE = np.float32(1e-10)

# Upper bound on the number of float64 logits held at once (2**23 * 8 B = 64 MiB).
_CHUNK_ELEMS = 1 << 23


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _check_option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def _rows_per_chunk(H: int, N: int) -> int:
    """Rows of queries whose [rows, H, N] float64 logits fit the chunk budget."""
    return max(1, _CHUNK_ELEMS // max(1, H * N))


def default_ranges(T: int, S: int):
    """SPEC §1 causal default: the T queries are the last T positions of a length-S sequence.

    Returns ``(ks, ke)`` int32 ``[T]`` with ``ks[t] = 0`` and ``ke[t] = S - T + t + 1``
    (not clamped: ``ke`` can be < 1 when ``T > S``; see :func:`clamp_ranges`).
    """
    ks = np.zeros(T, dtype=np.int32)
    ke = (np.arange(T, dtype=np.int64) + (S - T + 1)).astype(np.int32)
    return ks, ke


def clamp_ranges(ks, ke, S: int):
    """Clip ``ks``/``ke`` into ``[0, S]`` (SPEC §8, ``validate=False``). Returns int32 copies."""
    ks = np.clip(np.asarray(ks, dtype=np.int64), 0, S).astype(np.int32)
    ke = np.clip(np.asarray(ke, dtype=np.int64), 0, S).astype(np.int32)
    return ks, ke


def _ranges(ks, ke, T: int, S: int):
    """Fill ``None`` with the causal default (SPEC §1), then clamp into ``[0, S]``."""
    dks, dke = default_ranges(T, S)
    ks = dks if ks is None else ks
    ke = dke if ke is None else ke
    ks, ke = clamp_ranges(ks, ke, S)
    if ks.shape != (T,) or ke.shape != (T,):
        raise ValueError(f"ks/ke: expected shape ({T},), got {ks.shape} and {ke.shape}")
    return ks, ke


# --------------------------------------------------------------------------------------------
# §3 ranking and the shared "rank, take, format" selection step
# --------------------------------------------------------------------------------------------
def rank_order(scores, positions=None) -> np.ndarray:
    """SPEC §3 ranking of a 1-D score vector.

    Returns the int64 permutation ``p`` such that ``scores[p]`` is in rank order: score
    descending (``-0.0 == +0.0``), equal scores by lower position, NaN below every non-NaN
    score (including ``-inf``), NaNs among themselves by position. ``positions`` (default:
    ``arange(len(scores))``) are the tie-break keys (key positions or block ids).
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {scores.shape}")
    if positions is None:
        positions = np.arange(scores.shape[0], dtype=np.int64)
    positions = np.asarray(positions)
    is_nan = np.isnan(scores)
    # -score, with NaN replaced by 0 (its rank is decided by is_nan) and -0.0 made +0.0. The NaNs
    # go before the cast: a signalling NaN's cast to float64 raises the invalid flag (a warning).
    neg = -np.where(is_nan, 0.0, scores).astype(np.float64) + 0.0
    # np.lexsort sorts by the last key first: is_nan, then -score, then position.
    return np.lexsort((positions, neg, is_nan)).astype(np.int64)


def _rank_take(scores, positions, n: int) -> np.ndarray:
    """Positions of the first ``n`` candidates under §3 (in rank order)."""
    positions = np.asarray(positions, dtype=np.int64)
    return positions[rank_order(scores, positions)[:n]]


def _format_row(chosen, width: int, *, offset: int = 0, order: str = "position") -> np.ndarray:
    """SPEC §7 output row: ``chosen - offset`` (ascending, or kept in rank order), then -1."""
    chosen = np.asarray(chosen, dtype=np.int64)
    if order == "position":
        chosen = np.sort(chosen)
    row = np.full(width, -1, dtype=np.int32)
    row[: chosen.shape[0]] = chosen - offset
    return row


def _select_row(scores, positions, n, *, width, ks_t, index_base, order) -> np.ndarray:
    """Rank the candidates ``positions`` by ``scores`` (§3), keep the first ``n``, format (§7).

    Shared by dense selection (§4), refinement (§5.6) and the block-sparse baseline (§6).
    """
    chosen = _rank_take(scores, positions, n)
    offset = int(ks_t) if index_base == "relative" else 0
    return _format_row(chosen, width, offset=offset, order=order)


# --------------------------------------------------------------------------------------------
# §2 token scores, §5.2 pooling, §5.3 block scores
# --------------------------------------------------------------------------------------------
def token_scores(q, k, weights, k_scale=None) -> np.ndarray:
    """SPEC §2 token scores ``I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h] . k[s])``.

    q ``[T, H, D]``, k ``[S, D]`` (any logical dtype), weights float32 ``[T, H]``, k_scale
    float32 ``[S]`` or None. Returns float32 ``[T, S]``. The head sum is rounded to float32
    first and then multiplied by ``k_scale`` in float32 (k_scale applies after the head sum).
    Rows are processed in chunks so the float64 logits stay below ~64 MiB.
    """
    q = np.asarray(q)
    k = np.asarray(k)
    T, H, D = q.shape
    S = k.shape[0]
    if k.shape != (S, D):
        raise ValueError(f"k: expected shape ({S}, {D}) matching q's D, got {k.shape}")
    w = np.asarray(weights, dtype=np.float32).astype(np.float64)
    kT = k.astype(np.float32).astype(np.float64).T  # [D, S]
    out = np.empty((T, S), dtype=np.float32)
    step = _rows_per_chunk(H, S)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf follow IEEE, silently
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            qc = q[t0:t1].astype(np.float32).astype(np.float64).reshape(-1, D)
            logits = (qc @ kT).reshape(t1 - t0, H, S)  # q[t, h] . k[s]
            relu = np.maximum(logits, 0.0, out=logits)  # np.maximum propagates NaN
            head_sum = np.matmul(w[t0:t1, None, :], relu)[:, 0, :]  # sum_h w[t, h] * relu(.)
            out[t0:t1] = head_sum.astype(np.float32)
        if k_scale is not None:
            out *= np.asarray(k_scale, dtype=np.float32)[None, :]
    return out


def pool_keys(k, k_scale=None, *, block_size: int = 128, pool_dtype: str = "bfloat16"):
    """SPEC §5.1-5.2 pooled block keys.

    k ``[S, D]`` (any logical dtype), k_scale float32 ``[S]`` or None. Block b covers
    ``[b*B, min((b+1)*B, S))``; ``nb = ceil(S / B)``. The mean of the dequantised keys
    ``k[s] * k_scale[s]`` is accumulated in float32 in token order and divided by the block's
    token count (float32 division), then stored in ``pool_dtype``:

    * ``"bfloat16"``: ``ml_dtypes.bfloat16`` (round to nearest even); pooled_scale None.
    * ``"float32"``: the float32 mean; pooled_scale None.
    * ``"float8_e4m3fn"``: ``scale[b] = max(amax[b] / 448, 1e-10)`` (amax = max |mean| over D,
      float32), value ``= fp8(clip(mean / scale, -448, 448))`` (round to nearest even).

    Returns ``(pooled [nb, D], pooled_scale [nb] float32 or None)``.
    """
    _check_option("pool_dtype", pool_dtype, tuple(POOL_DTYPES))
    B = int(block_size)
    k = np.asarray(k)
    S, D = k.shape
    nb = -(-S // B)
    kf = k.astype(np.float32)
    if k_scale is not None:
        kf = kf * np.asarray(k_scale, dtype=np.float32)[:, None]
    starts = np.arange(nb, dtype=np.int64) * B
    sums = np.zeros((nb, D), dtype=np.float32)
    for j in range(B):  # add token j of every block, in token order
        pos = starts + j
        has = pos < S
        sums[has] += kf[pos[has]]
    counts = np.minimum(B, S - starts).astype(np.float32)
    mean = sums / counts[:, None]
    if pool_dtype == "float32":
        return mean, None
    if pool_dtype == "bfloat16":
        return mean.astype(ml_dtypes.bfloat16), None
    amax = np.max(np.abs(mean), axis=1) if D > 0 else np.zeros(nb, np.float32)
    scale = np.maximum(amax / FP8_MAX, FP8_MIN_SCALE).astype(np.float32)
    scaled = np.clip(mean / scale[:, None], -FP8_MAX, FP8_MAX)
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale


def block_scores(q, pooled, weights, pooled_scale=None) -> np.ndarray:
    """SPEC §5.3 block scores ``J[t, b]``: :func:`token_scores` with keys = pooled blocks.

    q ``[T, H, D]``, pooled ``[nb, D]`` (bf16 / fp32 / fp8), weights float32 ``[T, H]``,
    pooled_scale float32 ``[nb]`` (fp8 pooling) or None. Returns float32 ``[T, nb]``.
    """
    return token_scores(q, pooled, weights, pooled_scale)


# --------------------------------------------------------------------------------------------
# §5.4 block selection, §5.5-5.6 refinement
# --------------------------------------------------------------------------------------------
def select_blocks(q, pooled, weights, *, pooled_scale=None, ks, ke, block_size: int = 128,
                  block_topk: int = 64, seq_len=None) -> np.ndarray:
    """SPEC §5.4 block selection.

    Eligible blocks of row t: ``[ks//B, (ke-1)//B]`` (none when ``ke <= ks``), after clamping
    ks/ke into ``[0, seq_len]`` (``seq_len`` defaults to ``nb * B``). With at most m eligible
    blocks all are selected; otherwise the first and last eligible blocks are forced and the
    best ``m - 2`` others are chosen by §3 on ``J``. (For ``m == 1`` the forced blocks compete
    by block index, so only the first eligible block survives.)

    Returns int32 ``[T, block_topk]``: selected block ids ascending, then -1.
    """
    B, m = int(block_size), int(block_topk)
    pooled = np.asarray(pooled)
    nb = pooled.shape[0]
    T = np.asarray(q).shape[0]
    seq_len = nb * B if seq_len is None else int(seq_len)
    ks, ke = _ranges(ks, ke, T, seq_len)
    J = block_scores(q, pooled, weights, pooled_scale)
    out = np.full((T, m), -1, dtype=np.int32)
    for t in range(T):
        if ke[t] <= ks[t]:
            continue
        first = int(ks[t]) // B
        last = min(nb - 1, (int(ke[t]) - 1) // B)
        if last < first:
            continue
        eligible = np.arange(first, last + 1)
        if eligible.shape[0] <= m:
            chosen = eligible
        else:
            others = eligible[1:-1]
            best = _rank_take(J[t, others], others, m - 2)
            chosen = np.concatenate([[first, last], best])[:m]
        out[t] = _format_row(chosen, m)
    return out


def _block_positions(block_ids, nb: int, B: int, S: int) -> np.ndarray:
    """Sorted key positions covered by the valid (``0 <= id < nb``, -1 ignored) block ids."""
    ids = np.unique(np.asarray(block_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < nb)]
    if ids.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    pos = (ids[:, None] * B + np.arange(B)[None, :]).reshape(-1)
    return pos[pos < S]


def refine(q, k, weights, blocks, *, k_scale=None, ks, ke, block_size: int = 128,
           topk: int = 2048, index_base: str = "relative", order: str = "position") -> np.ndarray:
    """SPEC §5.5-5.6 token-level refinement inside the selected blocks.

    Candidates of row t: positions of the valid block ids in ``blocks[t]`` (``0 <= id < nb``;
    -1 and out-of-range ids ignored, duplicates count once) that lie in ``[ks[t], ke[t])``.
    The first ``min(topk, #candidates)`` under §3 on the token scores are kept and formatted
    per §7. blocks int32 ``[T, m]``; returns int32 ``[T, topk]``.
    """
    _check_option("index_base", index_base, INDEX_BASES)
    _check_option("order", order, ORDERS)
    q = np.asarray(q)
    k = np.asarray(k)
    blocks = np.asarray(blocks)
    T, H, _ = q.shape
    S = k.shape[0]
    B, width = int(block_size), int(topk)
    nb = -(-S // B)
    ks, ke = _ranges(ks, ke, T, S)
    scale = None if k_scale is None else np.asarray(k_scale, dtype=np.float32)
    out = np.full((T, width), -1, dtype=np.int32)
    step = _rows_per_chunk(H, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        cands = []
        for t in range(t0, t1):
            pos = _block_positions(blocks[t], nb, B, S)
            cands.append(pos[(pos >= ks[t]) & (pos < ke[t])])
        # Score the union of this chunk's candidates once (same values as a full-row score).
        union = np.unique(np.concatenate(cands)) if cands else np.zeros(0, np.int64)
        I = token_scores(q[t0:t1], k[union], np.asarray(weights)[t0:t1],
                         None if scale is None else scale[union])
        for t, cand in zip(range(t0, t1), cands):
            scores = I[t - t0, np.searchsorted(union, cand)]
            out[t] = _select_row(scores, cand, min(width, cand.shape[0]), width=width,
                                 ks_t=ks[t], index_base=index_base, order=order)
    return out


# --------------------------------------------------------------------------------------------
# end-to-end selections: §5 HISA, §4 dense, §6 block-sparse
# --------------------------------------------------------------------------------------------
def hisa_select(q, k, weights, *, k_scale=None, ks=None, ke=None, block_size: int = 128,
                block_topk: int = 64, topk: int = 2048, pool_dtype: str = "bfloat16",
                index_base: str = "relative", order: str = "position") -> np.ndarray:
    """SPEC §5 HISA selection: pool (§5.2) -> select blocks (§5.4) -> refine (§5.5-5.6).

    q ``[T, H, D]``, k ``[S, D]``, weights float32 ``[T, H]``, k_scale float32 ``[S]`` or None,
    ks/ke int32 ``[T]`` or None. Returns int32 ``[T, topk]`` (§7).
    """
    S = np.asarray(k).shape[0]
    T = np.asarray(q).shape[0]
    ks, ke = _ranges(ks, ke, T, S)
    pooled, pooled_scale = pool_keys(k, k_scale, block_size=block_size, pool_dtype=pool_dtype)
    blocks = select_blocks(q, pooled, weights, pooled_scale=pooled_scale, ks=ks, ke=ke,
                           block_size=block_size, block_topk=block_topk, seq_len=S)
    return refine(q, k, weights, blocks, k_scale=k_scale, ks=ks, ke=ke, block_size=block_size,
                  topk=topk, index_base=index_base, order=order)


def dense_select(q, k, weights, *, k_scale=None, ks=None, ke=None, topk: int = 2048,
                 index_base: str = "relative", order: str = "position") -> np.ndarray:
    """SPEC §4 dense DSA selection: row t keeps the first ``min(topk, ke - ks)`` positions of
    ``[ks[t], ke[t])`` under §3 on the token scores. Returns int32 ``[T, topk]`` (§7)."""
    _check_option("index_base", index_base, INDEX_BASES)
    _check_option("order", order, ORDERS)
    q = np.asarray(q)
    T, H, _ = q.shape
    S = np.asarray(k).shape[0]
    width = int(topk)
    ks, ke = _ranges(ks, ke, T, S)
    out = np.full((T, width), -1, dtype=np.int32)
    step = _rows_per_chunk(H, S)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        I = token_scores(q[t0:t1], k, np.asarray(weights)[t0:t1], k_scale)
        for t in range(t0, t1):
            cand = np.arange(ks[t], max(ks[t], ke[t]), dtype=np.int64)
            out[t] = _select_row(I[t - t0, cand], cand, min(width, cand.shape[0]), width=width,
                                 ks_t=ks[t], index_base=index_base, order=order)
    return out


def block_sparse_select(q, k, weights, *, k_scale=None, ks=None, ke=None, block_size: int = 128,
                        topk: int = 2048, pool_dtype: str = "bfloat16",
                        index_base: str = "relative", order: str = "position") -> np.ndarray:
    """SPEC §6 block-sparse baseline: §5 steps 1-4 with ``m = topk // B`` blocks, no
    refinement; every candidate position of the selected blocks is output (``order="score"``
    ranks them by token score, §3). Returns int32 ``[T, topk]`` (§7)."""
    _check_option("index_base", index_base, INDEX_BASES)
    _check_option("order", order, ORDERS)
    q = np.asarray(q)
    T, H, _ = q.shape
    S = np.asarray(k).shape[0]
    B, width = int(block_size), int(topk)
    m = width // B
    nb = -(-S // B)
    ks, ke = _ranges(ks, ke, T, S)
    pooled, pooled_scale = pool_keys(k, k_scale, block_size=B, pool_dtype=pool_dtype)
    blocks = select_blocks(q, pooled, weights, pooled_scale=pooled_scale, ks=ks, ke=ke,
                           block_size=B, block_topk=m, seq_len=S)
    out = np.full((T, width), -1, dtype=np.int32)
    for t in range(T):
        pos = _block_positions(blocks[t], nb, B, S)
        cand = pos[(pos >= ks[t]) & (pos < ke[t])]
        if order == "score":
            scores = token_scores(q[t:t + 1], np.asarray(k)[cand], np.asarray(weights)[t:t + 1],
                                  None if k_scale is None else np.asarray(k_scale)[cand])[0]
        else:  # all scores equal: §3 then orders by position, which is what is output anyway
            scores = np.zeros(cand.shape[0], dtype=np.float32)
        out[t] = _select_row(scores, cand, cand.shape[0], width=width, ks_t=ks[t],
                             index_base=index_base, order=order)
    return out


# --------------------------------------------------------------------------------------------
# exact row top-k (the kernel-level primitive)
# --------------------------------------------------------------------------------------------
def topk(scores, k: int, *, lengths=None):
    """Exact row top-k of float32 ``scores [R, N]`` over columns ``[0, lengths[r])``.

    lengths int32 ``[R]`` or None (= N), clamped into ``[0, N]``. Output in §3 rank order:
    ``(values float32 [R, k], indices int32 [R, k])``; padding slots hold index -1 and value
    ``-inf``.
    """
    scores = np.asarray(scores, dtype=np.float32)
    R, N = scores.shape
    k = int(k)
    if lengths is None:
        lengths = np.full(R, N, dtype=np.int64)
    lengths = np.clip(np.asarray(lengths, dtype=np.int64), 0, N)
    values = np.full((R, k), -np.inf, dtype=np.float32)
    indices = np.full((R, k), -1, dtype=np.int32)
    for r in range(R):
        cols = np.arange(lengths[r], dtype=np.int64)
        idx = _rank_take(scores[r, cols], cols, min(k, cols.shape[0]))
        indices[r, : idx.shape[0]] = idx
        values[r, : idx.shape[0]] = scores[r, idx]
    return values, indices
