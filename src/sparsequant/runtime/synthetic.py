"""Synthetic models: real LLaMA shapes, random weights, compressed without calibration.

A kernel's speed does not depend on the weights' values, so speed is measured on models built
from a config with random weights (straight on the target device, in float16) and compressed
directly: magnitude 2:4 + round-to-nearest, no calibration data. ``--layers N`` keeps the first N
decoder layers (same widths) so a measurement fits a time budget.

Schemes (``SCHEMES``): ``2:4-w4a16`` (int4, groups of 128), ``2:4-w8a16`` (int8 per output
channel), ``2:4-fp8`` / ``2:4-int8`` (the int8 per-channel weight run as W8A8 through cuSPARSELt,
with per-token activation quantization; mostly a prefill format).

``pack_linear_weight`` is the single place where a weight becomes a PackedWeight: the GPU pack
kernel (``kernels.gpu_pack.pack_nm24_rtn``) when it is available and the weight is on a GPU, else
the CPU compression path (``compress_weight`` + ``PackedWeight.from_compressed``), which is plain
PyTorch and runs on whatever device the weight is on. Both give the same bits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint.packed import PackedWeight
from ..errors import SparseQuantError
from ..models.families import decoder_layers, layer_linears, layers_prefix
from ..nn.convert import place_on_device
from ..nn.embedding import Int8Embedding, embedding_device_dtype, quantize_input_embedding
from ..nn.int8_linear import Int8Linear, quantize_lm_head
from ..nn.linear import SparseQuantLinear

CONFIGS = {
    # hidden, intermediate, layers, heads, kv heads, vocab, rope theta, context
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                       rms_norm_eps=1e-5),
    # For tests: every dimension a multiple of 128 so group-128 kernels apply.
    "tiny-llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
}


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int | None
    act_quant: str | None = None


SCHEMES = {
    "2:4-w4a16": Scheme(4, 128),
    "2:4-w8a16": Scheme(8, None),
    "2:4-fp8": Scheme(8, None, "fp8"),
    "2:4-int8": Scheme(8, None, "int8"),
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise SparseQuantError(f"unknown synthetic scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def synthetic_config(name: str, layers: int | None = None):
    """A transformers LlamaConfig of a named shape, optionally cut to ``layers`` decoder layers."""
    from transformers import LlamaConfig

    if name not in CONFIGS:
        raise SparseQuantError(f"unknown synthetic config {name!r}; choose one of {', '.join(CONFIGS)}")
    kw = dict(CONFIGS[name])
    if layers is not None:
        if not 1 <= int(layers) <= kw["num_hidden_layers"]:
            raise SparseQuantError(f"--layers must be between 1 and {kw['num_hidden_layers']} for {name}, got {layers}")
        kw["num_hidden_layers"] = int(layers)
    cfg = LlamaConfig(**kw, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.name_or_path = f"synthetic/{name}"
    return cfg


@torch.no_grad()
def build_dense(config, device="cuda", dtype=torch.float16, seed: int = 0):
    """A model of ``config`` with random weights allocated and drawn directly on ``device``.

    Matrices ~ N(0, initializer_range), norms 1, biases 0: activations stay well inside float16's
    range through all layers, which is all a speed measurement needs.
    """
    from transformers import AutoModelForCausalLM

    from ..checkpoint.io import _empty_model

    device = torch.device(device)
    model = _empty_model(AutoModelForCausalLM, config, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=dtype, device=device)
                if p.dim() == 1:
                    t.fill_(0.0 if key == "bias" else 1.0)
                else:
                    t.normal_(0.0, std, generator=gen)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[key] = made[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device)
    return model.eval()


def decoder_linears(model) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by full module path (what compression replaces)."""
    prefix = layers_prefix(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in layer_linears(layer).items():
            out[f"{prefix}.{i}.{name}"] = lin
    return out


def pack_linear_weight(weight: torch.Tensor, bits: int, group_size: int | None) -> PackedWeight:
    """Magnitude 2:4 + symmetric RTN of ``weight [N, K]``, packed; tensors on ``weight``'s device."""
    if weight.is_cuda:
        try:
            from ..kernels.gpu_pack import pack_nm24_rtn
        except ImportError:
            pack_nm24_rtn = None
        if pack_nm24_rtn is not None:
            return pack_nm24_rtn(weight, bits=bits, group_size=group_size)
    from ..patterns import SparsitySpec
    from ..quant import QuantSpec
    from ..solvers import LinearPlan, compress_weight

    plan = LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4"), quant=QuantSpec(bits, group_size, True))
    return PackedWeight.from_compressed(compress_weight(weight.float(), None, plan))


@torch.no_grad()
def compress_model_nm24(model, bits: int = 4, group_size: int | None = 128):
    """Compress every decoder linear of ``model`` in place (magnitude 2:4 + RTN, no calibration).

    The model keeps nn.Linear modules holding the dequantized weights (like the calibration engine
    leaves them), so the result can be evaluated and saved as a checkpoint with ``sparsequant.save``.
    """
    from ..pipeline.sequential import CompressionResult, round_uncompressed_to_storage, storage_dtype_for
    from ..recipe import QuantConfig, Recipe

    t0 = time.perf_counter()
    packed = {}
    for name, lin in decoder_linears(model).items():
        pw = pack_linear_weight(lin.weight, bits, group_size)
        lin.weight.copy_(pw.to_compressed().weight.to(lin.weight.device, lin.weight.dtype))
        packed[name] = PackedWeight(pw.shape, pw.storage, pw.sparsity, pw.quant,
                                    {k: v.cpu() for k, v in pw.tensors.items()})
    storage = storage_dtype_for(model)
    round_uncompressed_to_storage(model, set(packed), storage)  # so the checkpoint reproduces this model exactly
    recipe = Recipe(name="synthetic", method="magnitude", pattern="2:4",
                    quant=QuantConfig(bits=bits, group_size=group_size, symmetric=True))
    return CompressionResult(model=model, recipe=recipe, packed=packed, linears=[], layers=[],
                             storage_dtype=storage, seconds=time.perf_counter() - t0)


def _skeleton_like(model, dtype):
    """``model``'s architecture with parameters on the meta device, its projections fused where
    ``model``'s are (so module paths match)."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint.io import _empty_model
    from ..models.fused import FusedAttention, fuse_projections, is_fused

    twin = _empty_model(AutoModelForCausalLM, model.config, dtype)
    if is_fused(model):
        rows = any(m.gqa_rows for m in model.modules() if isinstance(m, FusedAttention))
        dk = all(m.decode_kernel for m in model.modules() if isinstance(m, FusedAttention))
        fuse_projections(twin, gqa_rows=rows, decode_attention=dk)
    return twin


@torch.no_grad()
def sparse_twin(dense, scheme: str | Scheme = "2:4-w4a16", embed_int8: bool = False, head_int8: bool = False):
    """A model that shares ``dense``'s embeddings, norms and LM head and holds its decoder linears
    compressed to ``scheme`` as SparseQuantLinear modules, kernels prepared on dense's device.

    The dense model is left untouched, so both can be measured in the same process; the twin adds
    only the packed weights to the device's memory. ``embed_int8`` gives the twin its own int8 copy
    of the input embedding (``nn/embedding.py``) instead of sharing dense's table, so
    ``weight_bytes_on(twin)`` counts codes + scales; ``head_int8`` does the same for the LM head
    (``nn/int8_linear.py``). A ``dense`` with fused projections
    (``models/fused.py``) gives a fused twin: each fused weight is packed as one (magnitude 2:4 and
    RTN work row by row, so that equals stacking the parts' packs). Returns ``(twin, seconds spent packing)``.
    """
    s = get_scheme(scheme) if isinstance(scheme, str) else scheme
    emb = dense.get_input_embeddings().weight
    device, dtype = emb.device, emb.dtype
    twin = _skeleton_like(dense, dtype)
    linears = decoder_linears(dense)
    modules = dict(twin.named_modules())
    t0 = time.perf_counter()
    for name, lin in linears.items():
        pw = pack_linear_weight(lin.weight, s.bits, s.group_size)
        bias = None if lin.bias is None else lin.bias.detach()
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, SparseQuantLinear(pw, bias=bias, compute_dtype=dtype, act_quant=s.act_quant))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    skip = {f"{n}.weight" for n in linears} | {f"{n}.bias" for n in linears}
    state = {k: v for k, v in dense.state_dict().items() if k not in skip}
    twin.load_state_dict(state, strict=False, assign=True)
    if getattr(dense.config, "tie_word_embeddings", False):
        twin.tie_weights()
    if head_int8:
        quantize_lm_head(twin, dtype)
    if embed_int8:
        quantize_input_embedding(twin, dtype)  # refuses tied embeddings
    missing = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if missing:
        raise SparseQuantError(f"sparse twin left tensors without values: {missing[:5]}")
    place_on_device(twin, device, dtype)
    return twin.eval(), seconds


def weight_bytes_on(model, device) -> int:
    """Bytes of the model's weights held on ``device``: parameters, buffers (an Int8Embedding's int8
    codes and scales among them) and kernel states."""
    device = torch.device(device)
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type == device.type and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for m in model.modules():
        state = getattr(m, "_kernel_state", None)
        if state is not None:
            for v in _state_tensors(state):
                add(v)
    return total


def _state_tensors(obj, depth: int = 0):
    """Tensors reachable from a kernel state object (its layout, cuSPARSELt weight, scales)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 3 or obj is None or isinstance(obj, (int, float, str, bool, torch.dtype, torch.device)):
        return
    items = obj.values() if isinstance(obj, dict) else (obj if isinstance(obj, (list, tuple)) else
                                                        getattr(obj, "__dict__", {}).values())
    for v in items:
        yield from _state_tensors(v, depth + 1)


@torch.no_grad()
def dense_twin(model):
    """The uncompressed counterpart of a model with SparseQuantLinear modules: same embeddings,
    norms and head (shared), each compressed linear replaced by an nn.Linear holding its dequantized
    weight in the model's dtype on its device. The dense baseline of ``sparsequant bench <checkpoint>``.
    An Int8Embedding becomes an nn.Embedding holding its dequantized table (the same values), an int8
    LM head (Int8Linear) an nn.Linear holding its dequantized weight."""
    device, dtype = embedding_device_dtype(model)
    twin = _skeleton_like(model, dtype)
    sq = {n: m for n, m in model.named_modules() if isinstance(m, SparseQuantLinear)}
    modules = dict(twin.named_modules())
    for name, m in sq.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=device, dtype=dtype)
        lin.weight.requires_grad_(False).copy_(m.packed.to_compressed().effective_weight().to(device, dtype))
        if m.bias is not None:
            lin.bias.requires_grad_(False).copy_(m.bias)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, lin)
    skip = {k for n in sq for k in model.state_dict() if k.startswith(n + ".")}
    q = model.get_input_embeddings()
    if isinstance(q, Int8Embedding):
        emb = nn.Embedding(q.num_embeddings, q.embedding_dim, q.padding_idx, device=device, dtype=dtype)
        emb.weight.requires_grad_(False).copy_(q.dequantize())
        twin.set_input_embeddings(emb)
        skip |= {k for k in model.state_dict() if k.endswith((".codes", ".scales"))}
    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        lin = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device=device, dtype=dtype)
        lin.weight.requires_grad_(False).copy_(head.dequantize().to(device, dtype))
        twin.set_output_embeddings(lin)
        skip |= {k for k in model.state_dict() if k.endswith((".codes", ".scales"))}
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k not in skip}, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        twin.tie_weights()
    for module in twin.modules():  # non-persistent buffers (rotary frequencies) of the skeleton
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)
    return twin.eval()
