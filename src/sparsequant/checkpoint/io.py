"""Save and load packed checkpoints.

A checkpoint is a folder:
- ``sparsequant.json``: format name and version, the recipe, the storage description of every
  compressed linear, dtypes, the size report, and the SHA-256 of the tensor file;
- ``model.safetensors``: packed tensors as ``<linear>.packed.<tensor>`` plus every other tensor
  of the model under its usual name, in the storage dtype (tied weights stored once);
- ``config.json`` and the tokenizer files, so the architecture can be rebuilt offline.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.loading import CHECKPOINT_CONFIG
from .atomic import atomic_folder
from .packed import PackedWeight
from .size import SizeReport, size_report

FORMAT_NAME = "sparsequant"
FORMAT_VERSION = 1
TENSOR_FILE = "model.safetensors"
_PACKED = ".packed."

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def uncompressed_tensors(model: nn.Module, packed: dict[str, PackedWeight], storage_dtype) -> dict[str, torch.Tensor]:
    """Every model tensor the checkpoint stores as-is (floating ones in the storage dtype), shared ones once."""
    skip = {f"{n}.weight" for n in packed}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if name in skip:
            continue
        key = t.data_ptr()
        if key in seen and t.numel():
            continue  # tied weights (lm_head = embeddings): stored once
        seen.add(key)
        out[name] = (t.to(storage_dtype) if t.is_floating_point() else t).contiguous().cpu()
    return out


def save_checkpoint(result, out, tokenizer=None, extra: dict | None = None, overwrite: bool = False) -> SizeReport:
    """Write a CompressionResult to folder ``out`` atomically; return its size report."""
    from safetensors.torch import save_file

    model = result.model
    tensors = uncompressed_tensors(model, result.packed, result.storage_dtype)
    size = size_report(result.packed, tensors)
    for name, pw in result.packed.items():
        for tname, t in pw.tensors.items():
            tensors[f"{name}{_PACKED}{tname}"] = t.contiguous().cpu()
    compute_dtype = next(model.parameters()).dtype
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "recipe": result.recipe.to_dict(),
        "storage_dtype": _dtype_name(result.storage_dtype),
        "compute_dtype": _dtype_name(compute_dtype),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "layers": {name: pw.describe() for name, pw in result.packed.items()},
        "size": size.to_dict(),
    }
    if extra:
        meta.update(extra)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT_NAME})
        meta["sha256"] = _sha256(tmp / TENSOR_FILE)
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(meta, indent=2))
    return size


def read_meta(path) -> dict:
    path = Path(path)
    cfg = path / CHECKPOINT_CONFIG
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a sparsequant checkpoint (no {CHECKPOINT_CONFIG})")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{cfg} is not a sparsequant checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {meta.get('format_version')} is not supported by this sparsequant "
            f"(reads version {FORMAT_VERSION}); re-create it with the matching sparsequant release"
        )
    return meta


def _read_tensors(path: Path, expected_sha: str | None, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / TENSOR_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if verify and expected_sha and _sha256(file) != expected_sha:
        raise CheckpointError(f"{file} does not match its recorded SHA-256: the file is corrupt or truncated")
    try:
        return load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); the file is corrupt or truncated") from None


def load_checkpoint(path, device="cpu", verify: bool = True, dtype: torch.dtype | None = None,
                    embed_int8: bool = False, transform=None, head_int8: bool = False):
    """Rebuild ``(model, tokenizer, meta)`` from a checkpoint folder.

    Compressed linears become SparseQuantLinear modules holding the packed tensors; everything
    else is loaded into a model skeleton built from the stored config without allocating its
    weights (parameters start on the meta device), so no dense copy of a compressed weight is ever
    made. ``dtype`` is the compute dtype: by default the one recorded at compression time on the
    CPU, and the storage dtype (float16/bfloat16, what the kernels take) on a GPU. On a GPU each
    compressed linear gets its kernel state built once, and only the kernel's copy of its packed
    bits lives there (``nn.convert.place_on_device``). ``embed_int8`` stores the input embedding as
    int8 rows + one scale per row (``nn/embedding.py``), quantized here from the stored table; a
    checkpoint with tied embeddings is refused. ``head_int8`` stores the LM head the same way
    (``nn/int8_linear.py``; a tied head gets its own int8 copy of the table). ``transform(model, device, dtype)`` runs on the
    loaded model just before it moves to ``device`` (``api.load`` fuses projections there).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..models.families import family_of
    from ..nn.convert import place_on_device, replace_linears

    path = Path(path)
    device = torch.device(device)
    meta = read_meta(path)
    tensors = _read_tensors(path, meta.get("sha256"), verify)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise CheckpointError(f"{path}/config.json cannot be read: {exc}") from None
    family_of(config)
    if dtype is None:
        key = "compute_dtype" if device.type == "cpu" else "storage_dtype"
        dtype = _DTYPES[meta.get(key, "float16" if device.type != "cpu" else "float32")]
    compute_dtype = dtype
    model = _empty_model(AutoModelForCausalLM, config, compute_dtype)
    packed: dict[str, PackedWeight] = {}
    for name, desc in meta["layers"].items():
        prefix = f"{name}{_PACKED}"
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        if not own:
            raise CheckpointError(f"packed tensors of {name} are missing from {TENSOR_FILE}")
        packed[name] = PackedWeight.from_description(desc, own)
    # Variance correction gives linears that had no bias one (LLaMA's); the stored bias says so.
    replace_linears(model, packed, compute_dtype, with_bias={n for n in packed if f"{n}.bias" in tensors})
    state = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    # assign=True puts the loaded tensors themselves in place of the skeleton's meta parameters
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = set()
    if meta.get("tied_embeddings"):
        model.tie_weights()
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            expected_missing |= {n for n, p in model.named_parameters(remove_duplicate=False) if p is out_emb.weight}
    missing = [m for m in missing if m not in expected_missing and ".packed_" not in m]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise CheckpointError(f"checkpoint leaves tensors without values: {empty[:5]}{'...' if len(empty) > 5 else ''}")
    model.eval()
    if head_int8:
        from ..nn.int8_linear import quantize_lm_head

        quantize_lm_head(model, compute_dtype)  # before the move, like the embedding below
    if embed_int8:
        from ..nn.embedding import quantize_input_embedding

        quantize_input_embedding(model, compute_dtype)  # before the move: the fp16 table never reaches the device
    if transform is not None:
        transform(model, device, compute_dtype)
    place_on_device(model, device, compute_dtype)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, meta


def _empty_model(auto_cls, config, dtype):
    """The model of ``config`` with its parameters on the meta device (no memory, no init) and
    its non-persistent buffers (rotary frequencies) computed as usual on the CPU."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(include_buffers=False), no_init_weights():
        return auto_cls.from_config(config, dtype=dtype)
