"""Attention masks over a static KV cache, built from tensors so a CUDA graph can rebuild them.

The engine passes transformers a ready 4-D mask (transformers then uses it as it is and builds
none of its own, which would read tensor values on the host and break graph capture). A query in
cache slot ``q`` of batch row ``b`` sees slot ``k`` when ``valid[b, k]`` (a real token, not left
padding), ``k <= q`` (causal) and, for sliding-window attention, ``q - k < window`` (the rule of
transformers' sliding masks). Every query also sees its own slot, so the rows of padding tokens
are never empty: an empty row would give NaN (fully masked softmax), which the padding slots would
then carry in the cache into later steps.

Masks are additive (0 or the dtype's lowest value) so eager and SDPA attention both take them.
Families whose config lists ``layer_types`` (Qwen2/3, Gemma 2/3) take one mask per layer type in a
dict; the others one tensor, with the config's ``sliding_window`` when it has one (Mistral, Phi-3).
"""
from __future__ import annotations

import torch


class MaskBuilder:
    def __init__(self, config, max_len: int, device, dtype: torch.dtype):
        self.types = list(dict.fromkeys(getattr(config, "layer_types", None) or []))
        self.window = getattr(config, "sliding_window", None)
        self.kv = torch.arange(max_len, device=device)
        self.dtype = dtype
        self.low = torch.finfo(dtype).min

    def _one(self, valid: torch.Tensor, q_slots: torch.Tensor, window: int | None) -> torch.Tensor:
        q = q_slots.view(1, -1, 1)
        k = self.kv.view(1, 1, -1)
        allowed = valid[:, None, :] & (k <= q)
        if window is not None:
            allowed = allowed & (q - k < window)
        allowed = allowed | (k == q)
        zero = torch.zeros((), dtype=self.dtype, device=valid.device)
        low = torch.full((), self.low, dtype=self.dtype, device=valid.device)
        return torch.where(allowed, zero, low)[:, None]  # [B, 1, q, max_len]

    def build(self, valid: torch.Tensor, q_slots: torch.Tensor):
        """``valid [B, max_len]`` bool, ``q_slots [q]`` long -> the mask argument for the model."""
        if not self.types:
            return self._one(valid, q_slots, self.window)
        return {t: self._one(valid, q_slots, self.window if t == "sliding_attention" else None) for t in self.types}
