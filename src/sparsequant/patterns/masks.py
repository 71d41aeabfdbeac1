"""Masks from importance scores, and validators that prove a mask has the claimed pattern.

A mask is a bool tensor shaped like the weight ``W[out, in]``; True marks a weight that is kept.
Patterns run along the input (reduction) dimension, which is what the sparse tensor cores need.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from .spec import SparsitySpec


def check_nm_shape(in_features: int, m: int) -> None:
    if in_features % m != 0:
        raise PatternError(
            f"input dimension {in_features} is not divisible by M={m}: an N:M pattern groups "
            f"{m} consecutive input weights; choose another pattern or skip this layer"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights in each group of ``m`` along the last dimension."""
    rows, cols = scores.shape
    check_nm_shape(cols, m)
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Drop the ``sparsity`` fraction of lowest scores, per output row or over the whole matrix."""
    rows, cols = scores.shape
    if per_row:
        n_drop = int(cols * sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if n_drop:
            drop = torch.topk(scores, n_drop, dim=1, largest=False, sorted=False).indices
            mask.scatter_(1, drop, False)
        return mask
    n_drop = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_drop:
        drop = torch.topk(scores.flatten(), n_drop, largest=False, sorted=False).indices
        mask[drop] = False
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor | None:
    """The mask ``spec`` asks for, chosen by ``scores`` (higher = more important); None if dense."""
    if torch.isnan(scores).any():
        raise PatternError("importance scores contain NaN; check the weights and calibration statistics")
    if spec.is_dense:
        return None
    if spec.kind == "nm":
        return nm_mask(scores, spec.n, spec.m)
    if spec.kind == "hybrid":
        from .hybrid import hybrid_mask  # hybrid builds on nm_mask

        return hybrid_mask(scores, spec)
    return unstructured_mask(scores, spec.sparsity, spec.per_row)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` along the last dimension keeps at most ``n`` weights."""
    if mask.shape[-1] % m:
        return False
    counts = mask.reshape(*mask.shape[:-1], mask.shape[-1] // m, m).sum(-1)
    return bool((counts <= n).all())


def validate_nm(mask: torch.Tensor, n: int, m: int, *, exact: bool = True) -> None:
    """Raise PatternError unless ``mask`` is N:M (exactly ``n`` kept per group when ``exact``)."""
    if mask.dtype != torch.bool:
        raise PatternError(f"a mask must be a bool tensor, got {mask.dtype}")
    check_nm_shape(mask.shape[-1], m)
    counts = mask.reshape(*mask.shape[:-1], mask.shape[-1] // m, m).sum(-1)
    bad = (counts != n) if exact else (counts > n)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise PatternError(
            f"mask is not {n}:{m}: {int(bad.sum())} groups of {m} break it "
            f"(first at group index {idx}, which keeps {int(counts[tuple(idx)])})"
        )


def validate_mask(mask: torch.Tensor | None, spec: SparsitySpec, shape: tuple[int, int]) -> None:
    """Prove that ``mask`` matches ``spec`` for a weight of ``shape``."""
    if spec.is_dense:
        if mask is not None and not bool(mask.all()):
            raise PatternError("a dense spec came with a mask that drops weights")
        return
    if mask is None:
        raise PatternError(f"spec {spec} needs a mask, got None")
    if tuple(mask.shape) != tuple(shape):
        raise PatternError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(shape)}")
    if spec.kind == "nm":
        validate_nm(mask, spec.n, spec.m, exact=True)
    elif spec.kind == "hybrid":
        from .hybrid import validate_hybrid

        validate_hybrid(mask, spec)
    else:
        rows, cols = shape
        if spec.per_row:
            expected = cols - int(cols * spec.sparsity)
            kept = mask.sum(1)
            if not bool((kept == expected).all()):
                raise PatternError(f"mask keeps {kept.min()}..{kept.max()} per row, expected {expected}")
        else:
            expected = mask.numel() - int(mask.numel() * spec.sparsity)
            if int(mask.sum()) != expected:
                raise PatternError(f"mask keeps {int(mask.sum())} weights, expected {expected}")
