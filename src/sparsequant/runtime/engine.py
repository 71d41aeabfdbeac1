"""The decode engine: prefill, then one token per step over a static KV cache (gpt-fast style).

One ``DecodeEngine`` serves one model, batch size and maximum length. ``prefill`` runs the
left-padded prompts through the model once (eagerly, or replaying a CUDA graph captured for that
prompt length with ``graph=True``) and fills the cache; ``decode`` feeds one token per row at the
next cache slot. On CUDA the decode step - mask, embeddings, every layer, the LM head - is captured
once in a CUDA graph and replayed: per step the host only copies the new tokens into the graph's
input buffer and bumps two counters on the device, so Python and kernel-launch overhead vanish.
On the CPU the same step runs eagerly.

With ``compile`` (default: on for CUDA when compilation works, off on the CPU) the decode step is
first compiled by torch.compile (Inductor, ``fullgraph=True, dynamic=False``): RMSNorm, rotary
embeddings, the mask, SiLU*mul and the residual adds become a few fused Triton kernels instead of
~30-50 small ones per layer, and the graph captures the compiled step. Sparse linears reach
Inductor as one opaque custom op each (``nn/linear_op.py``). Compilation happens in the warm-up
before capture and once per engine (shapes are fixed by batch size and cache length; every
per-step input is a device tensor, so no guard sees a step counter). ``compile_prefill`` compiles
the prefill forward too, once per prompt length (off by default: each length costs a compilation
and a prefill of many tokens is dominated by the linears).

Graph safety rests on three things: every input of the step is a static device buffer (tokens,
position ids, the cache slot, the padding map), the KV cache writes at a slot held in a tensor
(``kv_cache.py``), and the mask comes from tensors (``masks.py``). Kernel states are built by the
warm-up runs before capture (the sparse kernels prepare themselves on first use).
"""
from __future__ import annotations

import torch

from ..errors import SparseQuantError
from ..nn.embedding import embedding_device_dtype
from .compile import compile_step, default_compile
from .kv_cache import StaticKVCache
from .masks import MaskBuilder


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])`` with every row right-aligned (left padding)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise SparseQuantError("every prompt needs at least one token")
    p = max(len(r) for r in rows)
    ids = torch.full((len(rows), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, p - len(r):] = 1
    return ids, mask


class DecodeEngine:
    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool | None = None,
                 compile: bool | None = None, compile_prefill: bool = False):
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.device, self.dtype = embedding_device_dtype(model)
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise SparseQuantError(f"prompt + new tokens = {max_len} exceeds the model's "
                                   f"max_position_embeddings ({limit})")
        # Whole multiples of 16 slots: the fused attention kernels want 16-element-aligned mask rows.
        padded = -(-int(max_len) // 16) * 16
        self.batch_size, self.max_len = int(batch_size), padded if limit is None or padded <= limit else int(max_len)
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.use_graph and self.device.type != "cuda":
            raise SparseQuantError("CUDA graphs need a model on a CUDA device")
        # None: compile where it pays and works (CUDA); a failed compilation then falls back to eager
        # with a warning. True: compile or raise. The CPU path is eager unless asked for.
        self.compile_auto = compile is None
        self.use_compile = default_compile(self.device) if compile is None else bool(compile)
        self.compile_prefill = bool(compile_prefill) and self.use_compile
        self._step_fn = None  # the (compiled) decode step, built at the first decode
        self._prefill_fns: dict[int, object] = {}
        self.cache = StaticKVCache(self.config.num_hidden_layers, self.max_len)
        self.masks = MaskBuilder(self.config, self.max_len, self.device, self.dtype)
        dev = self.device
        self.valid = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=dev)
        self.tokens = torch.zeros(self.batch_size, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.batch_size, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph = None
        self._graph_logits = None
        self._prefill_graphs: dict[int, tuple] = {}

    # -- the forward passes -----------------------------------------------------------------
    def _model_step(self, ids, positions, slots, valid) -> torch.Tensor:
        """Mask, model, last logits: the traced/compiled region. The cache writes at ``slots``."""
        out = self.model(input_ids=ids, attention_mask=self.masks.build(valid, slots), position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _decode_impl(self, ids, positions, slot, valid) -> torch.Tensor:
        valid.index_fill_(1, slot, True)
        return self._model_step(ids, positions, slot, valid)

    def _forward(self, ids, positions, slots) -> torch.Tensor:
        self.cache.write_slots = slots
        if self.compile_prefill:
            fn = self._prefill_fns.get(ids.shape[1])
            if fn is None:
                if not self.cache.layers[0].is_initialized:  # allocate the cache outside the traced region
                    self._model_step(ids, positions, slots, self.valid)
                fn = self._prefill_fns[ids.shape[1]] = compile_step(self._model_step)
            return fn(ids, positions, slots, self.valid)
        return self._model_step(ids, positions, slots, self.valid)

    def _decode_step(self) -> torch.Tensor:
        self.cache.write_slots = self.slot
        if self._step_fn is None:
            if not self.use_compile:
                self._step_fn = self._decode_impl
            else:
                if not self.cache.layers[0].is_initialized:
                    # the cache allocates itself at its first write: do that outside the traced region
                    # (running the step twice is harmless: same slot, same inputs, same writes)
                    self._decode_impl(self.tokens, self.positions, self.slot, self.valid)
                self._step_fn = compile_step(self._decode_impl)
        try:
            return self._step_fn(self.tokens, self.positions, self.slot, self.valid)
        except Exception as exc:
            if not (self.use_compile and self.compile_auto):
                raise
            # compile=None promised "when it works": say why, then run the same step eagerly
            import warnings

            warnings.warn(f"torch.compile of the decode step failed, running it uncompiled: "
                          f"{type(exc).__name__}: {str(exc)[:300]}", RuntimeWarning, stacklevel=2)
            self.use_compile = self.compile_prefill = False
            self._step_fn = self._decode_impl
            return self._step_fn(self.tokens, self.positions, self.slot, self.valid)

    # -- prefill ----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                graph: bool = False) -> torch.Tensor:
        """Run left-padded prompts ``[B, P]``; return the logits of their last position ``[B, V]``."""
        b, p = input_ids.shape
        if b != self.batch_size:
            raise SparseQuantError(f"engine was built for batch {self.batch_size}, got {b} prompts")
        if p >= self.max_len:
            raise SparseQuantError(f"prompt of {p} tokens leaves no room in a cache of {self.max_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise SparseQuantError("prompts must be left-padded: the last column of the attention mask must be 1")
        ids = input_ids.to(self.device)
        real = attention_mask.to(self.device).bool()
        positions = (real.long().cumsum(-1) - 1).clamp_(min=0)
        self.valid.zero_()  # stale cache slots need no clearing: the mask hides every slot not yet written
        self.valid[:, :p] = real
        self.cache.length = p
        if graph and self.use_graph:
            logits = self._prefill_graphed(ids, positions)
        else:
            logits = self._forward(ids, positions, torch.arange(p, device=self.device))
        self.positions.copy_(positions[:, -1:] + 1)
        self.slot.fill_(p)
        return logits

    def _prefill_graphed(self, ids, positions) -> torch.Tensor:
        p = ids.shape[1]
        if p not in self._prefill_graphs:
            static = (ids.clone(), positions.clone(), torch.arange(p, device=self.device))
            run = lambda: self._forward(*static)  # noqa: E731
            self._prefill_graphs[p] = (*static, *self._capture(run))
        s_ids, s_pos, _, g, out = self._prefill_graphs[p]
        s_ids.copy_(ids)
        s_pos.copy_(positions)
        g.replay()
        return out

    # -- decode -----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``[B]`` at the next slot; return the next logits ``[B, V]``.

        On CUDA the result is the graph's output buffer: read it before the next call.
        """
        if self.cache.length >= self.max_len:
            raise SparseQuantError(f"the KV cache is full ({self.max_len} slots)")
        self.tokens.copy_(tokens.view(self.batch_size, 1))
        if self.use_graph:
            if self._graph is None:
                self._graph, self._graph_logits = self._capture(self._decode_step)
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._decode_step()
        self.positions.add_(1)
        self.slot.add_(1)
        self.cache.length += 1
        return logits

    def _capture(self, fn):
        """Warm ``fn`` up on a side stream (kernel states, Triton compilation, allocator), then capture it.

        The warm-up runs write the same cache slot with the same inputs as the first replay will,
        so they change nothing that the replay does not rewrite.
        """
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        # Each graph gets its own memory pool: graphs sharing one may only be replayed in capture
        # order, and a prefill replayed after the decode graph was captured would break that.
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        return g, out

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory pools (the engine stays usable; it recaptures)."""
        self._graph = self._graph_logits = None
        self._prefill_graphs.clear()
