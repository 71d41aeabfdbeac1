"""Glue for SmoothQuant-style equalization: fold per-channel scales into the norm before linears.

The math lives in ``solvers/smoothing.py``; this module only finds, per model family, which
norm feeds which linears (``models/families.py``), measures the activation maxima with hooks,
and writes the folded tensors back.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.families import Family, submodule
from ..solvers.smoothing import fold_smoothing, smoothing_scales
from .capture import layer_output
from .stats import StatsHooks


def check_smoothable(model: nn.Module, family: Family) -> None:
    if not family.norm_groups:
        raise UnsupportedModelError(f"{family.name} has no norm/linear mapping for equalization")
    if getattr(model.config, "model_type", "") == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        raise UnsupportedModelError("this OPT model normalizes after attention (post-LN): no norm precedes "
                                    "the linears, so equalization cannot be folded; drop 'smoothing' from the recipe")


@torch.no_grad()
def equalize_layer(layer: nn.Module, family: Family, hidden: list[torch.Tensor], kwargs: list[dict],
                   alpha: float, device) -> dict[str, float]:
    """Measure max|x| at each norm group's input and fold the smoothing scales; returns max scale per group."""
    firsts = {g.linears[0]: submodule(layer, g.linears[0]) for g in family.norm_groups}
    with StatsHooks(firsts, set(), device) as hooks:
        for h, kw in zip(hidden, kwargs):
            layer_output(layer, h.to(device), kw)
    stats = hooks.results()
    report = {}
    for group in family.norm_groups:
        norm = submodule(layer, group.norm)
        linears = [submodule(layer, p) for p in group.linears]
        s = smoothing_scales(stats[group.linears[0]].abs_max, [lin.weight for lin in linears], alpha)
        bias = getattr(norm, "bias", None)
        g, b, ws = fold_smoothing(norm.weight.data, None if bias is None else bias.data,
                                  [lin.weight.data for lin in linears], s, group.kind)
        norm.weight.data.copy_(g)
        if b is not None:
            norm.bias.data.copy_(b)
        for lin, w in zip(linears, ws):
            lin.weight.data.copy_(w)
        report[group.norm] = float(s.max())
    return report
