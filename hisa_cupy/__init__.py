"""hisa_cupy — the HISA sparse-attention indexer for PyTorch, JAX, CuPy and NumPy arrays.

HISA (hierarchical indexed sparse attention) picks, for every query token, the top-k previous
tokens of DeepSeek's lightning indexer in two stages: score mean-pooled key blocks and keep the
best ``block_topk`` blocks (always the first and the query's own block), then score tokens only
inside them and take the exact top-k. Output format: the DSA one, int32 [T, topk].

Public API (docs/semantics.md states what each computes):
    hisa_select, dense_select, block_sparse_select   end-to-end selection
    pool_keys, select_blocks, refine                 the HISA stages
    topk                                             exact row top-k with the SPEC ranking
Submodules: reference (NumPy, normative), workloads, metrics, testing.
"""
import os as _os

# In a checkout, kernels/ and adapters/ sit beside hisa_cupy/ and pyproject's package-dir installs
# them as hisa_cupy.kernels / hisa_cupy.adapters. When the package is imported straight from the
# checkout (``python -m ...`` from the repository root puts it first on sys.path), let the same
# names resolve by adding the repository root to this package's search path.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels")) and \
        _os.path.isfile(_os.path.join(_root, "kernels", "cupy_backend.py")) and _root not in __path__:
    __path__.append(_root)

from .select import block_sparse_select, dense_select, hisa_select, pool_keys, refine, select_blocks, topk

__version__ = "0.1.0"

__all__ = ["hisa_select", "dense_select", "block_sparse_select", "pool_keys", "select_blocks", "refine", "topk",
           "__version__"]
