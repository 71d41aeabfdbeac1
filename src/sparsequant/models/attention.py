"""SDPA attention for grouped-query models that never copies the KV cache.

transformers' SDPA path gives a grouped-query model (LLaMA-3-8B: 32 query heads over 8 KV heads)
``enable_gqa`` only when there is no mask (with a mask, PyTorch's CUDA SDPA would fall back to its
math kernel), and otherwise expands K and V to every query head with ``repeat_kv`` - a copy of the
whole static cache, 4x its size, in every layer and every decode step (transformers 5.23 avoids it
for one query token in eager mode only, not under torch.compile). Our decode engine always passes a
mask and always compiles.

For one query token per row there is an exact rearrangement without copies: the ``G`` query heads
that share a KV head become ``G`` query *rows* of that head, ``q [B, H, 1, D] -> [B, H/G, G, D]``
(a view), and attend to the cache's ``[B, H/G, L, D]`` as they are. Every row is the same token, so
the mask row ``[B, 1, 1, L]`` is theirs too (it broadcasts). SDPA then reads K and V once per KV
head. Other shapes (prompts, masks per head) go to transformers' own SDPA function unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs):
    """transformers' attention-function contract: ``q [B, H, q, D]``, ``k/v [B, H_kv, L, D]`` ->
    ``(out [B, q, H, D], None)``; grouped heads at one query token without repeating K/V."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    b, h, q_len, d = query.shape
    one_mask_row = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (groups == 1 or q_len != 1 or not one_mask_row or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")):
        stock = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return stock(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if h != groups * key.shape[1]:
        raise ValueError(f"{h} query heads do not form groups of {groups} over {key.shape[1]} KV heads")
    q = query.reshape(b, h // groups, groups, d)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=False)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     fallback=None, **kwargs):
    """transformers' attention-function contract; one query token per row on CUDA, where it is the faster
    kernel (``triton_attention.preferred``: few rows x heads, caches up to 512 positions), goes to the
    split-KV Triton kernel (``kernels/triton_attention.py``: grouped-query heads read their shared KV
    head, no copies), everything else to ``fallback`` (default: transformers' SDPA)."""
    from ..kernels import triton_attention

    if (query.device.type != "cuda" or dropout or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
            or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
            or not triton_attention.supported(query, key, attention_mask)
            or not triton_attention.preferred(query.shape[0], query.shape[1], key.shape[2])):
        fallback = fallback if fallback is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return triton_attention.decode_attention_op(query, key, value, attention_mask, scale), None
