"""Round-to-nearest as a quantizer entry (scales fitted on kept weights only)."""
from __future__ import annotations

import torch

from ..quant import QuantParams, QuantSpec, quantize_rtn
from .base import LayerStats, check_options


def rtn_quantize(
    weight: torch.Tensor, stats: LayerStats | None, spec: QuantSpec, mask: torch.Tensor | None, **options
) -> tuple[torch.Tensor, QuantParams]:
    check_options("rtn", options)
    return quantize_rtn(weight.float(), spec, mask)
