"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output row.

For N:M patterns the comparison groups are the M consecutive inputs of a row; for unstructured
sparsity the default compares within each output row (``per_row=True``), as the paper does.
"""
from __future__ import annotations

import torch

from ..patterns import SparsitySpec, mask_from_scores
from .base import LayerStats, check_options


def wanda_scores(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return weight.float().abs() * stats.col_norm.to(weight.device).float().unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor, stats: LayerStats, sparsity: SparsitySpec, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (pruned weight, mask)."""
    check_options("wanda", options)
    if stats is None:
        raise ValueError("Wanda needs activation statistics; run it through the calibration pipeline")
    mask = mask_from_scores(wanda_scores(weight, stats), sparsity)
    return (weight.float() if mask is None else weight.float() * mask), mask
