"""torch.compile settings of the decode engine, in one place.

The engine captures its own CUDA graph around the compiled step, so Inductor runs in its default
mode (no cudagraph trees of its own: two graph layers over one static KV cache would fight over
who owns the buffers). ``fullgraph=True`` makes any graph break an error instead of a silent
split into many graphs; ``dynamic=False`` compiles for the engine's exact shapes (batch size and
cache length are fixed per engine, and the step counter lives in device tensors), so a step never
triggers a recompilation.

Each DecodeEngine compiles its own step; engines of the same code share Dynamo's per-code cache,
whose default limit (8 entries) a benchmark over several models and batch sizes would exhaust and
then silently run uncompiled. ``compile_step`` raises that limit.
"""
from __future__ import annotations

import torch

#: Dynamo cache entries allowed per code object (one per engine that compiled the step).
RECOMPILE_LIMIT = 64


def default_compile(device: torch.device) -> bool:
    """Compile by default on CUDA (Inductor generates Triton kernels there); the CPU path stays eager."""
    return torch.device(device).type == "cuda"


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)


def compile_step(fn):
    """``fn`` compiled for fixed shapes as one graph (compilation happens at its first call)."""
    _raise_recompile_limit()
    return torch.compile(fn, fullgraph=True, dynamic=False)
