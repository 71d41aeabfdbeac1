"""Swap a model's nn.Linear modules for SparseQuantLinear modules holding packed weights."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.packed import PackedWeight
from .linear import SparseQuantLinear


def replace_linears(model: nn.Module, packed: dict[str, PackedWeight], compute_dtype=torch.float32) -> nn.Module:
    """Replace each linear named in ``packed`` (full module path) in place; return the model."""
    modules = dict(model.named_modules())
    for name, pw in packed.items():
        old = modules.get(name)
        if not isinstance(old, nn.Linear):
            from ..errors import CheckpointError

            raise CheckpointError(f"{name} is not a linear layer of this model")
        if (old.out_features, old.in_features) != tuple(pw.shape):
            from ..errors import CheckpointError

            raise CheckpointError(f"{name}: stored shape {pw.shape} differs from the model's "
                                  f"{(old.out_features, old.in_features)}")
        bias = None if old.bias is None else old.bias.detach()
        new = SparseQuantLinear(pw, bias=bias, compute_dtype=compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return model
