"""Round-to-nearest as a quantizer entry (scales fitted on kept weights only)."""
from __future__ import annotations

import torch

from ..quant import QuantParams, QuantSpec, quantize_rtn
from ..quant.clip_search import activation_weights, clip_mode, fit_params_searched
from .base import LayerStats, check_options

OPTIONS = ("clip_search",)


def rtn_quantize(
    weight: torch.Tensor, stats: LayerStats | None, spec: QuantSpec, mask: torch.Tensor | None, *,
    clip_search: object = False, **options
) -> tuple[torch.Tensor, QuantParams]:
    """``clip_search``: false, true/'mse' (each group's range shrunk to minimize its squared error)
    or 'act' (the same error weighted by the mean squared activation of each input column)."""
    check_options("rtn", options, OPTIONS)
    mode = clip_mode(clip_search)
    w = weight.float()
    if mode is None:
        return quantize_rtn(w, spec, mask)
    params = fit_params_searched(w, spec, mask, activation_weights(stats) if mode == "act" else None)
    return params.quantize_masked(w, mask), params
