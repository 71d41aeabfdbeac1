"""One linear from several that read the same input: their weights stacked along the output rows.

``fuse_linears([q, k, v])`` gives a module whose output is ``cat([q(x), k(x), v(x)], -1)``, computed
by one product: one kernel launch instead of three, and a grid three times as tall for the kernel.
For ``nn.Linear`` this is the concatenation of the weights (and biases). For ``SparseQuantLinear``
it is the concatenation of the packed tensors along the output rows, which is exact when every
tensor of the stored format is indexed by output row first: 2:4 (``nm24``: codes, metadata, scales,
zero points) and dense storage with byte-aligned rows, plus structured outliers beside them. The
parts must agree on everything else (pattern, bits, group size, symmetry, storage dtype, compute
dtype, activation quantization).

What cannot be stacked exactly is refused with a reason (``FusionRefused``) and the caller keeps
the parts: hybrid tiles (a tile grid over the rows of one matrix), bitmap storage (one flat bit
stream per matrix), row-unaligned code streams, and low-rank adapters (their up-factor would have to
become block-diagonal, and a quantized factor's groups run along the rank).
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.packed import PackedWeight
from ..errors import SparseQuantError
from .linear import SparseQuantLinear

#: Storage kinds whose every tensor is indexed by output row first (checkpoint/packed.py).
ROW_STACKABLE = ("dense", "nm24")


class FusionRefused(SparseQuantError):
    """These linears cannot be computed exactly as one; the message says why."""


def _stack_bias(parts, n_out: list[int], dtype) -> torch.Tensor | None:
    """The parts' biases end to end, zeros for a part without one; None when none has one."""
    if all(p.bias is None for p in parts):
        return None
    device = next(p.bias.device for p in parts if p.bias is not None)
    return torch.cat([p.bias.detach().to(dtype) if p.bias is not None else torch.zeros(n, dtype=dtype, device=device)
                      for p, n in zip(parts, n_out)])


def concat_packed(parts: list[PackedWeight]) -> PackedWeight:
    """The PackedWeight of the row-stacked matrix ``[W_0; W_1; ...]``, or FusionRefused."""
    first = parts[0]
    k = first.shape[1]
    for p in parts:
        if p.shape[1] != k:
            raise FusionRefused(f"input widths differ ({[q.shape[1] for q in parts]})")
        if p.adapter is not None:
            raise FusionRefused("low-rank adapters are not stacked (the up-factor would become block-diagonal)")
        if p.storage not in ROW_STACKABLE:
            raise FusionRefused(f"{p.storage} storage is not indexed by output row")
        if (p.storage, p.sparsity.to_dict(), p.quant) != (first.storage, first.sparsity.to_dict(), first.quant):
            raise FusionRefused(f"formats differ: {first.storage} {first.sparsity} {first.quant} "
                                f"vs {p.storage} {p.sparsity} {p.quant}")
        if set(p.tensors) != set(first.tensors):
            raise FusionRefused(f"stored tensors differ: {sorted(first.tensors)} vs {sorted(p.tensors)}")
    tensors = {}
    for name in first.tensors:
        ts = [p.tensors[name] for p in parts]
        for p, t in zip(parts, ts):
            if t.dim() < 2 or t.shape[0] != p.shape[0]:
                raise FusionRefused(f"tensor {name} {tuple(t.shape)} is not indexed by output row "
                                    f"(rows of {p.shape[1]} codes do not end on a byte)")
        if len({(t.shape[1:], t.dtype, t.device) for t in ts}) != 1:
            raise FusionRefused(f"tensor {name} differs in trailing shape, dtype or device between the parts")
        tensors[name] = torch.cat(ts)
    n = sum(p.shape[0] for p in parts)
    return PackedWeight(shape=(n, k), storage=first.storage, sparsity=first.sparsity, quant=first.quant,
                        tensors=tensors, adapter=None)


def _fuse_dense(parts: list[nn.Linear]) -> nn.Linear:
    w = parts[0].weight
    if len({(p.in_features, p.weight.dtype, p.weight.device) for p in parts}) != 1:
        raise FusionRefused("the linears differ in input width, dtype or device")
    n_out = [p.out_features for p in parts]
    with torch.device("meta"):
        fused = nn.Linear(parts[0].in_features, sum(n_out), bias=any(p.bias is not None for p in parts),
                          dtype=w.dtype)
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
    bias = _stack_bias(parts, n_out, w.dtype)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def _fuse_sparse(parts: list[SparseQuantLinear], device=None, dtype=None) -> SparseQuantLinear:
    first = parts[0]
    if len({(p.compute_dtype, p.act_quant) for p in parts}) != 1:
        raise FusionRefused("the linears differ in compute dtype or activation quantization")
    packed = concat_packed([p.packed for p in parts])
    bias = _stack_bias(parts, [p.out_features for p in parts], first.compute_dtype)
    fused = SparseQuantLinear(packed, bias=bias, compute_dtype=first.compute_dtype, act_quant=first.act_quant)
    # Where the parts already run a kernel, the fused weight must too (else fusing would be a slowdown):
    # build its state for the same device and dtype now, and keep the parts if no kernel takes it.
    target = first._kernel_key if first._kernel_key is not None else (
        None if device is None or torch.device(device).type == "cpu" else (device, dtype))
    if target is not None and not fused.prepare_kernel(*target):
        if first._kernel_key is not None or any([p.prepare_kernel(*target) for p in parts]):
            raise FusionRefused(f"no {torch.device(target[0]).type} kernel takes the fused "
                                f"{packed.shape[0]}x{packed.shape[1]} weight, while the parts have one")
    return fused


def fuse_linears(parts: list[nn.Module], device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """One module computing ``cat([p(x) for p in parts], -1)``; FusionRefused when that is not exact.

    SparseQuantLinear parts: with ``device``/``dtype`` (the placement to come) or parts that already
    hold kernel states, the fused module's kernel state is built here; if no kernel takes the fused
    weight while the parts run one, fusion is refused (the parts stay, and stay fast).
    """
    if not parts:
        raise FusionRefused("nothing to fuse")
    if all(type(p) is nn.Linear for p in parts):
        return _fuse_dense(parts)
    if all(isinstance(p, SparseQuantLinear) for p in parts):
        return _fuse_sparse(parts, device, dtype)
    raise FusionRefused("the linears are of different kinds: " + ", ".join(sorted({type(p).__name__ for p in parts})))
