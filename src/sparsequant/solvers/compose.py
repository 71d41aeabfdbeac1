"""Compress one weight matrix as a plan says: prune, then quantize (or both jointly)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError
from ..patterns import SparsitySpec
from ..quant import QuantSpec
from .base import CompressedWeight, LayerStats, check_finite
from .registry import JOINT, PRUNERS, QUANTIZERS, lookup


@dataclass(frozen=True)
class LinearPlan:
    """What to do to one linear layer. ``prune``/``quantizer`` name entries of the registries."""

    prune: str = "magnitude"
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    quantizer: str = "rtn"
    quant: QuantSpec | None = None
    joint: bool = True
    options: tuple = ()  # (name, value) pairs passed to the solvers that accept them
    adapter: object | None = None  # lowrank.AdapterSpec: a low-rank adapter fitted after compression

    @property
    def uses_joint(self) -> bool:
        # A dense pattern stays joint: SparseGPT with nothing to prune is GPTQ, so a layer a recipe
        # keeps dense (an override, a selective recipe) gets the same error compensation as its
        # pruned neighbours instead of falling back to plain round-to-nearest.
        return self.joint and self.quant is not None and self.prune in JOINT

    @property
    def needs_hessian(self) -> bool:
        if self.adapter is not None and self.adapter.needs_hessian:
            return True
        if self.uses_joint:
            return JOINT[self.prune].needs_hessian
        need = False
        if not self.sparsity.is_dense:
            need |= lookup(PRUNERS, self.prune, "pruning method").needs_hessian
        if self.quant is not None:
            need |= lookup(QUANTIZERS, self.quantizer, "quantizer").needs_hessian
        return need

    @property
    def needs_stats(self) -> bool:
        if self.uses_joint or self.adapter is not None:
            return True
        need = False
        if not self.sparsity.is_dense:
            need |= lookup(PRUNERS, self.prune, "pruning method").needs_stats
        if self.quant is not None:
            need |= lookup(QUANTIZERS, self.quantizer, "quantizer").needs_stats
        return need


def compress_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    plan: LinearPlan,
    storage_dtype: torch.dtype = torch.float16,
    info: dict | None = None,
) -> CompressedWeight:
    """Apply ``plan`` to ``weight`` and return a validated CompressedWeight.

    ``plan.options`` go to the solvers that declare them (a name none of the plan's solvers takes
    is a RecipeError). ``info``, when given, receives the diagnostics of the solvers that report
    any, one dict per stage: ``info["joint"]``, or ``info["prune"]`` and ``info["quant"]``
    (for example ``info["joint"]["damp"]``, ``info["quant"]["loss"]``). With ``plan.adapter`` the
    compression is followed by a low-rank adapter (``solvers/lowrank.py``), diagnostics in
    ``info["adapter"]``.
    """
    check_finite(weight)
    if stats is not None and not torch.isfinite(stats.sq_sum).all():
        from ..errors import NonFiniteWeightError

        raise NonFiniteWeightError("calibration activations contain NaN or Inf")
    if plan.sparsity.outliers:
        # W = outliers + the rest; everything below (pruning, quantization, an adapter) sees the rest.
        from dataclasses import replace

        from .outliers import split_outliers

        # Saliency from the statistics the plan's own solvers use (none for data-free magnitude).
        outliers, rest = split_outliers(weight, stats if plan.needs_stats else None, plan.sparsity.outliers,
                                        storage_dtype)
        cw = compress_weight(rest, stats, replace(plan, sparsity=plan.sparsity.base), storage_dtype, info)
        cw.sparsity, cw.outliers = plan.sparsity, outliers
        return cw.validate()
    if plan.adapter is not None:
        from .lowrank import sparse_plus_lowrank

        return sparse_plus_lowrank(
            weight, stats, plan.adapter, lambda w: _compress(w, stats, plan, storage_dtype, info), storage_dtype,
            info=None if info is None else info.setdefault("adapter", {}),
        ).validate()
    return _compress(weight, stats, plan, storage_dtype, info)


def _compress(weight, stats, plan: LinearPlan, storage_dtype, info) -> CompressedWeight:
    """Prune and quantize (or both jointly) as the plan says, without recovery terms."""
    opts = dict(plan.options)
    if plan.uses_joint:
        entry = JOINT[plan.prune]
        unknown = sorted(set(opts) - entry.options)
        if unknown:
            raise RecipeError(
                f"joint {plan.prune} does not take option(s) {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(sorted(entry.options)) or 'none'}. Set joint to false to run pruner "
                f"{plan.prune!r} and then quantizer {plan.quantizer!r} separately"
            )
        codes, qparams, mask = entry.fn(
            weight, stats, plan.sparsity, plan.quant, **opts, **_info_kw(entry, info, "joint")
        )
        result = CompressedWeight.from_quantized(codes, qparams, plan.sparsity, mask)
        return result.validate()
    prune_opts, quant_opts = _route(plan, opts)
    w, mask = weight.float(), None
    if not plan.sparsity.is_dense:
        entry = lookup(PRUNERS, plan.prune, "pruning method")
        w, mask = entry.fn(weight, stats, plan.sparsity, **prune_opts, **_info_kw(entry, info, "prune"))
    if plan.quant is None:
        return CompressedWeight.from_float(w, plan.sparsity, mask, storage_dtype).validate()
    entry = lookup(QUANTIZERS, plan.quantizer, "quantizer")
    codes, qparams = entry.fn(w, stats, plan.quant, mask, **quant_opts, **_info_kw(entry, info, "quant"))
    return CompressedWeight.from_quantized(codes, qparams, plan.sparsity, mask).validate()


def _route(plan: LinearPlan, opts: dict) -> tuple[dict, dict]:
    """Split options between the plan's pruner and quantizer; both may take the same name."""
    pruner, quantizer = PRUNERS.get(plan.prune), QUANTIZERS.get(plan.quantizer)
    p_names = pruner.options if pruner else frozenset()
    q_names = quantizer.options if quantizer else frozenset()
    unknown = sorted(set(opts) - p_names - q_names)
    if unknown:
        raise RecipeError(
            f"option(s) {', '.join(map(repr, unknown))} are taken by neither pruner {plan.prune!r} "
            f"({', '.join(sorted(p_names)) or 'no options'}) nor quantizer {plan.quantizer!r} "
            f"({', '.join(sorted(q_names)) or 'no options'})"
        )
    return ({k: v for k, v in opts.items() if k in p_names}, {k: v for k, v in opts.items() if k in q_names})


def _info_kw(entry, info: dict | None, stage: str) -> dict:
    """``info=...`` for solvers that take it (found by signature, so solvers without it still work)."""
    if info is None or "info" not in inspect.signature(entry.fn).parameters:
        return {}
    return {"info": info.setdefault(stage, {})}
