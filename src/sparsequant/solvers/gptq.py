"""GPTQ (Frantar et al., 2022): quantize one column at a time and compensate the rounding error
in the columns not quantized yet, through their inverse Hessian (``hessian.obs_sweep``).

Sparse weights. With a mask, pruned weights are fixed at zero: the sweep sets every pruned
position to exactly 0 when it reaches that column, and compensates the difference like a rounding
error. Between two fixes the working copy may carry a nonzero value at a pruned position that has
not been reached yet (the OBS step after fixing column j is exact only when every later column may
move), but it never survives into the result: every position is fixed once, in order, and fixed
positions are never written again. So pruned weights end exactly zero, the N:M pattern is
untouched, and all compensation lands in kept weights. This is the SparseGPT joint pass with a
given mask. Two tempting alternatives are worse: quantizing the refilled value (what llm-compressor
does: it breaks the pattern), and multiplying every update by the mask (throws away the part of
each compensation aimed at pruned columns, so later kept columns are not the least-squares
optimum any more; tests/test_gptq.py measures it).

Groups always cover consecutive input columns of the original order, ``[g*G, (g+1)*G)``, so the
stored format does not depend on ``act_order``. Group parameters are fitted on kept weights only:
with ``static_groups`` all of them up front on the input weight; otherwise each group when the
sweep first reaches one of its columns, on the current (already compensated) values of all its
columns. Without act_order that is the group's first column; with act_order it is the group's
column with the largest Hessian diagonal.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..quant import QuantParams, QuantSpec, fit_params
from ..quant.clip_search import activation_weights, clip_mode, search_clip
from ..quant.rtn import _MAX_SCALE, _MIN_SCALE
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

OPTIONS = ("blocksize", "percdamp", "act_order", "static_groups", "clip_search")


def gptq_quantize(
    weight: torch.Tensor,
    stats: LayerStats,
    quant_spec: QuantSpec,
    mask: torch.Tensor | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = DEFAULT_PERCDAMP,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: object = False,
    info: dict | None = None,
    **options,
) -> tuple[torch.Tensor, QuantParams]:
    """Quantize ``weight[out, in]``; returns (codes uint8 [out, in], QuantParams [out, groups]).

    ``mask`` (bool [out, in], True = kept) marks weights fixed at zero; their codes hold the zero
    point. ``act_order`` processes columns by decreasing Hessian diagonal. ``info``, when given,
    receives ``damp``, ``damp_abs``, ``dead``, ``damp_tries`` (see ``sparsegpt_prune``) and ``loss``.
    ``clip_search`` (true/'mse', or 'act' weighted by the mean squared activations) shrinks each
    group's range by the factor minimizing its squared error (``quant/clip_search.py``), searched
    wherever the group is fitted: up front with ``static_groups``, else on the compensated values.
    """
    check_options("gptq", options, OPTIONS)
    clip = clip_mode(clip_search)
    check_solver_options(blocksize, percdamp, act_order=act_order, static_groups=static_groups)
    if not isinstance(quant_spec, QuantSpec):
        raise TypeError(f"quant_spec must be a QuantSpec, got {type(quant_spec).__name__}")
    check_finite(weight)
    h = hessian_for(weight, stats, "gptq")
    out_f, in_f = weight.shape
    if mask is not None:
        if mask.dtype != torch.bool:
            raise PatternError(f"a mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (out_f, in_f):
            raise PatternError(f"mask shape {tuple(mask.shape)} differs from weight shape {(out_f, in_f)}")
        mask = mask.to(weight.device)

    w = weight.to(compute_dtype(weight)).clone()
    diag = h.diagonal()
    w[:, diag == 0] = 0
    if act_order:
        # Dead inputs get diagonal 1 inside inverse_cholesky; rank them the same way here.
        rank = torch.where(diag == 0, torch.ones_like(diag), diag)
        perm = torch.argsort(rank, descending=True, stable=True)
        h = h[perm][:, perm]
        order = perm.tolist()
    else:
        perm, order = None, list(range(in_f))
    factor = inverse_cholesky(h, percdamp=percdamp)
    del h

    g = quant_spec.effective_group(in_f)
    n_groups = quant_spec.n_groups(in_f)
    maxq = quant_spec.levels - 1
    group_of = [c // g for c in order]
    act = activation_weights(stats).to(w.device) if clip == "act" else None
    if static_groups:
        ratio = 1.0 if clip is None else search_clip(w, quant_spec, mask, act)
        params = fit_params(w, quant_spec, mask, clip_ratio=ratio)
        grid = QuantGrid(
            scale=params.scale.T.to(w.dtype).contiguous(),
            zero=params.zero.T.to(w.dtype).contiguous(),
            maxq=maxq,
            group_of=group_of,
        )
    else:
        pos_of = [0] * in_f
        for p, c in enumerate(order):
            pos_of[c] = p
        group_pos, refit = [], {}
        for gi in range(n_groups):
            pos = [pos_of[c] for c in range(gi * g, min((gi + 1) * g, in_f))]
            group_pos.append(torch.tensor(pos, device=w.device))
            refit[min(pos)] = gi
        fit = lambda cur, keep: fit_columns(cur, keep, quant_spec)  # noqa: E731
        if clip is not None:
            # The sweep fits each group once, just before its first column in processing order,
            # so the groups arrive in this order; it tells the search which columns' weights apply.
            arrival = iter([refit[p] for p in sorted(refit)])

            def fit(cur, keep):
                gi = next(arrival)
                cw = None if act is None else act[gi * g: gi * g + cur.shape[0]]
                return fit_columns_searched(cur, keep, quant_spec, cw)
        grid = QuantGrid(
            scale=torch.ones(n_groups, out_f, dtype=w.dtype, device=w.device),
            zero=torch.zeros(n_groups, out_f, dtype=w.dtype, device=w.device),
            maxq=maxq,
            group_of=group_of,
            refit=refit,
            group_pos=group_pos,
            fit=fit,
        )

    wt = w.T if perm is None else w.T[perm]
    wt = wt.contiguous()
    del w
    keep = None
    if mask is not None:
        keep = (mask.T if perm is None else mask.T[perm]).contiguous()
    result = obs_sweep(wt, factor.U, blocksize=blocksize, keep=keep, grid=grid)
    codes = grid.codes(result.wt)
    if perm is not None:
        codes = codes[torch.argsort(perm)]
    if info is not None:
        factor.report(info)
        info["loss"] = float(result.loss)
    params = QuantParams(
        scale=grid.scale.T.float().contiguous(),
        zero=grid.zero.T.float().contiguous(),
        spec=quant_spec,
        in_features=in_f,
    )
    return codes.T.contiguous(), params


def fit_columns_searched(
    cur: torch.Tensor, keep: torch.Tensor | None, spec: QuantSpec, col_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fit_columns`` with the group's range shrunk by its searched clip factor, one per row."""

    def fit(w, spec, mask, clip_ratio):  # fit_params's signature on [out, cols], via fit_columns
        scale, zero = fit_columns(w.T, None if mask is None else mask.T, spec, clip_ratio[:, 0])
        return QuantParams(scale.unsqueeze(1), zero.unsqueeze(1), spec, w.shape[1])

    w = cur.float().T
    ratio = search_clip(w, spec, None if keep is None else keep.T, col_weight, fit=fit)
    return fit_columns(cur, keep, spec, ratio[:, 0])


def fit_columns(
    cur: torch.Tensor, keep: torch.Tensor | None, spec: QuantSpec, clip_ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[out]`` of one group from its columns ``cur[cols, out]``, kept ones only.

    The same arithmetic as ``quant.fit_params`` for a single group (tests prove they agree bit for
    bit), without its finiteness check: that check reads a value back to the host, which would
    stall the GPU once per group inside the sweep. The sweep's input was checked before it began.
    ``clip_ratio`` ``[out]`` shrinks the range as ``fit_params``'s does.
    """
    w = cur.float()
    kept = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    any_kept = kept.any(0)
    if spec.symmetric:
        absmax = torch.where(kept, w.abs(), torch.zeros_like(w)).amax(0)
        if clip_ratio is not None:
            absmax = absmax * clip_ratio
        scale = absmax / (spec.sym_zero - 1)
        scale = torch.where(any_kept & (absmax > 0), scale, torch.ones_like(scale))
        scale = scale.clamp(_MIN_SCALE, _MAX_SCALE).half().float()
        zero = torch.full_like(scale, float(spec.sym_zero))
    else:
        big = torch.finfo(torch.float32).max
        wmax = torch.where(kept, w, torch.full_like(w, -big)).amax(0)
        wmin = torch.where(kept, w, torch.full_like(w, big)).amin(0)
        wmax = torch.where(any_kept, wmax, torch.zeros_like(wmax))
        wmin = torch.where(any_kept, wmin, torch.zeros_like(wmin))
        flat = (wmax - wmin) <= 1e-12 * torch.maximum(wmax.abs(), wmin.abs()).clamp_min(1e-30)
        wmax = torch.where(flat, wmax.clamp_min(0), wmax)
        wmin = torch.where(flat, wmin.clamp_max(0), wmin)
        if clip_ratio is not None:
            wmax, wmin = wmax * clip_ratio, wmin * clip_ratio
        scale = (wmax - wmin) / (spec.levels - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.clamp(_MIN_SCALE, _MAX_SCALE).half().float()
        zero = torch.round(-wmin / scale).clamp(0, spec.levels - 1)
    return scale.to(cur.dtype), zero.to(cur.dtype)
