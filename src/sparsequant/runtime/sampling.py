"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Pure functions of tensors. Greedy is ``argmax`` (the first maximum, as transformers does).
Sampling draws from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits
and to the smallest set of most probable tokens whose probability reaches ``top_p`` (a token is
dropped when the tokens ranked above it already hold ``top_p``; the most probable always stays).
A ``torch.Generator`` makes the draws reproducible.
"""
from __future__ import annotations

import torch

from ..errors import SparseQuantError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or temperature < 0 or temperature != temperature:
        raise SparseQuantError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SparseQuantError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SparseQuantError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """float32 logits ``[B, V]`` with the excluded tokens set to -inf."""
    x = logits.float()
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop = before >= top_p
        drop[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return x


def next_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits [B, V]``: long ``[B]``."""
    if not temperature:
        return torch.argmax(logits, dim=-1)
    x = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
