"""SLiM-Quant as a quantizer entry (one symmetric scale per tensor; see quant/slim.py)."""
from __future__ import annotations

import torch

from ..quant import QuantParams, QuantSpec
from ..quant.slim import quantize_slim
from .base import LayerStats, check_options


def slim_quantize(
    weight: torch.Tensor, stats: LayerStats | None, spec: QuantSpec, mask: torch.Tensor | None, **options
) -> tuple[torch.Tensor, QuantParams]:
    check_options("slim", options)
    return quantize_slim(weight.float(), spec, mask)
