"""Swap a model's nn.Linear modules for SparseQuantLinear modules holding packed weights; place the result on a device."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.packed import PackedWeight
from .linear import SparseQuantLinear


def replace_linears(model: nn.Module, packed: dict[str, PackedWeight], compute_dtype=torch.float32,
                    with_bias: set[str] | frozenset = frozenset()) -> nn.Module:
    """Replace each linear named in ``packed`` (full module path) in place; return the model.

    Linears named in ``with_bias`` get a bias even when the original had none (variance
    correction adds one); its values come from the checkpoint's state dict afterwards.
    """
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
        if bias is None and name in with_bias:
            bias = torch.zeros(old.out_features, dtype=compute_dtype)
        new = SparseQuantLinear(pw, bias=bias, compute_dtype=compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return model


def place_on_device(model: nn.Module, device, dtype: torch.dtype) -> list[str]:
    """Move a converted model to ``device`` without ever putting a dense compressed weight there.

    Uncompressed tensors move as they are (tied ones stay tied). Each SparseQuantLinear builds its
    kernel state for ``dtype`` activations on the device, which keeps only the kernel's copy of the
    packed bits there. Linears whose format has no kernel on that device get their packed tensors
    moved instead and run through the reference path (a dequantized weight, cached on the device);
    their names are returned, and a warning says how many there are.
    """
    device = torch.device(device)
    without_kernel: list[str] = []
    moved: dict[int, torch.Tensor] = {}  # each tensor moves once, so tied weights stay one tensor

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            new = t.detach().to(device)
            moved[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return moved[id(t)]

    target = device
    if device.type == "cuda" and device.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    for name, module in model.named_modules():
        if isinstance(module, SparseQuantLinear):
            if module.bias is not None:
                module.bias = move(module.bias)
            if module._kernel_state is not None and module._kernel_key == (target, dtype):
                continue  # prepared already (models/fused.py builds fused states before placement)
            if device.type == "cpu" or not module.prepare_kernel(device, dtype):
                for t in module._names:
                    setattr(module, f"packed_{t}", getattr(module, f"packed_{t}").to(device))
                module._dense_cache = None
                if device.type != "cpu":
                    without_kernel.append(name)
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None:
                    table[key] = move(t)
    if without_kernel:
        import warnings

        warnings.warn(f"{len(without_kernel)} compressed linears (e.g. {without_kernel[0]}) have no {device.type} "
                      f"kernel for their format or for {dtype} activations; they run through the reference path, "
                      f"which keeps their dequantized weight on {device}", stacklevel=2)
    return without_kernel
