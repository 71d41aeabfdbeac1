"""SparseQuantLinear: a linear layer that holds a packed compressed weight.

It computes with a GPU kernel when one supports the weight's format on the input's device
(``sparsequant.kernels.prepare`` decides), and otherwise with the reference path: dequantize
the packed weight once into a dense matrix and call ``F.linear``. The reference path gives
exactly the same weight values the compressor computed with: the compressed weight plus its
recovery terms (``CompressedWeight.effective_weight``). The kernels compute the sparse/quantized
part only; a low-rank adapter is then added as ``(x @ down^T) @ up^T``.

Under ``torch.compile`` the whole forward is one opaque custom op, ``torch.ops.sparsequant.linear``
(``linear_op.py``): Dynamo never traces into the kernels' Python/ctypes launch code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.packed import PackedWeight
from . import linear_op


class SparseQuantLinear(nn.Module):
    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None, compute_dtype=torch.float32,
                 act_quant: str | None = None):
        super().__init__()
        # W8A8 (cuSPARSELt int8/fp8 with per-token activation quantization) is opt-in: it changes
        # the activations' precision, so it is a property of the module, never chosen silently.
        self.act_quant = act_quant
        self.in_features = packed.shape[1]
        self.out_features = packed.shape[0]
        self.storage = packed.storage
        self.sparsity = packed.sparsity
        self.quant = packed.quant
        self.adapter = packed.adapter
        self.compute_dtype = compute_dtype
        self._names = sorted(packed.tensors)
        for name, t in packed.tensors.items():
            self.register_buffer(f"packed_{name}", t)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self._dense_cache: torch.Tensor | None = None
        self._kernel_state = None
        self._kernel_key = None
        self._adapter_factors = None
        self._op_handle = linear_op.register(self)

    def __setstate__(self, state):
        # copy.deepcopy and unpickling come here: the copy needs its own custom-op handle
        super().__setstate__(state)
        self._op_handle = linear_op.register(self)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            shape=(self.out_features, self.in_features),
            storage=self.storage,
            sparsity=self.sparsity,
            quant=self.quant,
            tensors={n: getattr(self, f"packed_{n}") for n in self._names},
            adapter=self.adapter,
        )

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight with its recovery terms (cached; the reference path's only cost)."""
        if self._dense_cache is None or self._dense_cache.device != self.packed_tensor_device():
            self._dense_cache = self.packed.to_compressed().effective_weight().to(self.compute_dtype)
        return self._dense_cache

    def packed_tensor_device(self) -> torch.device:
        return getattr(self, f"packed_{self._names[0]}").device

    def _kernel(self, x: torch.Tensor):
        if x.device.type != "cuda":
            return None
        key = (x.device, x.dtype)
        if self._kernel_key != key:
            from .. import kernels

            self._kernel_state = kernels.prepare(self.packed.without_adapter(), x.device, x.dtype,
                                                 act_quant=self.act_quant)
            self._kernel_key = key
        return self._kernel_state

    def prepare_kernel(self, device, dtype: torch.dtype) -> bool:
        """Build the kernel state for ``dtype`` activations on ``device`` now; False when no kernel applies.

        The kernel holds its own copy of the packed bits (rearranged), so the checkpoint-layout
        tensors it was built from move to the CPU: the GPU then holds the packed weight once. They
        stay the module's buffers (state_dict, a later change of dtype rebuilds the kernel from them).
        """
        from .. import kernels

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        state = kernels.prepare(self.packed.without_adapter(), device, dtype, act_quant=self.act_quant)
        if state is None:
            return False
        for name in self._names:
            # the adapter term runs on the activations' device; the kernel holds the rest
            target = device if name.startswith("adapter_") else torch.device("cpu")
            setattr(self, f"packed_{name}", getattr(self, f"packed_{name}").to(target))
        self._adapter_factors = None
        self._dense_cache = None
        self._kernel_state, self._kernel_key = state, (device, dtype)
        return True

    def _adapter_term(self, x: torch.Tensor) -> torch.Tensor | None:
        """``up (down x)`` in the activations' dtype, or None without an adapter."""
        if self.adapter is None:
            return None
        if self._adapter_factors is None or self._adapter_factors[0].dtype != x.dtype:
            a = self.packed.lowrank()
            self._adapter_factors = (a.down.to(x.dtype), a.up.to(x.dtype))
        down, up = self._adapter_factors
        return F.linear(F.linear(x, down), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return linear_op.linear(x, self._op_handle, self.out_features)
        return self.forward_eager(x)

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The computation itself (what the custom op runs): kernel, or dequantized weight + F.linear."""
        state = self._kernel(x)
        if state is not None:
            from .. import kernels

            y = kernels.linear(x, state)
            extra = self._adapter_term(x)
            if extra is not None:
                y = y + extra
            return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self.dense_weight()
        b = None if self.bias is None else self.bias.to(x.dtype)
        # (a copy per call only when the packed tensors live elsewhere than x: never on the fast paths)
        return F.linear(x, w.to(device=x.device, dtype=x.dtype), b)

    def _apply(self, fn, recurse=True):
        # Moving buffers invalidates derived caches.
        self._dense_cache = None
        self._kernel_state = None
        self._kernel_key = None
        self._adapter_factors = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        q = "float" if self.quant is None else str(self.quant)
        a = "" if self.adapter is None else f", adapter rank {self.adapter.get('rank')}"
        return f"in={self.in_features}, out={self.out_features}, sparsity={self.sparsity}, quant={q}, storage={self.storage}{a}"
