"""HybridState: a prepared hybrid-tile weight (tiles dense or 2:4) for ``kernels.linear``.

Dispatch by token count (measured on an H100: BENCHMARKS.md, '## Hybrid tiles'): up to
``HYBRID_DECODE_MAX_TOKENS`` the hybrid decode kernel (triton_hybrid.py: no dense copy of W);
above that the weight is expanded into a transient dense ``W^T`` and cuBLAS multiplies.
"""
from __future__ import annotations

import torch

from .hybrid_layout import build_hybrid_layout

#: Largest token count sent to the hybrid decode kernel; more tokens expand W and use cuBLAS.
#: H100 (BENCHMARKS.md, '### Hybrid tiles'): decode 9-18 us at 1 token and 80-230 us at 16, expand +
#: cuBLAS 37-108 us whatever the count up to 128; decode time grows ~linearly with the tokens, so
#: the crossover lies near 4 (4096x4096) to 8 (11008-wide) tokens: 4 (interpolated, not timed at 2-8).
HYBRID_DECODE_MAX_TOKENS = 4


class HybridState:
    """Kernel layout of a quantized hybrid weight plus its split-K workspace."""

    def __init__(self, packed, device: torch.device, dtype: torch.dtype):
        from .triton_decode import DecodeWorkspace

        self.device = torch.device(device)
        self.layout = build_hybrid_layout(packed, self.device)
        self.dtype = dtype
        self.workspace = DecodeWorkspace(self.layout.n, self.device)
        self.kind = f"hybrid-w{self.layout.bits}a16"

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        from .triton_hybrid import hybrid_decode_linear, hybrid_expand_linear

        if x2d.shape[0] <= HYBRID_DECODE_MAX_TOKENS:
            return hybrid_decode_linear(x2d, self.layout, self.workspace)
        return hybrid_expand_linear(x2d, self.layout)


def prepare_hybrid(packed, device, dtype: torch.dtype) -> HybridState | None:
    """A HybridState for a quantized 'hybrid' weight on a CUDA device, or None (reference path)."""
    from .hybrid_layout import unsupported_reason

    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or packed.storage != "hybrid":
        return None
    if unsupported_reason(packed) is not None:
        return None
    try:
        import triton  # noqa: F401
    except Exception:
        return None
    return HybridState(packed, device, dtype)
