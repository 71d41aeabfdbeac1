"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning, optionally joint with quantization.

Columns are fixed left to right; each pruned (or quantized) weight's error is compensated in the
columns not fixed yet, through the inverse Hessian of those columns (``hessian.obs_sweep``).
Masks follow the paper's reference implementation: unstructured masks are chosen once per block
of ``blocksize`` columns by the OBS score ``w^2 / [H^-1]_jj`` on the block's compensated values
(per output row when the spec says per_row, else over the whole block); N:M masks are chosen every
M columns, on values that already carry the compensation from every column before them.
Hybrid tiles: the tiles to make 2:4 are chosen first, by the OBS error of pruning each tile to 2:4
(``patterns/hybrid.py``); the sweep then applies 2:4 only to the rows of those tiles.
"""
from __future__ import annotations

import torch

from ..patterns import SparsitySpec
from ..patterns.hybrid import grid_for, select_tiles, tile_costs
from ..patterns.masks import check_nm_shape
from ..quant import QuantParams, QuantSpec, fit_params
from ..quant.clip_search import activation_weights, clip_mode, fit_params_searched
from .base import LayerStats, check_finite, check_options
from .hessian import (
    DEFAULT_PERCDAMP,
    QuantGrid,
    check_solver_options,
    compute_dtype,
    hessian_for,
    inverse_cholesky,
    obs_sweep,
)

OPTIONS = ("blocksize", "percdamp")
JOINT_OPTIONS = OPTIONS + ("clip_search",)


def sparsegpt_prune(
    weight: torch.Tensor,
    stats: LayerStats,
    sparsity: SparsitySpec,
    *,
    blocksize: int = 128,
    percdamp: float = DEFAULT_PERCDAMP,
    info: dict | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prune ``weight[out, in]`` and update the kept weights. Returns (weight, mask).

    The weight is float32 (float64 if given float64) with pruned entries exactly zero; ``mask``
    is None for a dense spec. ``info``, when given, receives ``damp`` (fraction of the mean
    Hessian diagonal actually used), ``damp_abs``, ``dead`` (inputs never active, whose weight
    columns are zeroed), ``damp_tries`` and ``loss``: the sum of the per-column OBS errors, which
    is exactly ``1/2 sum_rows dW (H + damp I) dW^T``, i.e. ``||(W - W') X||^2 / n`` plus the
    damping term ``damp/2 ||W - W'||^2`` (W with dead columns zeroed).
    """
    check_options("sparsegpt", options, OPTIONS)
    result, _, _ = _run(weight, stats, sparsity, None, blocksize, percdamp, info)
    if result is None:
        return weight.to(compute_dtype(weight)).clone(), None
    return result.wt.T.contiguous(), result.keep.T.contiguous()


def sparsegpt_joint(
    weight: torch.Tensor,
    stats: LayerStats,
    sparsity: SparsitySpec,
    quant_spec: QuantSpec,
    *,
    blocksize: int = 128,
    percdamp: float = DEFAULT_PERCDAMP,
    clip_search: object = False,
    info: dict | None = None,
    **options,
) -> tuple[torch.Tensor, QuantParams, torch.Tensor | None]:
    """Prune and quantize in one OBS pass. Returns (codes uint8 [out, in], qparams, mask).

    Every column is set to its final value (0 if pruned, else its grid value) inside the loop, so
    the compensation covers pruning and rounding error together; pruned codes hold the zero point.

    Quantization parameters are fitted once, before pruning, on the dense weight (per group over
    all of the group's columns). Kept-only fitting is not available here: the mask is not known
    before the sweep (it is chosen on compensated values as the sweep goes), and fitting when a
    group is first reached would see partially compensated values of a partially known mask. The
    dense range loses little: the largest-magnitude weights, which set the range, are the ones
    pruning keeps, and pruned weights need no range (they are exactly zero). Compensation can
    push a kept weight past the dense range; it is then clipped to the grid and that error is
    compensated like any other. Fitting up front also keeps the parameters independent of the
    processing order, as in the SparseGPT reference (``quantizer.find_params`` on the dense W).
    ``clip_search`` (true/'mse', or 'act' weighted by the mean squared activations) shrinks each
    group's range there, on the dense weight, by the factor minimizing its squared error.
    """
    check_options("sparsegpt", options, JOINT_OPTIONS)
    if not isinstance(quant_spec, QuantSpec):
        raise TypeError(f"quant_spec must be a QuantSpec, got {type(quant_spec).__name__}")
    clip = clip_mode(clip_search)
    result, params, codes = _run(weight, stats, sparsity, quant_spec, blocksize, percdamp, info, clip)
    return codes, params, None if result.keep is None else result.keep.T.contiguous()


def _run(weight, stats, sparsity, quant_spec, blocksize, percdamp, info, clip=None):
    """The sweep for both entry points: (SweepResult or None when there is nothing to do,
    QuantParams or None, codes [out, in] or None)."""
    check_solver_options(blocksize, percdamp)
    if not isinstance(sparsity, SparsitySpec):
        raise TypeError(f"sparsity must be a SparsitySpec, got {type(sparsity).__name__}")
    check_finite(weight)
    h = hessian_for(weight, stats, "sparsegpt")
    in_f = weight.shape[1]
    nm = unstructured = tiles = None
    if sparsity.kind == "nm":
        check_nm_shape(in_f, sparsity.m)
        nm = (sparsity.n, sparsity.m)
        # A group of M is chosen on its own compensated values, so it must not straddle blocks.
        blocksize = max(sparsity.m, blocksize - blocksize % sparsity.m)
    elif sparsity.kind == "hybrid" and not sparsity.is_dense:
        tiles = grid_for(sparsity, tuple(weight.shape))
        nm = (2, 4)
        blocksize = max(4, blocksize - blocksize % 4)
    elif not sparsity.is_dense:
        unstructured = (sparsity.sparsity, sparsity.per_row)
    if quant_spec is None and sparsity.is_dense:
        if info is not None:
            info.update(damp=0.0, damp_abs=0.0, dead=0, damp_tries=0, loss=0.0)
        return None, None, None
    factor = inverse_cholesky(h, percdamp=percdamp)
    del h
    w = weight.to(compute_dtype(weight)).clone()
    w[:, factor.dead] = 0
    grid = params = None
    if quant_spec is not None:
        if clip is None:
            params = fit_params(w, quant_spec)
        else:
            params = fit_params_searched(w, quant_spec, None, activation_weights(stats).to(w.device)
                                         if clip == "act" else None)
        g = quant_spec.effective_group(in_f)
        grid = QuantGrid(
            scale=params.scale.T.to(w.dtype).contiguous(),
            zero=params.zero.T.to(w.dtype).contiguous(),
            maxq=quant_spec.levels - 1,
            group_of=[p // g for p in range(in_f)],
        )
    nm_rows = None
    if tiles is not None:
        # Tiles are chosen once, before the sweep, by the OBS error of pruning each to 2:4 on the
        # weights as given; the sweep then picks the 2:4 masks of those tiles on compensated values.
        inv_diag = factor.U.square().sum(0)  # diag((H + damp I)^-1), as U^T U is that inverse
        flags = select_tiles(tile_costs(w.square() / inv_diag, tiles), tiles, sparsity.sparsity)
        nm_rows = tiles.expand(flags)[:, ::4].T.contiguous()
        if info is not None:
            info.update(tiles=tiles.n_tiles, tiles_24=int(flags.sum()))
    wt = w.T.contiguous()
    del w
    result = obs_sweep(wt, factor.U, blocksize=blocksize, nm=nm, unstructured=unstructured, grid=grid,
                       nm_rows=nm_rows)
    if info is not None:
        factor.report(info)
        info["loss"] = float(result.loss)
    codes = None if grid is None else grid.codes(result.wt).T.contiguous()
    return result, params, codes
