"""Shared fixtures: tiny random models of every supported family, built from configs in a second."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch has to be on before
# anything imports triton: transformers.modeling_utils does, and triton.language's own helpers
# (tl.max, ...) imported in compiled mode cannot be called by interpreted kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY)
    if family == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY)
    if family == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=16, sliding_window=8)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=256, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "phi":
        return tf.PhiConfig(**TINY, partial_rotary_factor=0.5)
    if family == "phi3":
        return tf.Phi3Config(**TINY, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "opt", "phi", "phi3"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def exact_embedding(model, seed: int = 0):
    """Give ``model`` an input embedding that int8 per-row quantization (nn/embedding.py) reproduces
    exactly: integer codes in [-127, 127] (each row reaching +-127) times a power-of-two scale per
    row, so the table is also exact in a float16 checkpoint (7-bit codes times 2**-k)."""
    emb = model.get_input_embeddings()
    v, d = emb.weight.shape
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (v, d), generator=g)
    codes[:, 0] = torch.where(torch.rand(v, generator=g) < 0.5, -127, 127)
    scales = 2.0 ** -torch.randint(5, 9, (v,), generator=g).float()
    with torch.no_grad():
        emb.weight.copy_(codes.float() * scales[:, None])
    return model


def greedy_run(engine, ids, mask, steps):
    """Greedy tokens and every step's logits through a DecodeEngine (float64 copies: the engine
    reuses its output buffers)."""
    logits = [engine.prefill(ids, mask).double().clone()]
    toks = []
    for _ in range(steps):
        tok = logits[-1].argmax(-1)
        toks.append(tok.tolist())
        logits.append(engine.decode(tok).double().clone())
    return toks, logits


def random_ids(n: int, seq_len: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def kernel_tol(dtype) -> float:
    """Relative error a kernel output may have against a float64/float32 reference: the weight and
    the output rounded to the activation type (fp16 ~3e-4, bf16 ~2e-3, plus bf16 weight rounding)."""
    return 2e-3 if dtype == torch.float16 else 1e-2


def kernel_rel_error(y, ref, seed) -> float:
    """``|y - ref| / |ref|`` in float64 on the CPU; a non-finite output (an element never written)
    fails with the inputs' seed."""
    y = y.double().cpu()
    assert torch.isfinite(y).all(), f"non-finite output (unwritten element?), seed {seed}"
    ref = ref.double().cpu()
    return ((y - ref).norm() / ref.norm()).item()


def runtime_cli():
    """An argparse root with the ``generate`` and ``bench`` subcommands, for flag-parsing tests."""
    import argparse

    from sparsequant.commands import bench, generate

    parent = argparse.ArgumentParser(add_help=False)
    root = argparse.ArgumentParser()
    sub = root.add_subparsers()
    generate.add_parser(sub, parent)
    bench.add_parser(sub, parent)
    return root
