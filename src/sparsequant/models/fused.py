"""Fused projections: q/k/v as one linear and gate/up as one, with the forwards that use them.

A decode step at batch 1 is a sequence of small products; each launch and each short grid costs
time the weights do not. ``fuse_projections(model)`` stacks, in every decoder layer, the query/key/
value projections into ``self_attn.qkv_proj`` and the MLP's gate and up projections into
``mlp.gate_up_proj`` (``nn/fuse.py``: exact for nn.Linear and for the row-indexed packed formats),
once, at load time. It is a runtime transform only: checkpoints keep the separate linears.

The attention and MLP modules keep their identity, attributes and submodules (norms, o_proj,
down_proj); only their class is switched to a subclass of the original whose ``forward`` takes the
fused output apart with ``split`` (views, no copies) and then does exactly what the family's own
forward does (``FusedAttention.forward`` / ``FusedMLP.forward`` below: the LLaMA form, plus the
per-head q/k norms of Qwen3 and Gemma 3, the sliding window and soft-capping arguments the family
passes to its attention function). Plain methods on a class, so they run eagerly, under
``torch.compile(fullgraph=True)`` and inside CUDA graphs alike. With SDPA attention the fused
forward calls transformers' own SDPA function (it repeats the KV heads of a grouped-query model);
``gqa_rows=True`` calls ``models/attention.sdpa_attention`` instead, which serves grouped-query heads
at one query token as rows of their KV head without copying the cache. That path is off by default:
on an H100 (LLaMA-3-8B shape, 8 layers, batch 1, 2048-token context, compiled) it decoded 0.94x as
fast as transformers' SDPA (BENCHMARKS.md, "GQA attention"), most likely because one thread block
per KV head leaves most of the GPU idle (not profiled); a split-KV decode kernel is what would make it pay.

Families: LLaMA, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3. Phi-3 checkpoints already hold
``qkv_proj`` / ``gate_up_proj``. OPT and Phi (fc1/fc2 MLPs, attention forwards of their own) are
left as they are. A group whose linears cannot be stacked exactly (different formats, adapters,
hybrid tiles, no kernel for the fused shape) stays unfused; ``FusionReport`` says which and why.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..nn.fuse import FusionRefused, fuse_linears
from .attention import decode_attention, sdpa_attention
from .families import decoder_layers

#: model types whose attention and MLP forwards have the LLaMA form (see the module docstring).
FUSABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _attention_interface(config, default, gqa_rows: bool):
    impl = config._attn_implementation
    if impl == "sdpa" and gqa_rows:
        return sdpa_attention
    if impl in (None, "eager"):
        return default
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    return get(impl, default) if get is not None else ALL_ATTENTION_FUNCTIONS[impl]


class FusedAttention:
    """Mixin placed before a family's attention class: the forward over ``qkv_proj``."""

    fused_split: tuple[int, int, int]  # output widths of q, k, v inside qkv_proj
    fused_extras: dict  # what the family's forward passes its attention function besides the tensors
    gqa_rows: bool = False  # True: SDPA through models/attention.sdpa_attention (no repeat_kv at one token)
    decode_kernel: bool = True  # one query token on CUDA: kernels/triton_attention.py instead of SDPA
    _rotary = None  # the family's apply_rotary_pos_emb
    _eager = None  # the family's eager_attention_forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is None:  # the name before transformers 4.56
            past_key_values = kwargs.pop("past_key_value", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv_proj(hidden_states).split(self.fused_split, dim=-1)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if getattr(self, "q_norm", None) is not None:  # Qwen3, Gemma 3: RMSNorm over each head's vector
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = type(self)._rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend = _attention_interface(self.config, type(self)._eager, self.gqa_rows)
        if self.decode_kernel and q.is_cuda and self.config._attn_implementation == "sdpa":
            # one query token: the split-KV Triton kernel; anything it does not take goes to `attend`
            attend = functools.partial(decode_attention, fallback=attend)
        out, weights = attend(self, q, k, v, attention_mask,
                              dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                              **self.fused_extras, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class FusedMLP:
    """Mixin placed before a family's MLP class: ``down(act(gate) * up)`` over ``gate_up_proj``."""

    fused_split: tuple[int, int]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.fused_split, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(mixin: type, cls: type) -> type:
    """``class Fused<cls>(mixin, cls)``, made once per original class."""
    key = (mixin, cls)
    if key not in _CLASSES:
        attrs = {"__module__": __name__}
        if mixin is FusedAttention:
            family = sys.modules[cls.__module__]
            attrs["_rotary"] = staticmethod(family.apply_rotary_pos_emb)
            attrs["_eager"] = staticmethod(family.eager_attention_forward)
        _CLASSES[key] = type(f"Fused{cls.__name__}", (mixin, cls), attrs)
    return _CLASSES[key]


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, (FusedAttention, FusedMLP)) for m in model.modules())


def _attention_extras(attn) -> dict:
    model_type = attn.config.model_type
    if model_type == "mistral":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    extras = {}
    if hasattr(attn, "sliding_window"):
        extras["sliding_window"] = attn.sliding_window
    if model_type == "gemma2":
        extras["softcap"] = attn.attn_logit_softcapping
    return extras


@dataclass
class FusionReport:
    fused: list[str] = field(default_factory=list)  # module paths of the fused linears
    unfused: dict[str, str] = field(default_factory=dict)  # group -> why it was left as it was

    def __bool__(self) -> bool:
        return bool(self.fused)


def _fuse_group(module, names, new_name, mixin, device, dtype, extras=None):
    parts = [getattr(module, n) for n in names]
    fused = fuse_linears(parts, device=device, dtype=dtype)  # FusionRefused leaves the module untouched
    for n in names:
        delattr(module, n)
    setattr(module, new_name, fused)
    module.fused_split = tuple(p.out_features for p in parts)
    if extras is not None:
        module.fused_extras = extras
    module.__class__ = _fused_class(mixin, type(module))


def fuse_projections(model: nn.Module, device=None, dtype: torch.dtype | None = None,
                     gqa_rows: bool = False, decode_attention: bool = True) -> FusionReport:
    """Fuse q/k/v and gate/up in every decoder layer of ``model`` in place (idempotent).

    ``device``/``dtype``: where the model will be placed, so fused compressed linears build their
    kernel state once (``nn/fuse.py``); a model already placed needs neither. ``gqa_rows=True``
    runs grouped-query attention through ``models/attention.sdpa_attention`` (no ``repeat_kv``;
    slower on an H100 so far, see the module docstring) instead of transformers' SDPA.
    ``decode_attention``: one query token on CUDA runs the split-KV Triton kernel
    (``kernels/triton_attention.py``) instead of SDPA; False keeps SDPA for every step.
    """
    report = FusionReport()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FUSABLE:
        report.unfused["*"] = (f"{model_type} models keep their projections "
                               f"(fused forwards exist for {', '.join(FUSABLE)})")
        return report
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        groups = []
        if attn is not None and not isinstance(attn, FusedAttention):
            groups.append(("self_attn", attn, QKV, "qkv_proj", FusedAttention))
        if mlp is not None and not isinstance(mlp, FusedMLP):
            groups.append(("mlp", mlp, GATE_UP, "gate_up_proj", FusedMLP))
        for where, module, names, new_name, mixin in groups:
            path = f"{prefix}.{i}.{where}"
            if not all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                report.unfused[path] = f"has no {'/'.join(names)}"
                continue
            extras = _attention_extras(module) if mixin is FusedAttention else None
            try:
                _fuse_group(module, names, new_name, mixin, device, dtype, extras)
            except FusionRefused as exc:
                report.unfused[path] = str(exc)
                continue
            if mixin is FusedAttention:
                module.gqa_rows = bool(gqa_rows)
                module.decode_kernel = bool(decode_attention)
            report.fused.append(f"{path}.{new_name}")
    if report.unfused:
        import warnings

        path, why = next(iter(report.unfused.items()))
        warnings.warn(f"{len(report.unfused)} projection groups left unfused (e.g. {path}: {why})", stacklevel=2)
    return report
