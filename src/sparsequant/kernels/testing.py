"""Random quantized 2:4 weights in the checkpoint format, for kernel tests and benchmarks."""
from __future__ import annotations

import torch

from ..checkpoint.packed import PackedWeight
from ..patterns import SparsitySpec, nm_mask
from ..quant import QuantSpec, quantize_rtn
from ..solvers.base import CompressedWeight


def random_packed24(n: int, k: int, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                    device="cpu", seed: int = 0) -> PackedWeight:
    """A PackedWeight ('nm24') of a random Gaussian weight, magnitude-pruned to 2:4 and RTN-quantized."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device=device) * 0.05
    mask = nm_mask(w.abs() + torch.rand(n, k, generator=gen, device=device) * 1e-3, 2, 4)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    codes, params = quantize_rtn(w * mask, spec, mask)
    cw = CompressedWeight.from_quantized(codes, params, SparsitySpec(kind="nm", n=2, m=4), mask)
    return PackedWeight.from_compressed(cw)
