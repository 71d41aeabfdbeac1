"""Roofline model of weight memory, KV cache and linear-layer time on NVIDIA GPUs.

Pure functions, no torch: ``sparsequant plan`` must answer instantly and on machines without a GPU.
The model and its assumptions are written out in ``docs/roofline.md``; in short, a linear layer
``y[M, N] = x[M, K] @ W[N, K]^T`` takes

    time = max(2*M*N*K / tensor-core rate,  bytes moved / memory bandwidth)

with bytes = stored weight (values + 2:4 metadata + scales) + activations in + fp16 outputs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SparseQuantError


class RooflineError(SparseQuantError, ValueError):
    """An unknown GPU, format or model preset, or a shape the roofline cannot use."""


# -- GPUs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPU:
    """Peak numbers of one GPU. ``flops`` maps (math, sparse) to FLOP/s, where a 2:4 rate counts
    the dense-equivalent FLOPs (2*M*N*K), as NVIDIA's datasheets do."""

    name: str
    bandwidth: float  # bytes/s
    flops: dict[tuple[str, bool], float] = field(hash=False)

    def rate(self, math: str, sparse: bool) -> float:
        try:
            return self.flops[(math, sparse)]
        except KeyError:
            have = sorted({m for m, _ in self.flops})
            raise RooflineError(
                f"{self.name} has no {'2:4 sparse ' if sparse else ''}{math} tensor cores "
                f"(it has: {', '.join(have)})"
            ) from None

    def supports(self, math: str, sparse: bool = False) -> bool:
        return (math, sparse) in self.flops


T = 1e12
_HOPPER_FLOPS = {
    ("fp16", False): 989 * T, ("fp16", True): 1979 * T,
    ("fp8", False): 1979 * T, ("fp8", True): 3958 * T,
    ("int8", False): 1979 * T, ("int8", True): 3958 * T,
}
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 3.35e12, _HOPPER_FLOPS),
    # H200 is the H100 die with HBM3e: same tensor cores, more bandwidth.
    "h200": GPU("H200 SXM", 4.8e12, _HOPPER_FLOPS),
    "a100": GPU("A100 SXM 80GB", 2.039e12, {
        ("fp16", False): 312 * T, ("fp16", True): 624 * T,
        ("int8", False): 624 * T, ("int8", True): 1248 * T,
    }),
}


def get_gpu(name: str | GPU) -> GPU:
    if isinstance(name, GPU):
        return name
    key = str(name).strip().lower().replace("-", "").replace(" ", "")
    for suffix in ("sxm80gb", "sxm", "80gb"):
        if key.endswith(suffix) and key[: -len(suffix)] in GPUS:
            key = key[: -len(suffix)]
    if key not in GPUS:
        raise RooflineError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


# -- storage formats ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """How a linear's weight is stored and which tensor-core math multiplies it.

    weight_bits: bits per *kept* value. group_size: weights sharing one fp16 scale along K
    (None = one scale per output row; 0 = no scales, plain fp16). act_bytes: bytes per input
    activation (2 for A16, 1 for A8). math: the tensor-core type the product runs in.
    mixed_input: the weights are dequantized to the activation type inside the kernel (W4A16);
    on 2:4 such a kernel only gets the sparse rate with a dedicated sparse-tensor-core path.
    """

    name: str
    weight_bits: int
    sparse24: bool = False
    group_size: int | None = 0
    act_bytes: int = 2
    math: str = "fp16"
    mixed_input: bool = False
    label: str = ""

    def weight_bits_total(self, n: int, k: int) -> int:
        """Exact bits stored for an ``[n, k]`` weight (the checkpoint's layout, see checkpoint/packed.py)."""
        if self.sparse24 and k % 4:
            raise RooflineError(f"2:4 needs the input size to be a multiple of 4, got K={k}")
        kept = k // 2 if self.sparse24 else k
        bits = n * kept * self.weight_bits
        if self.sparse24:
            bits += n * kept * 2  # two index bits per kept value: K/8 bytes of metadata per row
        if self.group_size is None:
            bits += n * 16
        elif self.group_size > 0:
            bits += n * math.ceil(k / self.group_size) * 16  # groups run over original columns
        return bits

    def bits_per_weight(self, k: int | None = None) -> float:
        """Bits per original weight, overheads included. ``k=None``: the limit of a wide layer
        (full groups, per-row scales negligible)."""
        if k is not None:
            return self.weight_bits_total(1, k) / k
        density = 0.5 if self.sparse24 else 1.0
        bits = density * self.weight_bits + (1.0 if self.sparse24 else 0.0)
        if self.group_size:
            bits += 16 / self.group_size
        return bits


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp16", 16, label="dense fp16"),
    Format("w8a16", 8, group_size=None, mixed_input=True, label="dense int8 weight-only (W8A16)"),
    Format("int8", 8, group_size=None, act_bytes=1, math="int8", label="dense int8 W8A8"),
    Format("fp8", 8, group_size=None, act_bytes=1, math="fp8", label="dense fp8 W8A8"),
    Format("int4-g128", 4, group_size=128, mixed_input=True, label="dense int4 g128 (W4A16)"),
    Format("2:4-fp16", 16, sparse24=True, label="2:4 fp16"),
    Format("2:4-int4-g128", 4, sparse24=True, group_size=128, mixed_input=True, label="2:4 int4 g128 (W4A16)"),
    Format("2:4-fp8", 8, sparse24=True, group_size=None, act_bytes=1, math="fp8", label="2:4 fp8 W8A8"),
    Format("2:4-int8", 8, sparse24=True, group_size=None, act_bytes=1, math="int8", label="2:4 int8 W8A8"),
)}
DEFAULT_FORMATS = ("fp16", "int8", "int4-g128", "2:4-fp16", "2:4-int4-g128", "2:4-fp8", "2:4-int8")


def get_format(name: str | Format) -> Format:
    if isinstance(name, Format):
        return name
    if name not in FORMATS:
        raise RooflineError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


# -- model shapes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The shapes that matter for memory and speed of a Llama-style decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tied_embeddings: bool = False

    def __post_init__(self):
        for f in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise RooflineError(f"model {self.name}: {f} must be a positive integer, got {v!r}")
        if self.heads % self.kv_heads:
            raise RooflineError(f"model {self.name}: {self.heads} heads do not split into {self.kv_heads} KV heads")

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, N out, K in) of the linears of one decoder layer."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return [
            ("q_proj", q, self.hidden), ("k_proj", kv, self.hidden), ("v_proj", kv, self.hidden),
            ("o_proj", self.hidden, q),
            ("gate_proj", self.intermediate, self.hidden), ("up_proj", self.intermediate, self.hidden),
            ("down_proj", self.hidden, self.intermediate),
        ]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(n * k for _, n, k in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (when not tied) and RMSNorm weights: kept in fp16 by sparsequant."""
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return emb + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


PRESETS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    ModelShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, head_dim=64, tied_embeddings=True),
)}


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape_from_config(cfg, name: str | None = None) -> ModelShape:
    """A ModelShape from a transformers config object or its dict (``config.json``)."""
    text = _cfg_get(cfg, "text_config")  # multimodal wrappers keep the decoder's config inside
    if text is not None:
        cfg = text
    hidden = _cfg_get(cfg, "hidden_size", "n_embd", "d_model")
    heads = _cfg_get(cfg, "num_attention_heads", "n_head")
    missing = [k for k, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                              ("num_hidden_layers", _cfg_get(cfg, "num_hidden_layers", "n_layer")),
                              ("vocab_size", _cfg_get(cfg, "vocab_size"))) if v is None]
    if missing:
        raise RooflineError(f"config lacks {', '.join(missing)}: give a decoder config (config.json) or a preset "
                            f"({', '.join(PRESETS)})")
    inter = _cfg_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    return ModelShape(
        name=name or _cfg_get(cfg, "_name_or_path") or _cfg_get(cfg, "model_type") or "config",
        hidden=int(hidden), intermediate=int(inter),
        layers=int(_cfg_get(cfg, "num_hidden_layers", "n_layer")), heads=int(heads),
        kv_heads=int(_cfg_get(cfg, "num_key_value_heads", default=heads)),
        vocab=int(_cfg_get(cfg, "vocab_size")),
        head_dim=_cfg_get(cfg, "head_dim"),
        tied_embeddings=bool(_cfg_get(cfg, "tie_word_embeddings", default=False)),
    )


def load_shape(config: str | dict | ModelShape | object) -> ModelShape:
    """A preset name, a path to config.json (or a folder holding one), a dict or a config object."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str):
        key = config.strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise RooflineError(f"{config!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RooflineError(f"{path} is not valid JSON ({exc})") from None
        return shape_from_config(data, name=path.parent.name or path.stem)
    return shape_from_config(config)


# -- memory ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    format: str
    linear_params: int
    linear_bytes: float
    other_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.linear_bytes + self.other_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.linear_bytes / self.linear_params


def weight_memory(model: ModelShape | str | dict | object, fmt: str | Format) -> Memory:
    """Bytes of a model with every decoder linear in ``fmt``; embeddings, lm_head and norms in fp16."""
    shape = load_shape(model)
    f = get_format(fmt)
    bits = shape.layers * sum(f.weight_bits_total(n, k) for _, n, k in shape.linear_shapes())
    return Memory(f.name, shape.linear_params, bits / 8, 2.0 * shape.other_params)


def params_memory(n_params: int, fmt: str | Format, in_features: int | None = None,
                  other_params: int = 0) -> Memory:
    """Bytes of ``n_params`` compressible weights (plus ``other_params`` kept in fp16) when only a
    count is known. ``in_features`` sets the per-row scale overhead; None treats layers as wide."""
    if n_params <= 0 or other_params < 0:
        raise RooflineError(f"parameter counts must be positive, got {n_params} and {other_params}")
    f = get_format(fmt)
    return Memory(f.name, int(n_params), n_params * f.bits_per_weight(in_features) / 8, 2.0 * other_params)


def kv_cache_bytes_per_token(model: ModelShape | str | dict | object, bytes_per_value: float = 2) -> float:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
    s = load_shape(model)
    return 2 * s.layers * s.kv_heads * s.hd * bytes_per_value


# -- time -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerTime:
    format: str
    m: int
    n: int
    k: int
    flops: float
    bytes: float
    compute_s: float
    memory_s: float
    sparse_tensor_cores: bool  # whether the sparse rate was used

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def uses_sparse_tensor_cores(fmt: str | Format, sparse_tensor_cores: bool = False) -> bool:
    """Native 2:4 formats (fp16, fp8, int8 with same-type activations) run on sparse tensor cores;
    mixed-input 2:4 (W4A16) does only if a kernel feeds the sparse MMA, which ``sparse_tensor_cores``
    asserts. Default False: no such kernel on Hopper today (ANCHORS: 1.0x at batch 2048)."""
    f = get_format(fmt)
    return f.sparse24 and (not f.mixed_input or sparse_tensor_cores)


def layer_time(n: int, k: int, m: int, fmt: str | Format, gpu: str | GPU = "h100",
               sparse_tensor_cores: bool = False) -> LayerTime:
    """Roofline time of ``y[m, n] = x[m, k] @ W[n, k]^T`` with W stored in ``fmt``."""
    for label, v in (("N", n), ("K", k), ("M", m)):
        if not isinstance(v, int) or v <= 0:
            raise RooflineError(f"{label} must be a positive integer, got {v!r}")
    f, g = get_format(fmt), get_gpu(gpu)
    sparse = uses_sparse_tensor_cores(f, sparse_tensor_cores)
    flops = 2.0 * m * n * k
    moved = f.weight_bits_total(n, k) / 8 + m * k * f.act_bytes + m * n * 2
    return LayerTime(f.name, m, n, k, flops, moved, flops / g.rate(f.math, sparse), moved / g.bandwidth, sparse)


def speedup(n: int, k: int, m: int, fmt: str | Format, gpu: str | GPU = "h100",
            sparse_tensor_cores: bool = False, baseline: str | Format = "fp16") -> float:
    """Predicted time of the baseline format over the time of ``fmt``, same GPU and shape."""
    base = layer_time(n, k, m, baseline, gpu, sparse_tensor_cores).time_s
    return base / layer_time(n, k, m, fmt, gpu, sparse_tensor_cores).time_s


def model_speedup(model, m: int, fmt: str | Format, gpu: str | GPU = "h100",
                  sparse_tensor_cores: bool = False, baseline: str | Format = "fp16") -> float:
    """Speedup of all decoder linears of one layer together (time-weighted, so big layers count more)."""
    shape = load_shape(model)
    t = lambda f: sum(layer_time(n, k, m, f, gpu, sparse_tensor_cores).time_s  # noqa: E731
                      for _, n, k in shape.linear_shapes())
    return t(baseline) / t(fmt)


def unique_linear_shapes(model) -> list[tuple[str, int, int]]:
    """Distinct (N, K) of one decoder layer with the names that share each shape."""
    seen: dict[tuple[int, int], list[str]] = {}
    for name, n, k in load_shape(model).linear_shapes():
        seen.setdefault((n, k), []).append(name.replace("_proj", ""))
    return [("/".join(names), n, k) for (n, k), names in seen.items()]


def parse_count(text: str | int | float) -> int:
    """'7e9', '6.7B', '135M', '1.2T' -> an integer count."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip().upper().replace(",", "").replace("_", "")
        suffixes = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
        mult = 1.0
        if t and t[-1] in suffixes:
            t, mult = t[:-1], suffixes[t[-1]]
        try:
            value = float(t) * mult
        except ValueError:
            raise RooflineError(f"cannot read a parameter count from {text!r}: use e.g. 7e9, 6.7B or 135M") from None
    if not math.isfinite(value) or value < 1:
        raise RooflineError(f"a parameter count must be at least 1, got {text!r}")
    return int(round(value))


def parse_batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise RooflineError(f"batch sizes are comma-separated integers, got {text!r}") from None
    if not out or any(b <= 0 for b in out):
        raise RooflineError(f"batch sizes must be positive integers, got {text!r}")
    return out
