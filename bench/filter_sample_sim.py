"""How well row_filter's sample predicts the kept count (row_filter.cuh; bench/NOTES.md, session 13).

For rows of N = 131072 scores and k = 2048 the threshold is the ks-th largest sampled key, with
ks chosen so that about `expect` columns lie at or above it, and the kept count is the number of
columns at or above it; a row is redone whole when the count falls below k or above the n
candidate slots. n and expect are the backend's own (cupy_backend._topk_filter: 8192 and 5120,
2.5k). Three kinds of rows:

* randn: i.i.d. normal scores (bench/kernels.py's hisa_cupy.topk target);
* clustered: randn with three runs of 1500 columns raised by 4 (the GPU tests' rows);
* segments: dense_select's token scores of the "segments" workload at S = 128K (SPEC §2 through
  hisa_cupy.reference.token_scores, a few rows spread over T = 4096), whose top keys cluster in
  topical segments of ~1000 tokens: what attention-like rows look like.

and four samples: 2048 single columns spread evenly (what the kernel uses), 512 runs of 4
contiguous columns (branch wip/sample-runs2), 1024 runs of 2, and 1024 runs of 4 (4096 keys,
branch wip/sample-runs8). A run of 4 is one 16-byte load (one sector against four). On the
segments rows the runs spread the kept count more (their keys move together), and the rows
below k are what made both branches lose on the GPU (bench/NOTES.md, session 13).

    python3 bench/filter_sample_sim.py [SEGMENT_ROWS]    # default 64 rows: ~15 s
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from hisa_cupy.kernels import cupy_backend  # noqa: E402
from hisa_cupy.reference import token_scores  # noqa: E402
from hisa_cupy.workloads import make_workload  # noqa: E402

N, k = 131072, 2048
_, n, expect = cupy_backend._topk_filter(64, N, k, False)  # the candidate slots and the aim per row


def sample_columns(L, runs, run_len):
    """Columns of `runs` runs of `run_len` contiguous columns spread over a row of L."""
    r = np.arange(runs)
    start = ((r * L) // runs) & ~(run_len - 1)
    return np.minimum(start[:, None] + np.arange(run_len)[None, :], L - 1).ravel()


SAMPLES = {f"{cupy_backend.TOPK_FILTER_SAMPLES} single": (cupy_backend.TOPK_FILTER_SAMPLES, 1),
           "512 runs of 4": (512, 4), "1024 runs of 2": (1024, 2), "1024 runs of 4": (1024, 4)}


def kept(x, runs, run_len):
    L = len(x)
    cols = sample_columns(L, runs, run_len)
    ks = min(len(cols), -(-expect * len(cols) // L))
    thr = np.sort(x[cols])[::-1][ks - 1]
    return int((x >= thr).sum())


def rows(kind, count, rng):
    if kind == "segments":
        wl = make_workload("segments", seq_len=N, num_queries=4096, seed=1)
        for t in np.linspace(0, 4095, count).astype(int):
            lo, hi = int(wl.ks[t]), int(wl.ke[t])
            yield token_scores(wl.q[t:t + 1], wl.k[lo:hi], wl.weights[t:t + 1], wl.k_scale[lo:hi])[0]
        return
    for _ in range(count):
        x = rng.standard_normal(N).astype(np.float32)
        if kind == "clustered":
            for start in rng.integers(0, N - 1500, size=3):
                x[start:start + 1500] += 4.0
        yield x


def main():
    seg_rows = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rng = np.random.default_rng(0)
    for kind, count in (("randn", 200), ("clustered", 200), ("segments", seg_rows)):
        counts = {name: [] for name in SAMPLES}
        for x in rows(kind, count, rng):
            for name, (runs, run_len) in SAMPLES.items():
                counts[name].append(kept(x, runs, run_len))
        for name, c in counts.items():
            c = np.array(c)
            print(f"{kind:9s} {name:15s} kept mean {c.mean():6.0f} sd {c.std():5.0f} min {c.min():5d} "
                  f"max {c.max():5d}  rows redone {np.mean((c < k) | (c > n)):.4f} of {len(c)}")


if __name__ == "__main__":
    main()
