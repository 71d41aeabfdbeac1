"""Text generation over the decode engine: a batch of prompts, greedy or sampled, streamed.

``generate(model, prompts, ...)`` tokenizes (when given strings), left-pads, prefills once and
then decodes one token per step for every row until ``max_new_tokens`` or until each row has
produced an end-of-sequence token. ``on_token(step, tokens)`` is called after every step with the
new token of each row (None for rows already finished); with a callback the host reads each step's
tokens, without one it checks for the end only every few steps so the GPU stays busy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import SparseQuantError
from ..nn.embedding import embedding_device_dtype, vocab_size_of
from .engine import DecodeEngine, left_pad
from .sampling import check_sampling, next_tokens

#: Without a streaming callback, the host looks for end-of-sequence tokens every this many steps.
EOS_CHECK_EVERY = 8


@dataclass
class Generation:
    """Per prompt: the new token ids (ending with the EOS token when one was produced) and text."""

    tokens: list[list[int]]
    texts: list[str] | None = None
    prompt_tokens: list[list[int]] = field(default_factory=list)


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def encode_prompts(prompts, tokenizer) -> list[list[int]]:
    """Strings (with a tokenizer), one list of ids, or a list of lists of ids -> list of id lists."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise SparseQuantError("text prompts need a tokenizer (or pass token ids)")
            rows.append(tokenizer(p)["input_ids"])
        else:
            rows.append([int(t) for t in p])
    if not rows:
        raise SparseQuantError("no prompts given")
    return rows


@torch.no_grad()
def generate(model, prompts, tokenizer=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, on_token: Callable | None = None,
             cuda_graph: bool | None = None, compile: bool | None = None,
             engine: DecodeEngine | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after each prompt. ``temperature=0`` is greedy.

    ``eos_token_id`` defaults to the model's generation config (or the tokenizer's); pass ``[]``
    to never stop early. ``engine`` reuses a DecodeEngine (and its captured CUDA graph) of the same
    batch size whose cache is long enough. ``cuda_graph`` and ``compile`` are DecodeEngine's options
    (default: both on for CUDA, off on the CPU).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SparseQuantError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    rows = encode_prompts(prompts, tokenizer)
    vocab = vocab_size_of(model)
    if any(t < 0 or t >= vocab for r in rows for t in r):
        raise SparseQuantError(f"prompt token ids must lie in [0, {vocab})")
    eos = _eos_ids(model, tokenizer, eos_token_id)
    pad = eos[0] if eos else 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad = tokenizer.pad_token_id
    ids, mask = left_pad(rows, pad)
    b, p = ids.shape
    need = p + max_new_tokens
    if engine is None or engine.batch_size != b or engine.max_len < need:
        engine = DecodeEngine(model, b, need, cuda_graph=cuda_graph, compile=compile)
    device, _ = embedding_device_dtype(model)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(int(seed))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    done_host = [False] * b
    logits = engine.prefill(ids, mask)
    steps = 0
    for step in range(max_new_tokens):
        tok = next_tokens(logits, temperature, top_k, top_p, gen)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out[:, step] = tok
        steps = step + 1
        newly = torch.isin(tok, eos_t) & ~done if eos else torch.zeros_like(done)
        done |= newly
        if on_token is not None:
            host = tok.tolist()
            on_token(step, [None if done_host[i] else host[i] for i in range(b)])
            done_host = done.tolist()
            if all(done_host):
                break
        elif eos and (step + 1) % EOS_CHECK_EVERY == 0 and bool(done.all()):
            break
        if step + 1 < max_new_tokens:
            logits = engine.decode(tok)
    tokens = []
    for row in out[:, :steps].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in eos:
                break
        tokens.append(kept)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(tokens=tokens, texts=texts, prompt_tokens=rows)
