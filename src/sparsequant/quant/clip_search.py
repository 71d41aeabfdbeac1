"""MSE-searched clipping: per group, shrink the absmax (or min/max) range by the factor, from a
grid, that minimizes the group's squared quantization error.

Plain absmax wastes levels on a group's one or two extreme weights; clipping them costs a little
on those and buys a finer step for all the others. Each group's error depends only on its own
range, so the search is separable: every candidate factor is tried on all groups at once and each
group keeps its best. Candidates are evaluated with the exact float16-rounded parameters that
``fit_params`` would store, and 1.0 (plain absmax/min-max) is always on the grid with ties going to
the larger factor, so the searched error is never above absmax's.

The error can be weighted per input column by the mean squared activation ``E[x_j^2]`` (the
diagonal of the layer Hessian): then a group minimizes its share of the layer's output error
rather than of the weight error.
"""
from __future__ import annotations

import torch

from ..errors import RecipeError
from .rtn import QuantParams, _grouped, fit_params
from .spec import QuantSpec

# 1.00, 0.99, ..., 0.30: deep enough for 2-bit groups (their best factors sit near 0.6-0.8).
DEFAULT_GRID = tuple(round(1.0 - 0.01 * i, 2) for i in range(71))
MODES = ("mse", "act")


def clip_mode(value: object) -> str | None:
    """The recipe option ``clip_search`` as a mode: None (off), "mse" or "act" (activation-weighted)."""
    if value is False or value is None:
        return None
    if value is True:
        return "mse"
    if value in MODES:
        return value
    raise RecipeError(f"clip_search must be true, false, 'mse' or 'act' (activation-weighted), got {value!r}")


def search_clip(
    w: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
    fit=fit_params,
) -> torch.Tensor:
    """The best shrink factor of every group, ``[out, groups]`` float32 (for ``fit_params``).

    ``fit`` computes the parameters for a candidate (``fit_params``'s signature); the OBS sweep
    passes its own copy of the same arithmetic, which skips a host synchronization."""
    if not grid or any(not 0.0 < c <= 1.0 for c in grid):
        raise RecipeError(f"clip search factors must lie in (0, 1], got {grid!r}")
    w = w.float()
    rows, cols = w.shape
    g = spec.effective_group(cols)
    n_groups = spec.n_groups(cols)
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
    weight = keep.float()
    if col_weight is not None:
        if tuple(col_weight.shape) != (cols,):
            raise ValueError(f"column weights have shape {tuple(col_weight.shape)}, expected ({cols},)")
        weight = weight * col_weight.to(device=w.device, dtype=torch.float32).unsqueeze(0)
    weight_g = _grouped(weight, g, 0.0)
    best_err = torch.full((rows, n_groups), float("inf"), device=w.device)
    best = torch.ones(rows, n_groups, device=w.device)
    # Largest factor first, strict improvement only: ties keep the larger range (1.0 if nothing beats it).
    for c in sorted(set(grid), reverse=True):
        ratio = torch.full((rows, n_groups), c, device=w.device)
        err = group_error(w, fit(w, spec, mask, clip_ratio=ratio), weight_g)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return best


def group_error(w: torch.Tensor, params: QuantParams, weight_g: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of quantizing ``w`` with ``params``, summed per [out, group]."""
    g = params.spec.effective_group(w.shape[1])
    diff = params.dequantize(params.quantize(w)) - w
    return (_grouped(diff * diff, g, 0.0) * weight_g).sum(-1)


def fit_params_searched(
    w: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
) -> QuantParams:
    """``fit_params`` with every group's range shrunk by its searched factor."""
    return fit_params(w, spec, mask, clip_ratio=search_clip(w, spec, mask, col_weight, grid))


def activation_weights(stats) -> torch.Tensor:
    """``E[x_j^2]`` per input column from LayerStats (the weights of the 'act' mode)."""
    if stats is None:
        raise RecipeError("clip_search 'act' needs calibration statistics of the layer's inputs")
    return stats.sq_sum.float() / max(stats.n_tokens, 1)
