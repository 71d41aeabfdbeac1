"""Plain-PyTorch reference ops: the definition every GPU kernel is tested against.

Each function computes in float32 from the checkpoint's own packed tensors, so it depends on
nothing a kernel prepares. They are slow (they materialise the dense weight) and always right.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..patterns.bits import unpack_bits
from ..patterns.pack24 import unpack_24


def _check_nm24_quantized(packed) -> None:
    if packed.storage != "nm24":
        raise PatternError(f"reference 2:4 op needs 'nm24' storage, got {packed.storage!r}")
    if packed.quant is None:
        raise PatternError("reference 2:4 op needs a quantized weight (qweight + scales)")


def dequantize_nm24(packed) -> torch.Tensor:
    """Dense float32 ``W[N, K]`` of a quantized 2:4 PackedWeight: ``(code - zero) * scale`` kept, 0 dropped."""
    _check_nm24_quantized(packed)
    n, k = packed.shape
    q = packed.quant
    codes = unpack_bits(packed.tensors["qweight"], q.bits, n * (k // 2)).reshape(n, k // 2)
    codes_dense, mask = unpack_24(codes, packed.tensors["meta"])
    g = q.effective_group(k)
    scale = packed.tensors["scales"].float().repeat_interleave(g, dim=1)[:, :k]
    if q.symmetric:
        zero = torch.full_like(scale, float(q.sym_zero))
    else:
        zero = packed.tensors["zeros"].float().repeat_interleave(g, dim=1)[:, :k]
    return torch.where(mask, (codes_dense.float() - zero) * scale, torch.zeros_like(scale))


def linear_nm24(x: torch.Tensor, packed) -> torch.Tensor:
    """``x @ W^T`` in float32 for a quantized 2:4 weight (W4A16 / W8A16 reference)."""
    w = dequantize_nm24(packed).to(x.device)
    return x.float() @ w.t()


def quantize_per_token(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token activation quantization: ``(q [M, K], scale [M] float32)``.

    int8: ``q = round(x * (1/s))`` (ties away from zero) in [-127, 127], ``s = absmax / 127``.
    fp8:  ``q = fp8_e4m3(x * (1/s))``, ``s = absmax / 448``. All-zero rows get scale 1.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    top = 127.0 if kind == "int8" else 448.0
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    y = xf * (1.0 / scale)[:, None]
    if kind == "int8":
        q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    elif kind == "fp8":
        q = y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    else:
        raise ValueError(f"activation quantization must be 'int8' or 'fp8', got {kind!r}")
    return q, scale


def linear_w8a8(xq: torch.Tensor, xscale: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """``(xq * xscale[:, None]) @ (wq * wscale[:, None])^T`` in float32 (the W8A8 reference).

    ``wq [N, K]`` int8 or fp8 (a 2:4 matrix stored dense), ``wscale [N]``.
    """
    acc = xq.float() @ wq.float().t()
    return acc * xscale.float()[:, None] * wscale.float()[None, :]
