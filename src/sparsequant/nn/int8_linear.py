"""Int8Linear: a dense linear stored as int8 rows with one scale per row - for the LM head.

Why: with the decoder linears at 2:4 + int4, the fp16 LM head is the largest single read of a decode
step (LLaMA-2-7B: 32000 x 4096, 262 MB, ~95 us of a ~2 ms batch-1 step on an H100). Per-row int8
(one scale per vocabulary entry: the table format of ``nn/embedding.quantize_rows``, symmetric absmax,
every weight within half a step of its value) halves those bytes; the W8A16 Triton kernel
(``kernels/triton_w8a16.py``) reads them at ~2.6 TB/s, so the head costs ~51 us instead of ~98 us.

On CUDA with fp16/bf16 inputs the kernel runs (one opaque op under torch.compile); anywhere else the
plain-PyTorch reference (dequantize in float32, multiply, round once), which is what the kernel computes
up to fp32 summation order.

Tied embeddings: ``quantize_lm_head`` turns a head that shares the input embedding's table into an
Int8Linear of its own copy of that table (int8) and unties the config (the head no longer has a float
weight to share); the input embedding keeps the float table. (One int8 table serving both would need
the two modules to move between devices together; not done.)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseQuantError
from .embedding import _ties_head, quantize_rows


class Int8Linear(nn.Module):
    """``y = x @ (codes * scales[:, None])^T + bias``; codes int8 ``[out, in]``, scales ``[out]``."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.int8:
            raise SparseQuantError("Int8Linear codes must be an int8 tensor [out_features, in_features]")
        if (not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float16, torch.float32)
                or tuple(scales.shape) != (codes.shape[0],)):
            raise SparseQuantError(f"Int8Linear scales must be float16/float32 of shape [{codes.shape[0]}]")
        if bias is not None and tuple(bias.shape) != (codes.shape[0],):
            raise SparseQuantError(f"Int8Linear bias must have shape [{codes.shape[0]}]")
        if not compute_dtype.is_floating_point:
            raise SparseQuantError(f"Int8Linear computes in a floating dtype, got {compute_dtype}")
        self.out_features, self.in_features = int(codes.shape[0]), int(codes.shape[1])
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None,
                    scale_dtype: torch.dtype = torch.float16) -> "Int8Linear":
        if not isinstance(linear, nn.Linear):
            raise SparseQuantError(f"only an nn.Linear can be stored as int8 rows, got {type(linear).__name__}")
        codes, scales = quantize_rows(linear.weight, scale_dtype)
        return cls(codes, scales, linear.bias, compute_dtype or linear.weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the compute dtype (reference and tests)."""
        return (self.codes.float() * self.scales.float()[:, None]).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.triton_w8a16 import w8a16_linear_op, w8a16_reference

        x = x.to(self.compute_dtype)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return w8a16_linear_op(x, self.codes, self.scales, self.bias)
        return w8a16_reference(x, self.codes, self.scales, self.bias)

    def nbytes(self) -> int:
        """Bytes held: codes, scales and bias."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.bias) if t is not None)

    def _apply(self, fn, recurse=True):
        # .to / .half / .cuda move the buffers; codes stay int8 and scales keep their dtype; a dtype
        # change becomes the compute (output) dtype, as it would for nn.Linear's weight.
        codes = fn(self.codes)
        if codes.dtype != torch.int8:
            raise SparseQuantError("Int8Linear codes cannot change dtype (Module.type() is not supported)")
        self.compute_dtype = fn(torch.zeros(0, dtype=self.compute_dtype, device=self.codes.device)).dtype
        self._buffers["codes"] = codes
        self._buffers["scales"] = self.scales.to(codes.device)
        if self.bias is not None:
            self._buffers["bias"] = self.bias.to(codes.device, self.compute_dtype)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 rows, {str(self.scales.dtype)[6:]} scales, out={str(self.compute_dtype)[6:]}")


def quantize_lm_head(model, compute_dtype: torch.dtype | None = None) -> Int8Linear:
    """Replace ``model``'s LM head by an Int8Linear (in place); return it. See the module docstring
    for tied embeddings. A head that is already int8 is returned as it is."""
    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        return head
    if head is None:
        raise SparseQuantError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
    if type(head) is not nn.Linear:
        raise SparseQuantError(f"only a plain nn.Linear LM head can be stored as int8 rows, got {type(head).__name__}")
    tied = _ties_head(model)
    q = Int8Linear.from_linear(head, compute_dtype)
    model.set_output_embeddings(q)
    if tied:
        # the head holds no float weight any more: a later tie_weights() must not try to share one
        for cfg in {id(c): c for c in _configs(model)}.values():
            cfg.tie_word_embeddings = False
    return q


def _configs(model):
    cfg = model.config
    yield cfg
    if hasattr(cfg, "get_text_config"):
        yield cfg.get_text_config()
