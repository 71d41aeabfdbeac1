"""Int8Embedding: the input embedding table as int8 rows with one scale per row.

Why: once the decoder linears are 2:4 + int4 (about 0.2x of their fp16 bytes), the two vocab x hidden
tables - input embedding and LM head - are the largest fp16 tensors left. The input embedding is only
ever *looked up*: a decode step reads one row per sequence, so storing it as int8 codes and
dequantizing just the gathered rows halves its bytes at no cost per step. (The LM head is a real
matmul over the whole table every step and is left to the linear kernels.)

Quantization is symmetric per row: ``scale = absmax / 127`` rounded to the scale dtype *first*,
then ``code = round(w / scale)`` (round half to even) in float64, so every entry satisfies
``|w - code * scale| <= scale / 2`` with the stored scale. Scales are float16 unless some row's
scale falls outside float16's normal range (or overflows), in which case the whole table keeps
float32 scales (2 more bytes per row) instead of losing the bound.

A lookup gathers codes and scales, multiplies in float32 (exact: a 7-bit code times an 11-bit
float16 mantissa fits float32's 24 bits) and rounds once to the module's compute dtype - the same
values as ``dequantize()``, whatever the dtype.

Tied embeddings (LM head sharing the table, ``tie_word_embeddings``) are refused: the head would
have no weight left - unless the head was made int8 first (``nn/int8_linear.quantize_lm_head``, which
gives it its own table and unties the config).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NonFiniteWeightError, QuantizationError, SparseQuantError

QMAX = 127  # symmetric int8: codes in [-127, 127], so the scale is absmax / 127 and -128 is never used
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MAX = 65504.0
_CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MiB while quantizing a large table


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [V, D], scales [V])`` of a 2-D floating ``weight``: symmetric per-row absmax.

    Rows of zeros get scale 0 and codes 0 (they dequantize to exactly 0). With ``scale_dtype``
    float16 the scales fall back to float32 when float16 cannot hold every row's scale as a normal
    number (see the module docstring).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizationError(f"an int8 embedding needs a 2-D [vocab, hidden] table, got {shape}")
    if not weight.is_floating_point():
        raise QuantizationError(f"an int8 embedding is made from a floating-point table, got {weight.dtype}")
    if scale_dtype not in (torch.float16, torch.float32):
        raise QuantizationError(f"embedding scales are float16 or float32, got {scale_dtype}")
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).any(dim=1).nonzero()[0])
        raise NonFiniteWeightError(f"the embedding table holds NaN or Inf (first in row {bad}); it cannot be quantized")
    absmax = w.abs().amax(dim=1).double() if w.shape[1] else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    ideal = absmax / QMAX
    if scale_dtype == torch.float16:
        used = ideal[absmax > 0]
        if used.numel() and (float(used.min()) < _FP16_MIN_NORMAL or float(used.max()) > _FP16_MAX):
            scale_dtype = torch.float32  # float16 would flush or overflow some row's scale
    scales = ideal.to(scale_dtype)
    s = scales.double()
    if bool(((absmax > 0) & ~(s > 0)).any()) or bool((absmax > (QMAX + 0.5) * s).any()):
        raise QuantizationError("embedding values too small or too large for a per-row int8 scale")
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for a in range(0, w.shape[0], step):
        q = torch.round(w[a:a + step].double() / safe[a:a + step, None])
        codes[a:a + step] = q.clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scales


class Int8Embedding(nn.Module):
    """A lookup table of int8 rows with one scale per row; output in ``compute_dtype``.

    Behaves like ``nn.Embedding`` at inference: ``num_embeddings``, ``embedding_dim``,
    ``padding_idx`` (kept as given; its row is whatever the table holds, zero for a freshly made
    nn.Embedding, and it quantizes exactly), out-of-range ids raise the same IndexError, and
    ``.to(dtype)`` / ``.half()`` change the output dtype. The codes and scales are buffers and
    never change dtype (a float16 -> float32 round trip of the scales would be harmless, the other
    way round not).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, padding_idx: int | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.int8:
            raise SparseQuantError("Int8Embedding codes must be an int8 tensor [vocab, hidden]")
        if (not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float16, torch.float32)
                or tuple(scales.shape) != (codes.shape[0],)):
            raise SparseQuantError(f"Int8Embedding scales must be float16/float32 of shape [{codes.shape[0]}]")
        if not compute_dtype.is_floating_point:
            raise SparseQuantError(f"Int8Embedding computes in a floating dtype, got {compute_dtype}")
        self.num_embeddings, self.embedding_dim = int(codes.shape[0]), int(codes.shape[1])
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise SparseQuantError(f"padding_idx {padding_idx} outside the table of {self.num_embeddings} rows")
            padding_idx = padding_idx % self.num_embeddings  # nn.Embedding stores it non-negative
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, emb: nn.Module, compute_dtype: torch.dtype | None = None,
                       scale_dtype: torch.dtype = torch.float16) -> "Int8Embedding":
        """Quantize a plain ``nn.Embedding`` (output dtype: ``compute_dtype`` or the table's own)."""
        if type(emb) is not nn.Embedding:
            # subclasses (Gemma's scaled embedding, ...) change the lookup; a plain table is all this models
            raise SparseQuantError(f"only a plain nn.Embedding can be stored as int8, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise SparseQuantError("an nn.Embedding with max_norm renormalizes rows at lookup; it cannot be stored as int8")
        codes, scales = quantize_rows(emb.weight, scale_dtype)
        return cls(codes, scales, emb.padding_idx, compute_dtype or emb.weight.dtype)

    def dequantize(self) -> torch.Tensor:
        """The whole table ``[V, D]`` in the compute dtype (reference and tests; a lookup never builds it)."""
        work = torch.promote_types(torch.float32, self.compute_dtype)
        return (self.codes.to(work) * self.scales.to(work)[:, None]).to(self.compute_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(torch.float32, self.compute_dtype)
        rows = F.embedding(input_ids, self.codes)  # same index checks and errors as nn.Embedding
        scale = self.scales[input_ids].unsqueeze(-1)
        return (rows.to(work) * scale.to(work)).to(self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes held: the codes plus the scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def _apply(self, fn, recurse=True):
        # Module.to / .half / .cuda: move the buffers, but keep the codes int8 and the scales in their
        # own dtype; a dtype change becomes the output dtype (what nn.Embedding's weight would do).
        codes = fn(self.codes)
        if codes.dtype != torch.int8:
            raise SparseQuantError("Int8Embedding codes cannot change dtype (Module.type() is not supported)")
        self.compute_dtype = fn(torch.zeros(0, dtype=self.compute_dtype, device=self.codes.device)).dtype
        self._buffers["codes"] = codes
        self._buffers["scales"] = self.scales.to(codes.device)
        return self

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"{self.num_embeddings}, {self.embedding_dim}{pad}, int8 rows, {str(self.scales.dtype)[6:]} scales, "
                f"out={str(self.compute_dtype)[6:]}")


def _ties_head(model) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False):
        return True
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    w = getattr(emb, "weight", None)
    return head is not None and w is not None and getattr(head, "weight", None) is w


def quantize_input_embedding(model, compute_dtype: torch.dtype | None = None) -> Int8Embedding:
    """Replace ``model``'s input embedding by an Int8Embedding (in place); return it.

    Refuses a model whose LM head is tied to the embedding: the head multiplies by the whole table
    every step, and taking the table away would leave it without a weight.
    """
    emb = model.get_input_embeddings()
    if isinstance(emb, Int8Embedding):
        return emb
    if _ties_head(model):
        raise SparseQuantError(
            "this model ties its LM head to the input embedding (tie_word_embeddings=True): an int8 input "
            "embedding would take the head's weight with it; int8 embeddings need untied embeddings")
    q = Int8Embedding.from_embedding(emb, compute_dtype)
    model.set_input_embeddings(q)
    return q


def embedding_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the input embedding lives and the dtype its lookups produce (the model's activations)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, Int8Embedding):
        return emb.codes.device, emb.compute_dtype
    return emb.weight.device, emb.weight.dtype


def vocab_size_of(model) -> int:
    """Rows of the input embedding (token ids must lie below it)."""
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    return int(n) if n is not None else int(emb.weight.shape[0])
