"""The Python API: ``compress``, ``save``, ``load``."""
from __future__ import annotations

import torch

from .data.windows import calibration_windows
from .pipeline.sequential import CompressionResult, compress_model
from .recipe import Recipe, get_recipe


def compress(model, recipe: str | Recipe = "2:4-w4a16", *, tokenizer=None, calibration: torch.Tensor | None = None,
             device=None, progress: bool = True) -> CompressionResult:
    """Compress ``model`` in place and return a CompressionResult (packed weights + reports).

    ``recipe`` is a preset name, a YAML path or a Recipe. Calibration windows come from
    ``calibration`` (a ``[samples, seq_len]`` tensor of token ids) or, given a ``tokenizer``, from the
    recipe's calibration source (the offline Wikipedia text by default).
    """
    recipe = get_recipe(recipe)
    if calibration is None:
        if tokenizer is None:
            raise ValueError("compress() needs a tokenizer or explicit calibration token windows")
        c = recipe.calibration
        calibration = calibration_windows(tokenizer, c.samples, c.seq_len, c.seed, c.source)
    return compress_model(model, recipe, calibration, device=device, progress=progress)


def save(result: CompressionResult, out, tokenizer=None, overwrite: bool = False, extra: dict | None = None):
    """Write a packed checkpoint folder (atomic); returns its SizeReport."""
    from .checkpoint.io import save_checkpoint

    return save_checkpoint(result, out, tokenizer=tokenizer, extra=extra, overwrite=overwrite)


def load(path, device="cpu", dtype: torch.dtype | None = None, embed_int8: bool = False, fuse: bool = True,
         head_int8: bool = False):
    """Load a compressed checkpoint: ``(model, tokenizer)``; linears are SparseQuantLinear modules.

    On ``"cuda"`` the compressed linears hold only their packed weights in the GPU kernels' layout
    (dense weights are never built there) and compute in float16 (or ``dtype``); on the CPU they
    run the exact reference path in the dtype recorded at compression time. ``embed_int8`` keeps the
    input embedding as int8 rows with one scale per row (half its fp16 bytes; lookups dequantize
    only the rows they gather); refused for tied embeddings. ``head_int8`` keeps the LM head as int8 rows
    with one scale per row too (``nn/int8_linear.py``: half the bytes of the largest read of a decode
    step, computed by a W8A16 kernel on CUDA). ``fuse`` (default) stacks each layer's
    q/k/v and gate/up linears into one linear each before placement (``models/fused.py``; the
    checkpoint is unchanged, and groups that cannot be stacked exactly stay separate).
    """
    from .checkpoint.io import load_checkpoint
    from .models.fused import fuse_projections

    model, tokenizer, _ = load_checkpoint(path, device=device, dtype=dtype, embed_int8=embed_int8,
                                          transform=fuse_projections if fuse else None, head_int8=head_int8)
    return model, tokenizer


def generate(model, prompts, tokenizer=None, *, device=None, fuse: bool = True, **kwargs):
    """Generate continuations of ``prompts`` (text with a tokenizer, or token ids; one or a batch).

    ``model`` is a loaded model or a path: a checkpoint folder (loaded with :func:`load`), a model
    folder, ``.gguf`` file or hub id; a model loaded here gets fused projections unless ``fuse=False``
    (a model passed in is run as it is). Keyword arguments go to ``runtime.generate.generate``:
    ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed``,
    ``eos_token_id``, ``on_token`` (streaming callback), ``cuda_graph``. Returns a ``Generation``
    (``tokens`` and, with a tokenizer, ``texts``).
    """
    from .runtime.generate import generate as _generate

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from .models.loading import is_checkpoint, load_model

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if is_checkpoint(model):
            model, tok = load(model, device=dev, fuse=fuse)
        else:
            model, tok = load_model(str(model), dtype=torch.float32 if dev == "cpu" else torch.float16, device=dev)
            if fuse:
                from .models.fused import fuse_projections

                fuse_projections(model)
        tokenizer = tokenizer or tok
    return _generate(model, prompts, tokenizer, **kwargs)
