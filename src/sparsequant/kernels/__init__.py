"""GPU kernels for packed sparse + quantized weights.

``prepare(packed, device, dtype)`` returns a kernel state for a PackedWeight when some kernel
supports its format on ``device`` (or None: the caller then uses the reference path), and
``linear(x, state)`` computes ``x @ W^T`` with it.
"""
from __future__ import annotations

import torch


def prepare(packed, device: torch.device, dtype: torch.dtype):
    """No kernel is registered yet: every format uses the reference path."""
    return None


def linear(x: torch.Tensor, state) -> torch.Tensor:
    raise NotImplementedError("kernels.linear called without a kernel state")
