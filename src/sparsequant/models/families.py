"""Everything sparsequant needs to know about a model family, in one place.

A family says where the decoder layers are, and which normalization feeds which linears (for
equalization that folds scales into the norm). Linears inside a layer are found generically.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class NormGroup:
    """A normalization whose output feeds exactly these linears (paths relative to the layer)."""

    norm: str
    linears: tuple[str, ...]
    kind: str  # "rms" | "layernorm" | "rms_plus_one" (Gemma: the scale is 1 + weight)


@dataclass(frozen=True)
class Family:
    name: str
    layers_path: tuple[str, ...]  # candidate attribute paths from the CausalLM to the layer list
    norm_groups: tuple[NormGroup, ...] = field(default_factory=tuple)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LIKE = (
    NormGroup("input_layernorm", _QKV, "rms"),
    NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "rms"),
)
_GEMMA = (
    NormGroup("input_layernorm", _QKV, "rms_plus_one"),
    NormGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "rms_plus_one"),
)

FAMILIES: dict[str, Family] = {
    "llama": Family("LLaMA", ("model.layers",), _LLAMA_LIKE),
    "mistral": Family("Mistral", ("model.layers",), _LLAMA_LIKE),
    "qwen2": Family("Qwen2", ("model.layers",), _LLAMA_LIKE),
    "qwen3": Family("Qwen3", ("model.layers",), _LLAMA_LIKE),
    "gemma2": Family("Gemma 2", ("model.layers",), _GEMMA),
    "gemma3_text": Family("Gemma 3", ("model.layers", "model.language_model.layers"), _GEMMA),
    "gemma3": Family("Gemma 3", ("model.language_model.layers", "model.layers"), _GEMMA),
    "opt": Family(
        "OPT",
        ("model.decoder.layers",),
        (
            NormGroup("self_attn_layer_norm", _QKV, "layernorm"),
            NormGroup("final_layer_norm", ("fc1",), "layernorm"),
        ),
    ),
    "phi": Family("Phi", ("model.layers",), (NormGroup("input_layernorm", _QKV + ("mlp.fc1",), "layernorm"),)),
    "phi3": Family(
        "Phi-3",
        ("model.layers",),
        (
            NormGroup("input_layernorm", ("self_attn.qkv_proj",), "rms"),
            NormGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "rms"),
        ),
    ),
}


def supported_families() -> str:
    return ", ".join(f"{f.name} ({k})" for k, f in FAMILIES.items())


def family_of(config_or_model) -> Family:
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; sparsequant knows: {supported_families()}"
        )
    return FAMILIES[model_type]


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    fam = family_of(model)
    for path in fam.layers_path:
        try:
            layers = _get_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise UnsupportedModelError(
        f"could not find the decoder layers of this {fam.name} model at {', '.join(fam.layers_path)}"
    )


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, by path relative to the layer, in definition order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def layers_prefix(model: nn.Module) -> str:
    """The module path of the layer list (e.g. ``model.layers``), for naming linears globally."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise UnsupportedModelError("decoder layer list is not a submodule of the model")


def submodule(root: nn.Module, path: str) -> nn.Module:
    return _get_path(root, path)
