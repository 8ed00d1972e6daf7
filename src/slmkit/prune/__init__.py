"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) as a pipeline step, the pure scoring
and mask math, and compressed storage of the zeros in checkpoints.

    prune_(model, PruneConfig("sparsegpt", pattern=(2, 4)), calib_tokens)
"""

from __future__ import annotations

from .scores import magnitude_scores, nm_mask, sparsegpt_prune, unstructured_mask, wanda_scores
from .unstructured import PRUNERS, PruneConfig, parse_pattern, prune_

__all__ = ["PRUNERS", "PruneConfig", "magnitude_scores", "nm_mask", "parse_pattern", "prune_", "sparsegpt_prune",
           "unstructured_mask", "wanda_scores"]

# structured pruning (smaller dense models: heads, MLP channels, hidden channels, layers): see structured.py
from .structured import StructuredPruneConfig, parse_count, prune_structured_  # noqa: E402

__all__ += ["StructuredPruneConfig", "parse_count", "prune_structured_"]
