"""Take the structured outliers out of a weight before it is pruned (``patterns/outliers.py``).

The saliency of a weight is the OBS error of removing it alone, ``w^2 / [H^-1]_jj``, with the
damped Hessian when the plan collected one (SparseGPT, GPTQ); otherwise the diagonal-Hessian
form ``w^2 * ||x_j||^2`` (Wanda's score squared); without statistics ``w^2`` (magnitude).
``compress_weight`` passes the statistics only when the plan's solvers use them, so a
magnitude plan stays data-free.
"""
from __future__ import annotations

import torch

from ..patterns.outliers import OutlierSet, select_outliers
from .base import LayerStats
from .hessian import DEFAULT_PERCDAMP, hessian_for, inverse_cholesky


def column_curvature(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """``c_j`` such that ``w_ij^2 * c_j`` is weight ij's saliency; float32 ``[in]``, 0 for inputs
    that never fired (their weights cannot matter)."""
    k = weight.shape[1]
    if stats is None:
        return torch.ones(k, device=weight.device)
    if stats.hessian is not None:
        factor = inverse_cholesky(hessian_for(weight.float(), stats, "outlier selection"), percdamp=DEFAULT_PERCDAMP)
        c = 1.0 / factor.U.square().sum(0)
        return c.masked_fill(factor.dead, 0.0).float()
    return stats.sq_sum.to(weight.device).float().clamp_min(0)


def split_outliers(
    weight: torch.Tensor, stats: LayerStats | None, k: int, storage_dtype: torch.dtype
) -> tuple[OutlierSet, torch.Tensor]:
    """``(outliers, rest)`` with ``rest = weight - outliers.dense()`` in float32: what the pruner
    sees. The outliers are rounded to ``storage_dtype`` first, so ``rest`` carries that rounding
    error at their positions and the sparse part may still absorb it."""
    w = weight.float()
    saliency = w.square() * column_curvature(w, stats).unsqueeze(0)
    outliers = select_outliers(w, saliency, k, storage_dtype)
    return outliers, w - outliers.dense(tuple(w.shape))
