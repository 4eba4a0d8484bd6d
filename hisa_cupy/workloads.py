"""Seeded synthetic indexer inputs shaped like DeepSeek-V3.2's lightning indexer.

Every generator returns the arrays one layer's indexer sees during a prefill step: ``q``
``[T, H, D]`` (H = 64 heads, D = 128 in DeepSeek-V3.2), one key per token ``k`` ``[S, D]``,
fp32 head weights ``[T, H]`` and a per-token key scale ``k_scale`` ``[S]``. The ``T`` queries are
the last ``T`` positions of one causal sequence of length ``S`` (``ks = 0``,
``ke = S - T + t + 1``, SPEC §1).

Quantisation follows DeepSeek-V3.2's indexer (``dtype="float8_e4m3fn"``, the default):

* keys: one scale per token, ``k_scale[s] = amax_d |k[s, d]| / 448``; the stored fp8 key is
  ``k[s] / k_scale[s]`` rounded to e4m3, so its largest magnitude is 448 and
  ``k_fp8 * k_scale`` recovers the key to fp8 precision (relative error <= 2**-4).
* queries: one scale per (token, head), ``amax_d |q[t, h, d]| / 448``; it is not passed
  separately but folded into the fp32 weights, together with DeepSeek's ``H**-0.5`` head
  normalisation and ``D**-0.5`` softmax scale:
  ``weights[t, h] = w[t, h] * H**-0.5 * D**-0.5 * q_scale[t, h]``.

With ``dtype`` ``"bfloat16"``, ``"float16"`` or ``"float32"`` the same latent values are cast
directly, ``k_scale`` is all ones and the weights hold no query scale. The latent fp32 values
depend only on ``(kind, seq_len, num_queries, num_heads, head_dim, seed)``, never on ``dtype``,
so the same seed in two dtypes describes the same workload at two precisions.

Kinds (``WORKLOAD_KINDS``):

``"random"``
    iid standard normal queries and keys, normal weights of both signs. No structure at all:
    block means carry almost no information, so it is HISA's worst case (and a fair data set
    for timing, since nothing is skewed).
``"segments"``
    Models a long document made of contiguous topical segments (chapters, files, turns of a
    conversation). Segment lengths vary (log-normal, median ~ 4 sqrt(S) tokens, capped at 1024)
    and topics recur, so the same topic appears in several distant segments. A key is its
    segment's topic centre, scaled by a per-token salience, plus noise and a positional
    (rotary-like) component. Each query row attends to a few topics -- its own segment's and a
    few earlier ones, shared by neighbouring rows -- and each of its heads follows one of them.
    Two features every real indexer shows are added: an attention sink (position 0 holds a key
    every query head partly aligns with) and a recency bias (the positional components make
    recent keys score higher). A few "noise heads" with small weights of either sign model
    heads that carry no retrieval signal. This is where block-level selection works: whole
    blocks are relevant or not.
``"needles"``
    The ``segments`` background plus rare single tokens far back (in the first three quarters
    of the context before the queries) whose keys point in a direction nothing else uses; a few
    query rows per needle have heads aligned with it, so the needle is among those rows' best
    tokens. Mean pooling dilutes a lone token by the block size, so this measures whether the
    block filter loses isolated evidence. The planted ``(row, position)`` pairs are returned in
    ``info["needle_pairs"]`` so that a benchmark can measure needle recall.

Example::

    wl = make_workload("segments", seq_len=8192, num_queries=256, seed=0)
    idx = hisa_cupy.hisa_select(wl.q, wl.k, wl.weights, k_scale=wl.k_scale, ks=wl.ks, ke=wl.ke)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

__all__ = ["Workload", "WORKLOAD_KINDS", "WORKLOAD_DTYPES", "make_workload"]

WORKLOAD_KINDS = ("random", "segments", "needles")
WORKLOAD_DTYPES = ("float8_e4m3fn", "bfloat16", "float16", "float32")

_NP_DTYPES = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
FP8_MAX = 448.0
_MIN_AMAX = 1e-12  # a row of zeros still gets a finite, positive scale

# ---- structure constants of the "segments" / "needles" kinds (documented in the docstrings) --
_SEG_MEDIAN_MAX = 1024        # median segment length is min(4 sqrt(S), 1024), at least 32
_SEG_SIGMA = 0.7              # log-normal spread of segment lengths
_SEG_MIN = 8                  # shortest segment
_TOPIC_REUSE = 2.0            # segments per topic on average (topics recur)
_KEY_NOISE = 0.8              # std of key noise (centres have unit variance per dim)
_KEY_SALIENCE_SIGMA = 0.3     # log-normal per-token salience of the topic component
_KEY_POS = 1.0                # amplitude of the positional (recency) component of keys
_NUM_FREQS = 8                # positional frequency pairs (periods 32 .. 4096 tokens)
_QUERY_NOISE = 0.8            # std of query noise
_QUERY_TOPIC_GAIN = 1.0       # gain of the attended topic centre in a query head
_ACTIVE_TOPICS = 4            # topics one query segment draws from (own topic + 3 earlier)
_NOISE_HEAD_FRACTION = 0.125  # heads without retrieval signal
_SINK_KEY_GAIN = 3.0          # norm of the sink key relative to a topic centre
_NEEDLE_KEY_GAIN = 2.0        # norm of a needle key relative to a topic centre
_NEEDLE_QUERY_GAIN = 2.5      # gain of the needle direction in a matched query head
_NEEDLE_HEAD_FRACTION = 0.5   # fraction of a matched row's heads that look for its needle
_MAX_ROWS_PER_NEEDLE = 4


@dataclass
class Workload:
    """One indexer call's inputs (SPEC §1), NumPy arrays in logical dtypes.

    ``q [T, H, D]`` and ``k [S, D]`` have the workload dtype (``ml_dtypes.float8_e4m3fn`` /
    ``ml_dtypes.bfloat16`` / float16 / float32), ``weights [T, H]`` and ``k_scale [S]`` are
    float32, ``ks``/``ke`` int32 ``[T]`` (the causal default, explicit). ``info`` holds what the
    generator planted (segment bounds, needle pairs, ...).
    """

    q: np.ndarray
    k: np.ndarray
    weights: np.ndarray
    k_scale: np.ndarray
    ks: np.ndarray
    ke: np.ndarray
    kind: str
    dtype: str
    seed: int
    info: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.k.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.q.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.q.shape[2])

    @property
    def query_start(self) -> int:
        """Absolute position of query row 0 (row t sits at ``query_start + t``)."""
        return self.seq_len - self.num_queries

    def arrays(self) -> dict:
        """Keyword arguments for the selection API: ``q, k, weights, k_scale, ks, ke``."""
        return dict(q=self.q, k=self.k, weights=self.weights, k_scale=self.k_scale,
                    ks=self.ks, ke=self.ke)

    def physical(self) -> dict:
        """Same as :meth:`arrays`, with fp8 / bf16 viewed as their uint8 / uint16 bit patterns
        (no copy). This is what device libraries without those dtypes (CuPy) can hold; pass
        ``dtype=wl.dtype`` to the selection functions alongside."""
        out = self.arrays()
        if self.dtype == "float8_e4m3fn":
            out["q"], out["k"] = self.q.view(np.uint8), self.k.view(np.uint8)
        elif self.dtype == "bfloat16":
            out["q"], out["k"] = self.q.view(np.uint16), self.k.view(np.uint16)
        return out

    def slice_queries(self, num_queries: int) -> "Workload":
        """The workload restricted to its last ``num_queries`` rows (still the last rows of the
        same causal sequence). Planted needle pairs are re-indexed and filtered."""
        T = self.num_queries
        n = _check_int("num_queries", num_queries, 1)
        if n > T:
            raise ValueError(f"num_queries: expected at most {T}, got {n}")
        lo = T - n
        info = dict(self.info)
        if "needle_pairs" in info:
            pairs = np.asarray(info["needle_pairs"])
            keep = pairs[:, 0] >= lo
            info["needle_pairs"] = np.stack([pairs[keep, 0] - lo, pairs[keep, 1]], axis=1)
        if "query_topics" in info:
            info["query_topics"] = info["query_topics"][lo:]
        return Workload(q=self.q[lo:], k=self.k, weights=self.weights[lo:], k_scale=self.k_scale,
                        ks=self.ks[lo:], ke=self.ke[lo:], kind=self.kind, dtype=self.dtype,
                        seed=self.seed, info=info)


# ------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def _check_args(kind, seq_len, num_queries, num_heads, head_dim, dtype, seed):
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"kind: expected one of {WORKLOAD_KINDS}, got {kind!r}")
    S = _check_int("seq_len", seq_len, 1)
    T = _check_int("num_queries", num_queries, 1)
    if T > S:
        raise ValueError(f"num_queries: expected at most seq_len={S} (the queries are the last "
                         f"positions of the sequence), got {T}")
    H = _check_int("num_heads", num_heads, 1)
    D = _check_int("head_dim", head_dim, 1)
    if isinstance(dtype, np.dtype) or isinstance(dtype, type):
        dtype = np.dtype(dtype).name
    if dtype not in WORKLOAD_DTYPES:
        raise ValueError(f"dtype: expected one of {WORKLOAD_DTYPES}, got {dtype!r}")
    seed = _check_int("seed", seed, 0)
    return S, T, H, D, dtype, seed


# ------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------
def make_workload(kind: str, *, seq_len: int, num_queries: int, num_heads: int = 64,
                  head_dim: int = 128, dtype: str = "float8_e4m3fn", seed: int = 0) -> Workload:
    """Build one seeded indexer workload (see the module docstring for what each kind models).

    Parameters
    ----------
    kind: one of ``WORKLOAD_KINDS`` (``"random"``, ``"segments"``, ``"needles"``).
    seq_len: S, the causal sequence length (number of keys), >= 1.
    num_queries: T, query rows; they are the last T positions of the sequence (1 <= T <= S).
    num_heads, head_dim: H and D (DeepSeek-V3.2: 64 and 128).
    dtype: ``"float8_e4m3fn"`` (default, per-token key scale, query scale folded into the
        weights), ``"bfloat16"``, ``"float16"`` or ``"float32"`` (k_scale all ones).
    seed: non-negative integer; equal arguments give bit-identical arrays.

    Returns a :class:`Workload`. Raises ``ValueError`` naming the offending argument.
    """
    S, T, H, D, dtype, seed = _check_args(kind, seq_len, num_queries, num_heads, head_dim,
                                          dtype, seed)
    # Independent streams per component, so that e.g. the keys do not depend on T.
    # "needles" shares the "segments" streams: same seed, same background document.
    family = 0 if kind == "random" else 1
    streams = np.random.SeedSequence([seed, family, 0x4855]).spawn(5)
    rngs = [np.random.default_rng(s) for s in streams]
    if kind == "random":
        q, k, w, info = _random(S, T, H, D, rngs)
    else:
        q, k, w, info = _segments(S, T, H, D, rngs, needles=(kind == "needles"))
    info["query_start"] = S - T
    q, k, weights, k_scale = _quantise(q, k, w, dtype)
    ks = np.zeros(T, dtype=np.int32)
    ke = np.arange(S - T + 1, S + 1, dtype=np.int32)
    return Workload(q=q, k=k, weights=weights, k_scale=k_scale, ks=ks, ke=ke, kind=kind,
                    dtype=dtype, seed=seed, info=info)


# ------------------------------------------------------------------------------------------
# quantisation (DeepSeek-V3.2 indexer conventions)
# ------------------------------------------------------------------------------------------
def _to_fp8_rows(x: np.ndarray):
    """Per-row (last axis) fp8 e4m3 quantisation with scale amax/448.

    Returns ``(x_fp8, scale)`` with ``x_fp8 * scale ~= x``; ``x`` is overwritten (scratch).
    """
    amax = np.max(np.abs(x), axis=-1)
    scale = (np.maximum(amax, _MIN_AMAX) / np.float32(FP8_MAX)).astype(np.float32)
    x /= scale[..., None]
    np.clip(x, -FP8_MAX, FP8_MAX, out=x)  # amax/scale may round a hair above 448
    return x.astype(ml_dtypes.float8_e4m3fn), scale


def _quantise(q, k, w, dtype):
    """Turn latent fp32 ``q, k`` and raw head weights ``w`` into the indexer's inputs."""
    T, H, D = q.shape
    S = k.shape[0]
    w = w.astype(np.float32) * np.float32(1.0 / math.sqrt(H * D))
    if dtype == "float8_e4m3fn":
        k8, k_scale = _to_fp8_rows(k)
        q8, q_scale = _to_fp8_rows(q)
        return q8, k8, (w * q_scale).astype(np.float32), k_scale
    target = _NP_DTYPES[dtype]
    qc = q if target == q.dtype else q.astype(target)
    kc = k if target == k.dtype else k.astype(target)
    return qc, kc, w, np.ones(S, dtype=np.float32)


# ------------------------------------------------------------------------------------------
# kind "random"
# ------------------------------------------------------------------------------------------
def _random(S, T, H, D, rngs):
    _, r_keys, r_queries, r_weights, _ = rngs
    k = r_keys.standard_normal((S, D), dtype=np.float32)
    q = r_queries.standard_normal((T, H, D), dtype=np.float32)
    w = r_weights.standard_normal((T, H), dtype=np.float32)
    return q, k, w, {}


# ------------------------------------------------------------------------------------------
# kinds "segments" and "needles"
# ------------------------------------------------------------------------------------------
def _unit_rows(rng, n, D):
    """n random directions with norm sqrt(D) (unit variance per coordinate)."""
    v = rng.standard_normal((n, D), dtype=np.float32)
    v *= np.float32(math.sqrt(D)) / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)
    return v


def _segment_bounds(rng, S):
    """Contiguous segments covering [0, S) with log-normal lengths. Returns int64 bounds."""
    median = min(_SEG_MEDIAN_MAX, max(32.0, 4.0 * math.sqrt(S)))
    n_draw = int(S / (median * 0.5)) + 8  # more than enough: lengths rarely fall below median/2
    lengths = np.maximum(_SEG_MIN, rng.lognormal(math.log(median), _SEG_SIGMA, n_draw))
    ends = np.cumsum(lengths.astype(np.int64))
    while ends[-1] < S:  # practically never; keeps the function total
        ends = np.concatenate([ends, ends[-1] + ends])
    n_seg = int(np.searchsorted(ends, S, side="left")) + 1
    bounds = np.concatenate([[0], ends[:n_seg]]).astype(np.int64)
    bounds[-1] = S
    return bounds


def _segment_topics(rng, n_seg, n_topics):
    """Topic id per segment, never the same topic in two adjacent segments (if possible)."""
    topics = rng.integers(0, n_topics, n_seg)
    if n_topics > 1:
        # Re-draw a segment's topic as (previous + 1 + u) mod n: never equal to the previous.
        shifts = rng.integers(1, n_topics, n_seg)
        for i in range(1, n_seg):  # n_seg is at most a few hundred
            if topics[i] == topics[i - 1]:
                topics[i] = (topics[i - 1] + shifts[i]) % n_topics
    return topics.astype(np.int64)


def _positional(positions, basis, periods):
    """Rotary-like positional vectors: sum_j cos/sin(2 pi p / period_j) along basis pairs.

    The dot product of the vectors at positions p and s is sum_j cos(2 pi (p - s) / period_j):
    largest for s close to p, which gives the recency bias.
    """
    ang = (2.0 * np.pi / periods)[None, :] * positions.astype(np.float64)[:, None]  # [n, J]
    feats = np.concatenate([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)  # [n, 2J]
    return feats @ basis  # [n, D]


def _segments(S, T, H, D, rngs, *, needles: bool):
    r_struct, r_keys, r_queries, r_weights, r_needles = rngs
    info: dict = {}

    # --- document structure: segments, topics, centres, sink and positional directions -----
    bounds = _segment_bounds(r_struct, S)
    n_seg = bounds.shape[0] - 1
    n_topics = max(2, int(round(n_seg / _TOPIC_REUSE)))
    seg_topic = _segment_topics(r_struct, n_seg, n_topics)
    centres = _unit_rows(r_struct, n_topics, D)
    sink_dir = _unit_rows(r_struct, 1, D)[0]
    J = min(_NUM_FREQS, D // 4)  # no positional component for D < 4
    periods = np.geomspace(32.0, 4096.0, J)
    basis = np.linalg.qr(r_struct.standard_normal((D, 2 * J)))[0].T.astype(np.float32)
    basis *= np.float32(math.sqrt(D / max(1, 2 * J)))  # [2J, D]; unit variance per coordinate

    seg_len = np.diff(bounds)
    token_topic = np.repeat(seg_topic, seg_len)  # [S]
    info.update(segment_bounds=bounds, segment_topics=seg_topic, num_topics=n_topics,
                sink_positions=np.array([0], dtype=np.int64))

    # --- keys: salience * topic centre + noise + positional; a sink at position 0 ----------
    k = r_keys.standard_normal((S, D), dtype=np.float32)
    k *= np.float32(_KEY_NOISE)
    salience = r_keys.lognormal(0.0, _KEY_SALIENCE_SIGMA, S).astype(np.float32)
    k += salience[:, None] * centres[token_topic]
    k += np.float32(_KEY_POS) * _positional(np.arange(S), basis, periods)
    k[0] = np.float32(_SINK_KEY_GAIN) * sink_dir  # the attention sink

    # --- query structure: which topics each row and head follows ---------------------------
    q0 = S - T
    qpos = np.arange(q0, S)
    row_seg = np.searchsorted(bounds, qpos, side="right") - 1  # segment of each query row
    own_topic = seg_topic[row_seg]
    # Topics visible to every query (segments that start before the first query position).
    visible = np.unique(seg_topic[bounds[:-1] < max(q0, 1)])
    # Each query segment draws _ACTIVE_TOPICS - 1 earlier topics; its rows share them, so
    # neighbouring rows look at the same blocks (as in real prefill).
    qsegs = np.unique(row_seg)
    extra = r_queries.choice(visible, size=(qsegs.shape[0], _ACTIVE_TOPICS - 1), replace=True)
    row_extra = extra[np.searchsorted(qsegs, row_seg)]  # [T, A-1]
    row_topics = np.concatenate([own_topic[:, None], row_extra], axis=1)  # [T, A]
    # Each head follows one of its row's topics: own topic 40%, each earlier one 20%.
    probs = np.array([0.4] + [0.6 / (_ACTIVE_TOPICS - 1)] * (_ACTIVE_TOPICS - 1))
    head_choice = r_queries.choice(_ACTIVE_TOPICS, size=(T, H), p=probs)
    head_topic = np.take_along_axis(row_topics, head_choice, axis=1)  # [T, H]
    info["query_topics"] = row_topics

    n_noise_heads = int(round(_NOISE_HEAD_FRACTION * H)) if H >= 4 else 0
    noise_heads = np.zeros(H, dtype=bool)
    noise_heads[r_struct.choice(H, size=n_noise_heads, replace=False)] = True
    recency = r_struct.uniform(0.3, 1.5, H).astype(np.float32)  # per-head positional gain
    sink_gain = r_struct.uniform(0.3, 0.8, H).astype(np.float32)  # per-head sink affinity
    info["noise_heads"] = np.flatnonzero(noise_heads)

    # --- queries: noise + topic centre + recency + sink (noise heads: noise only) -----------
    q = r_queries.standard_normal((T, H, D), dtype=np.float32)
    q *= np.float32(_QUERY_NOISE)
    topic_gain = np.where(noise_heads, 0.0, _QUERY_TOPIC_GAIN).astype(np.float32)
    for h in range(H):  # per head keeps the temporaries at [T, D]
        if noise_heads[h]:
            continue
        q[:, h, :] += topic_gain[h] * centres[head_topic[:, h]]
        q[:, h, :] += sink_gain[h] * sink_dir
    qpos_vec = _positional(qpos, basis, periods)  # [T, D]
    q += (recency * np.float32(_KEY_POS))[None, :, None] * qpos_vec[:, None, :] * \
        (~noise_heads).astype(np.float32)[None, :, None]

    # --- weights: positive (lognormal) for retrieval heads, small of both signs otherwise ---
    w = r_weights.lognormal(0.0, 0.3, (T, H)).astype(np.float32)
    noisy_w = (0.3 * r_weights.standard_normal((T, H))).astype(np.float32)
    w = np.where(noise_heads[None, :], noisy_w, w)

    if needles:
        _plant_needles(r_needles, q, k, S, T, H, D, noise_heads, info)
    return q, k, w, info


def _plant_needles(rng, q, k, S, T, H, D, noise_heads, info):
    """Plant rare single-token needles far back and align a few query rows with each."""
    q0 = S - T
    # "Far back": the first three quarters of the context before the queries; when the queries
    # cover (almost) the whole sequence, the first half of it.
    hi = int(0.75 * q0) if q0 >= 8 else S // 2
    n_needles = int(np.clip(T // 16, 1, 128))
    region = hi - 1  # positions 1 .. hi-1 (position 0 is the sink)
    n_needles = min(n_needles, max(0, region))
    positions = np.sort(rng.choice(np.arange(1, hi), size=n_needles, replace=False)) \
        if n_needles > 0 else np.zeros(0, dtype=np.int64)
    directions = _unit_rows(rng, max(n_needles, 1), D)[:n_needles]
    retrieval_heads = np.flatnonzero(~noise_heads)
    n_heads = max(1, int(round(_NEEDLE_HEAD_FRACTION * retrieval_heads.shape[0])))
    free = np.ones(T, dtype=bool)  # a row looks for at most one needle
    pairs = []
    for i, p in enumerate(positions):
        k[p] = np.float32(_NEEDLE_KEY_GAIN) * directions[i]
        # Rows that see the needle (query position > p); far-back rows by construction.
        rows = np.flatnonzero(free & (np.arange(q0, S) > p))
        if rows.shape[0] == 0:
            continue
        n_rows = int(rng.integers(1, _MAX_ROWS_PER_NEEDLE + 1))
        chosen = np.sort(rng.choice(rows, size=min(n_rows, rows.shape[0]), replace=False))
        free[chosen] = False
        for t in chosen:
            heads = rng.choice(retrieval_heads, size=min(n_heads, retrieval_heads.shape[0]),
                               replace=False)
            q[t, heads, :] += np.float32(_NEEDLE_QUERY_GAIN) * directions[i]
            pairs.append((int(t), int(p)))
    info["needle_positions"] = positions.astype(np.int64)
    info["needle_pairs"] = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
