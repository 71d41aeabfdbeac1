"""Export a sparsequant checkpoint as a compressed-tensors checkpoint (what vLLM and transformers load).

compressed-tensors (0.15 and later) has no 2:4 storage any more, so sparsity is stored dense: every
weight's full code matrix, pruned positions holding the code of zero, and an empty
``sparsity_config``. The weights it dequantizes to are exactly ours (our scales are float16
values; they stay exact when the model's dtype is float16). Two formats:

- ``pack-quantized`` (W{bits}A16, any 2-8 bit weights, per channel or per group): ``weight_packed``
  int32 ``[N, ceil(K*bits/32)]`` - the signed values ``q = code - 2**(bits-1)`` are stored offset by
  ``2**(bits-1)`` (that is, our unsigned codes), element i of a row at bits ``i*bits`` of the row's
  little-endian bit stream; ``weight_scale [N, groups]`` in the model dtype; ``weight_shape``
  int64 ``[2]``; asymmetric adds ``weight_zero_point`` (signed ``zero - 2**(bits-1)``, packed the
  same way down the columns: int32 ``[ceil(N*bits/32), groups]``).
- ``int-quantized`` (W8A8: int8 per-channel symmetric weights, dynamic per-token int8
  activations): ``weight`` int8 ``[N, K]`` and ``weight_scale [N, 1]``.

A weight is ``(q - zero_point) * scale`` in both, as in ours. Linears we did not quantize (and the
LM head) are stored as plain float weights and listed in ``ignore``. Recovery terms that
compressed-tensors cannot express (low-rank adapters, structured outliers, hybrid tiles) and
ragged last groups (compressed-tensors needs whole groups) are refused with a CheckpointError.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..patterns.bits import pack_bits
from .atomic import atomic_folder
from .io import _DTYPES, TENSOR_FILE, _read_tensors, read_meta
from .packed import PackedWeight

FORMATS = ("pack-quantized", "int-quantized")
#: compressed-tensors release whose format this writer follows (recorded in the config).
TARGET_VERSION = "0.20.0"
_PACKED = ".packed."


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``codes [R, C]`` (< 2**bits) as int32 ``[R, ceil(C*bits/32)]``, each row its own
    LSB-first bit stream (element i at bit ``i*bits``), the layout of compressed-tensors' pack_to_int32."""
    if sys.byteorder != "little":
        raise CheckpointError("compressed-tensors export packs int32 words little-endian; this host is big-endian")
    r, c = codes.shape
    pad = (-c) % 32  # 32 elements always fill whole int32 words
    if pad:
        codes = torch.cat([codes, codes.new_zeros(r, pad)], dim=1)
    words = pack_bits(codes.reshape(-1), bits).reshape(r, -1).view(torch.int32)
    return words[:, : -(-c * bits // 32)].contiguous()


def _check_exportable(name: str, pw: PackedWeight) -> None:
    if pw.adapter is not None:
        raise CheckpointError(f"{name} has a low-rank adapter, which compressed-tensors cannot store; "
                              "export a checkpoint compressed without adapters")
    extra = [t for t in pw.tensors if t.startswith(("outlier", "tile", "hybrid"))]
    if extra or getattr(pw.sparsity, "outliers", None):
        raise CheckpointError(f"{name} stores {extra or 'structured outliers'}, which compressed-tensors cannot express")
    if pw.storage not in ("dense", "nm24", "bitmap"):
        raise CheckpointError(f"{name}: storage {pw.storage!r} has no compressed-tensors equivalent")


def _scheme(q, k: int, fmt: str) -> dict:
    if q.group_size is not None and k % q.group_size:
        raise CheckpointError(f"input width {k} is not a multiple of the group size {q.group_size}: compressed-tensors "
                              "needs whole groups (recompress with a group size that divides it, e.g. 64 for 576)")
    weights = {"num_bits": q.bits, "type": "int", "symmetric": q.symmetric, "dynamic": False,
               "group_size": q.group_size, "strategy": "channel" if q.group_size is None else "group"}
    acts = None
    if fmt == "int-quantized":
        if not (q.bits == 8 and q.symmetric and q.group_size is None):
            raise CheckpointError(f"int-quantized (W8A8) export needs 8-bit symmetric per-channel weights, got {q}; "
                                  "use --format pack-quantized for weight-only export")
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "group_size": None,
                "strategy": "token"}
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": fmt}


def _linear_names(config) -> list[str]:
    """Every nn.Linear of the architecture (built on the meta device, no memory)."""
    from transformers import AutoModelForCausalLM

    from .io import _empty_model

    model = _empty_model(AutoModelForCausalLM, config, torch.float16)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def export_compressed_tensors(checkpoint, out, fmt: str = "pack-quantized", overwrite: bool = False) -> dict:
    """Write ``checkpoint`` as a compressed-tensors folder at ``out`` (atomic); return a summary."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if fmt not in FORMATS:
        raise CheckpointError(f"unknown compressed-tensors format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = Path(checkpoint)
    meta = read_meta(src)
    tensors = _read_tensors(src, meta.get("sha256"), verify=True)
    dtype = _DTYPES[meta.get("storage_dtype", "float16")]
    out_t: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    for name, desc in meta["layers"].items():
        prefix = f"{name}{_PACKED}"
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        pw = PackedWeight.from_description(desc, own)
        _check_exportable(name, pw)
        cw = pw.to_compressed()
        bias = tensors.pop(f"{name}.bias", None)
        if bias is not None:
            out_t[f"{name}.bias"] = bias
        q = pw.quant
        if q is None:
            out_t[f"{name}.weight"] = cw.weight.to(dtype)
            continue
        n, k = pw.shape
        scheme = _scheme(q, k, fmt)
        groups.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
        codes = cw.codes.to(torch.int32)  # pruned positions hold the zero point: they dequantize to 0
        scale = cw.qparams.scale.to(dtype)
        if fmt == "int-quantized":
            out_t[f"{name}.weight"] = (codes - q.sym_zero).to(torch.int8)
            out_t[f"{name}.weight_scale"] = scale.reshape(n, 1)
            continue
        out_t[f"{name}.weight_packed"] = pack_int32_rows(codes, q.bits)
        out_t[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        out_t[f"{name}.weight_scale"] = scale
        if not q.symmetric:
            zp = cw.qparams.zero.to(torch.int32)  # unsigned zero = signed zero point + 2**(bits-1)
            out_t[f"{name}.weight_zero_point"] = pack_int32_rows(zp.t().contiguous(), q.bits).t().contiguous()
    out_t.update(tensors)  # embeddings, norms, LM head, biases of uncompressed modules

    config = AutoConfig.from_pretrained(src)
    quantized = {n for names in groups.values() for n in names}
    if len(groups) == 1:
        config_groups = {"group_0": {"targets": ["Linear"], **json.loads(next(iter(groups)))}}
    else:  # several schemes: each group names its modules exactly
        config_groups = {f"group_{i}": {"targets": [f"re:^{n.replace('.', '[.]')}$" for n in names], **json.loads(s)}
                         for i, (s, names) in enumerate(groups.items())}
    ignore = [n for n in _linear_names(config) if n not in quantized]
    qcfg = {
        "quant_method": "compressed-tensors",
        "version": TARGET_VERSION,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},  # 2:4 is stored dense: compressed-tensors no longer has a sparse format
        "transform_config": {},
    }
    cfg = config.to_dict()
    cfg["quantization_config"] = qcfg
    cfg["dtype"] = str(dtype).replace("torch.", "")
    with atomic_folder(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in out_t.items()}, str(tmp / TENSOR_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        for f in src.iterdir():  # tokenizer and generation files travel along
            if f.is_file() and f.name not in ("config.json", TENSOR_FILE, "sparsequant.json", "run.json", "eval.json"):
                shutil.copy2(f, tmp / f.name)
    return {"format": fmt, "quantized_linears": len(quantized), "ignored_linears": len(ignore),
            "bytes": sum(t.numel() * t.element_size() for t in out_t.values())}
