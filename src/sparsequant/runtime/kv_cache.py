"""A static KV cache whose write position is a tensor the engine owns.

Every layer holds ``keys``/``values`` of shape ``[batch, kv_heads, max_len, head_dim]`` allocated at
the first write (so shapes and dtype come from the model itself, whatever its family). Tokens are
written at the cache *slots* in ``cache.write_slots`` - a device tensor the engine sets before each
forward (``arange(prompt_len)`` for prefill, a one-element tensor it increments in place for decode).
Because the slot is data, not a Python int, one captured CUDA graph serves every decode step.

All rows of a batch share slot numbers: prompts are left-padded, and padding slots are hidden by
the attention mask (``runtime/masks.py``), never by the cache. transformers' own StaticCache
counts positions itself, which a replayed graph cannot reset; this class only exposes the small
Cache interface that the decoder layers call (``update``) plus what the mask code may ask.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class StaticLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "StaticKVCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        L = self.owner.max_len
        self.keys = torch.zeros(b, h, L, dk, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, h, L, value_states.shape[-1], dtype=value_states.dtype,
                                  device=value_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.owner.write_slots
        if slots is None or slots.numel() != key_states.shape[-2]:
            raise RuntimeError("StaticKVCache: the engine must set write_slots (one slot per new token) before a forward")
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.max_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.max_len

    def get_max_cache_shape(self) -> int:
        return self.owner.max_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class StaticKVCache(Cache):
    """``num_layers`` static layers of ``max_len`` slots; ``length`` is the host-side count of filled slots."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = int(max_len)
        self.length = 0
        self.write_slots: torch.Tensor | None = None
        super().__init__(layers=[StaticLayer(self) for _ in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.length

    def get_query_offset(self, *args, **kwargs) -> int:
        return self.length

    def nbytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers if l.is_initialized)
