"""Round-to-nearest quantization with scales fitted on the kept weights only.

Groups run along the input dimension: group ``g`` of row ``r`` covers columns
``[g*G, (g+1)*G)``; the last group may be shorter (ragged) when G does not divide the width.
Codes are unsigned integers in ``[0, 2**bits)``; a weight is ``(code - zero) * scale``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteWeightError, QuantizationError
from .spec import QuantSpec

# float16 range for scales; tiny scales would flush to zero in float16.
_MIN_SCALE = 2.0**-20
_MAX_SCALE = 65504.0


@dataclass
class QuantParams:
    """Per-group scales and zero points of one weight matrix (float32 tensors, shape [out, groups])."""

    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    in_features: int

    def expand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero broadcast to every column, shape [out, in]."""
        g = self.spec.effective_group(self.in_features)
        s = self.scale.repeat_interleave(g, dim=1)[:, : self.in_features]
        z = self.zero.repeat_interleave(g, dim=1)[:, : self.in_features]
        return s, z

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self.expand()
        return quantize_with(w, s, z, self.spec.bits)

    def quantize_masked(self, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Codes of ``w`` with pruned positions set to the zero point, so they dequantize to 0."""
        s, z = self.expand()
        codes = quantize_with(w, s, z, self.spec.bits)
        if mask is not None:
            codes = torch.where(mask.bool(), codes, z.to(torch.uint8))
        return codes

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s, z = self.expand()
        return dequantize_with(codes, s, z)

    def scale_rows(self, factor: torch.Tensor) -> "QuantParams":
        """The parameters of ``diag(factor) @ W``: every group scale of row i times ``factor[i]``,
        rounded to the float16 the checkpoint stores (codes and zero points unchanged)."""
        scale = (self.scale * factor.float().to(self.scale.device)[:, None]).clamp(_MIN_SCALE, _MAX_SCALE)
        return QuantParams(scale.half().float(), self.zero, self.spec, self.in_features)

    def to(self, device) -> "QuantParams":
        return QuantParams(self.scale.to(device), self.zero.to(device), self.spec, self.in_features)


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` under per-element (or broadcastable) ``scale`` and ``zero``; uint8."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_with(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 weights of ``codes``. The single definition both compression and loading use."""
    return (codes.float() - zero) * scale


def fake_quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize_with(quantize_with(w, scale, zero, bits), scale, zero)


def _grouped(x: torch.Tensor, g: int, fill: float) -> torch.Tensor:
    rows, cols = x.shape
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(rows, n_groups, g)


def fit_params(
    w: torch.Tensor,
    spec: QuantSpec,
    mask: torch.Tensor | None = None,
    clip_ratio: torch.Tensor | float = 1.0,
) -> QuantParams:
    """Fit scales (and zero points) per group on the weights ``mask`` keeps.

    ``clip_ratio`` shrinks the range (scalar, or one value per [out, group]); 1.0 is plain
    absmax / min-max. Groups with no kept weight get scale 1 and never matter.
    """
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError("weight contains NaN or Inf; cannot fit quantization scales")
    rows, cols = w.shape
    g = spec.effective_group(cols)
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool()
    keep_g = _grouped(keep, g, False)
    wg = _grouped(w, g, 0.0)
    any_kept = keep_g.any(-1)
    if spec.symmetric:
        absmax = torch.where(keep_g, wg.abs(), torch.zeros_like(wg)).amax(-1) * clip_ratio
        qmax = spec.sym_zero - 1
        scale = absmax / qmax
        scale = torch.where(any_kept & (absmax > 0), scale, torch.ones_like(scale))
        scale = scale.clamp(_MIN_SCALE, _MAX_SCALE).half().float()
        zero = torch.full_like(scale, float(spec.sym_zero))
    else:
        big = torch.finfo(torch.float32).max
        wmax = torch.where(keep_g, wg, torch.full_like(wg, -big)).amax(-1)
        wmin = torch.where(keep_g, wg, torch.full_like(wg, big)).amin(-1)
        wmax = torch.where(any_kept, wmax, torch.zeros_like(wmax))
        wmin = torch.where(any_kept, wmin, torch.zeros_like(wmin))
        # A group of equal values has no range; widen it to include zero so it is still exact.
        flat = (wmax - wmin) <= 1e-12 * torch.maximum(wmax.abs(), wmin.abs()).clamp_min(1e-30)
        wmax = torch.where(flat, wmax.clamp_min(0), wmax)
        wmin = torch.where(flat, wmin.clamp_max(0), wmin)
        if not isinstance(clip_ratio, float) or clip_ratio != 1.0:
            wmax, wmin = wmax * clip_ratio, wmin * clip_ratio
        scale = (wmax - wmin) / (spec.levels - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.clamp(_MIN_SCALE, _MAX_SCALE).half().float()
        zero = torch.round(-wmin / scale).clamp(0, spec.levels - 1)
    return QuantParams(scale=scale, zero=zero, spec=spec, in_features=cols)


def quantize_rtn(
    w: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantParams]:
    """Round-to-nearest: codes (uint8; pruned positions hold the zero point) and parameters."""
    params = fit_params(w, spec, mask)
    return params.quantize_masked(w, mask), params
