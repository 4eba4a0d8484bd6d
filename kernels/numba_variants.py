"""Worked example of a stage variant for the Numba backend: max pooling instead of mean pooling.

Walked through in docs/numba.md and run under the CUDA simulator by tests/test_numba_sim.py.
The pooled key of block b becomes the element-wise maximum of its dequantised keys (float32),
and the rest of the HISA pipeline (block selection, refinement) is reused unchanged.
"""
from __future__ import annotations

import functools

import numpy as np

from . import numba_backend as nb
from ._numba_compat import cuda


@functools.lru_cache(maxsize=None)
def _max_pool_kernel(kcode: str):
    decode_k = nb.DECODERS[kcode]  # "fp8" / "bf16" / "f16" / "f32" element -> float32

    @cuda.jit
    def max_pool_kernel(k, k_scale, has_scale, B, pooled):
        b = cuda.blockIdx.x  # one thread block per key block
        S = k.shape[0]
        D = k.shape[1]
        s0 = b * B
        cnt = min(B, S - s0)  # the last block may be partial
        for d in range(cuda.threadIdx.x, D, nb.THREADS):  # one feature column per thread
            best = nb.F32_NEG_INF
            for j in range(cnt):
                v = decode_k(k[s0 + j, d])
                if has_scale:
                    v = v * k_scale[s0 + j]
                if v > best:
                    best = v
            pooled[b, d] = best

    return max_pool_kernel


def max_pool_keys(k, k_scale, *, block_size, stream=0):
    """Element-wise max of the dequantised keys of each block: float32 ``[ceil(S/B), D]``."""
    call = nb._Call(stream, k)  # arrays, allocation and stream handling of the backend
    S, D = k.shape
    nblocks = -(-S // block_size)
    pooled = call.empty((nblocks, D), np.float32)
    call.launch(_max_pool_kernel(nb.dtype_code(k)), nblocks, call.arg(k),
                call.arg(k_scale, np.float32), k_scale is not None, int(block_size),
                call.arg(pooled))
    return pooled


def hisa_select_maxpool(q, k, weights, k_scale, ks, ke, *, block_size, block_topk, topk,
                        index_base="relative", order="position", stream=0):
    """HISA with max-pooled block keys: the new pooling + the backend's own stages 3-6."""
    call = nb._Call(stream, q)
    T = q.shape[0]
    pooled = max_pool_keys(k, k_scale, block_size=block_size, stream=stream)
    blocks = call.empty((T, block_topk), np.int32)
    nb.select_blocks(q, pooled, weights, None, ks, ke, seq_len=k.shape[0], block_size=block_size,
                     block_topk=block_topk, out=blocks, stream=stream)
    return nb.refine(q, k, weights, k_scale, blocks, ks, ke, block_size=block_size, topk=topk,
                     index_base=index_base, order=order, stream=stream)
