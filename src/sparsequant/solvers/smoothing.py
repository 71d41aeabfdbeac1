"""SmoothQuant-style equalization (Xiao et al., 2023): move activation outliers into the weights.

A linear layer computes ``W x``. With a per-input-channel factor ``s > 0`` it also computes
``(W diag(s)) (x / s)``: dividing the activations by ``s`` shrinks their outlier channels and
multiplying the weight columns by ``s`` keeps the function. When ``x`` is the output of a norm,
``x / s`` costs nothing at run time: fold ``1 / s`` into the norm's scale (and bias).
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteWeightError, QuantizationError

NORM_KINDS = ("rms", "layernorm", "rms_plus_one")


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteWeightError(f"{what} holds NaN or Inf")


def smoothing_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)`` over all ``weights`` that read input j.

    ``weights`` are the ``[out, in]`` matrices fed by the same activations (q, k and v after one
    norm), so one ``s`` serves them all. Channels whose activation or weight maximum is zero get
    ``s_j = 1``: nothing to balance there, and any other value would divide by zero or erase the
    channel. Returns float32 ``[in]`` (float64 when the inputs are float64).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise QuantizationError(f"smoothing alpha must be a number in [0, 1], got {alpha!r}")
    if act_absmax.dim() != 1:
        raise ValueError(f"act_absmax must be 1-D [in], got shape {tuple(act_absmax.shape)}")
    if not weights:
        raise ValueError("smoothing_scales needs at least one weight matrix")
    k = act_absmax.shape[0]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}; expected [out, {k}] to match act_absmax")
        _check_finite(w, f"weight {i}")
    _check_finite(act_absmax, "act_absmax")
    if bool((act_absmax < 0).any()):
        raise ValueError("act_absmax must hold maxima of |x|, which are never negative")
    dtype = _dtype(act_absmax, *weights)
    a = act_absmax.to(dtype)
    wmax = torch.stack([w.to(device=a.device, dtype=dtype).abs().amax(0) for w in weights]).amax(0)
    live = (a > 0) & (wmax > 0)
    safe_a = torch.where(live, a, torch.ones_like(a))
    safe_w = torch.where(live, wmax, torch.ones_like(wmax))
    s = safe_a.pow(alpha) / safe_w.pow(1.0 - alpha)
    return torch.where(live, s, torch.ones_like(s))


def fold_smoothing(
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    linear_weights: list[torch.Tensor],
    s: torch.Tensor,
    norm_kind: str,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """New (norm weight, norm bias, linear weights) computing the same function with ``s`` applied.

    The norm's output is divided by ``s`` and each linear's columns are multiplied by it.
    ``norm_kind``: ``"rms"`` / ``"layernorm"`` scale by ``w``; ``"rms_plus_one"`` (Gemma) scales by
    ``1 + w``, so the new ``w`` is ``(1 + w) / s - 1``. Math runs in float32 (float64 if given) and
    results come back in each input's dtype; the inputs are not modified.
    """
    if norm_kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {norm_kind!r}; use one of {', '.join(NORM_KINDS)}")
    k = s.shape[0] if s.dim() == 1 else -1
    if s.dim() != 1 or norm_weight.shape != (k,) or (norm_bias is not None and norm_bias.shape != (k,)):
        raise ValueError(
            f"s {tuple(s.shape)}, norm weight {tuple(norm_weight.shape)} and norm bias "
            f"{None if norm_bias is None else tuple(norm_bias.shape)} must all be [in]"
        )
    _check_finite(s, "smoothing scales")
    if not bool((s > 0).all()):
        raise ValueError("smoothing scales must be positive")
    for i, w in enumerate(linear_weights):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"linear weight {i} has shape {tuple(w.shape)}; expected [out, {k}]")
    dtype = _dtype(norm_weight, norm_bias, s, *linear_weights)
    sd = s.to(device=norm_weight.device, dtype=dtype)
    g = norm_weight.to(dtype)
    if norm_kind == "rms_plus_one":
        new_g = (1.0 + g) / sd - 1.0
    else:
        new_g = g / sd
    new_b = None if norm_bias is None else (norm_bias.to(dtype) / sd).to(norm_bias.dtype)
    new_ws = [(w.to(dtype) * sd.to(w.device)).to(w.dtype) for w in linear_weights]
    return new_g.to(norm_weight.dtype), new_b, new_ws
