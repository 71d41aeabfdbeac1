"""Compress one weight matrix as a plan says: prune, then quantize (or both jointly)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    @property
    def uses_joint(self) -> bool:
        return self.joint and self.quant is not None and not self.sparsity.is_dense and self.prune in JOINT

    @property
    def needs_hessian(self) -> bool:
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
        if self.uses_joint:
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
) -> CompressedWeight:
    """Apply ``plan`` to ``weight`` and return a validated CompressedWeight."""
    check_finite(weight)
    if stats is not None and not torch.isfinite(stats.sq_sum).all():
        from ..errors import NonFiniteWeightError

        raise NonFiniteWeightError("calibration activations contain NaN or Inf")
    opts = dict(plan.options)
    if plan.uses_joint:
        entry = JOINT[plan.prune]
        codes, qparams, mask = entry.fn(weight, stats, plan.sparsity, plan.quant, **opts)
        result = CompressedWeight.from_quantized(codes, qparams, plan.sparsity, mask)
        return result.validate()
    w, mask = weight.float(), None
    if not plan.sparsity.is_dense:
        w, mask = lookup(PRUNERS, plan.prune, "pruning method").fn(weight, stats, plan.sparsity, **opts)
    if plan.quant is None:
        return CompressedWeight.from_float(w, plan.sparsity, mask, storage_dtype).validate()
    codes, qparams = lookup(QUANTIZERS, plan.quantizer, "quantizer").fn(w, stats, plan.quant, mask, **opts)
    return CompressedWeight.from_quantized(codes, qparams, plan.sparsity, mask).validate()
