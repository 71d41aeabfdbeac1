"""``torch.ops.sparsequant.linear``: a SparseQuantLinear's product as one opaque op for torch.compile.

The kernels behind SparseQuantLinear (Triton launchers, the ctypes mma.sp kernel, cuSPARSELt, the
reference path's cached dense weight) keep Python state - prepared layouts, split-K workspaces,
algorithm caches - that Dynamo cannot and should not trace: it would graph-break at the ctypes call
or try to inline Triton launch code. So under ``torch.compile`` the module calls this custom op
instead. The op receives the activations plus a small integer *handle* naming the module, looks the
module up in a registry (weak references: the registry never keeps a model alive) and runs its
eager forward. Inductor sees one extern call per linear; the fake implementation only has to give
the output's shape and dtype (``[..., out_features]``, the activations' dtype).

Handles are constants of a compiled graph, so every module gets its own handle at construction and
a new one when it is copied or unpickled (a copy must not run its original's weights).
"""
from __future__ import annotations

import itertools
import weakref

import torch

_HANDLES = itertools.count(1)
_MODULES: dict[int, weakref.ref] = {}


def register(module) -> int:
    """A fresh handle for ``module`` (called by SparseQuantLinear at construction and on copy)."""
    handle = next(_HANDLES)
    _MODULES[handle] = weakref.ref(module, lambda _ref, h=handle: _MODULES.pop(h, None))
    return handle


def lookup(handle: int):
    ref = _MODULES.get(int(handle))
    module = ref() if ref is not None else None
    if module is None:
        raise RuntimeError(f"sparsequant::linear: no live SparseQuantLinear has handle {handle} "
                           "(the module was deleted after a graph that calls it was compiled)")
    return module


@torch.library.custom_op("sparsequant::linear", mutates_args=())
def linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``module(x)`` of the SparseQuantLinear registered as ``handle``; ``[..., K] -> [..., out_features]``."""
    y = lookup(handle).forward_eager(x)
    if y.shape[-1] != out_features or y.dtype != x.dtype:
        raise RuntimeError(f"sparsequant::linear: handle {handle} gave {tuple(y.shape)} {y.dtype}, "
                           f"expected [..., {out_features}] {x.dtype}")
    # custom ops must not return a view of an input; the kernels and F.linear never do, this is a guard
    return y if y.data_ptr() != x.data_ptr() else y.clone()


@linear.register_fake
def _linear_fake(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
