"""Magnitude pruning: keep the largest |W|."""
from __future__ import annotations

import torch

from ..patterns import SparsitySpec, mask_from_scores
from .base import LayerStats, check_options


def magnitude_scores(weight: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    return weight.float().abs()


def magnitude_prune(
    weight: torch.Tensor, stats: LayerStats | None, sparsity: SparsitySpec, **options
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (pruned weight, mask). ``stats`` is unused: magnitude needs no calibration."""
    check_options("magnitude", options)
    mask = mask_from_scores(magnitude_scores(weight), sparsity)
    return (weight.float() if mask is None else weight.float() * mask), mask
