"""Token windows for calibration and evaluation.

Sources: ``"wikipedia"`` (the offline default, fixed calibration/evaluation split by article),
a path to a local text file (first half calibrates, second half evaluates, split at a token
boundary), or a dataset name (``wikitext2``) when the ``datasets`` package and a hub are reachable.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import DataError

DEFAULT_SOURCE = "wikipedia"


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"dataset {name!r} needs the 'datasets' package and a reachable hub; "
                        "use the offline default 'wikipedia' or a local text file") from None
    aliases = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "wikitext103": ("wikitext", "wikitext-103-raw-v1")}
    if name not in aliases:
        raise DataError(f"unknown dataset {name!r}; use 'wikipedia', 'wikitext2', 'wikitext103' or a text file")
    hub_split = {"calibration": "train", "evaluation": "test"}[split]
    try:
        ds = load_dataset(*aliases[name], split=hub_split)
    except Exception as exc:
        raise DataError(f"could not load {name} from the hub: {exc}") from exc
    return "\n\n".join(ds["text"])


def token_stream(tokenizer, source: str = DEFAULT_SOURCE, split: str = "evaluation") -> torch.Tensor:
    """The tokens of ``split`` ('calibration' or 'evaluation') of ``source`` as a 1-D tensor."""
    if split not in ("calibration", "evaluation"):
        raise DataError(f"unknown split {split!r}")
    if source == "wikipedia":
        from .wikipedia import split_text

        return _tokenize(tokenizer, split_text(split))
    path = Path(source)
    if path.is_file():
        ids = _tokenize(tokenizer, path.read_text(encoding="utf-8", errors="replace"))
        half = len(ids) // 2
        return ids[:half] if split == "calibration" else ids[half:]
    if path.suffix in (".txt", ".md") or "/" in source:
        raise DataError(f"text file {source} does not exist")
    return _tokenize(tokenizer, _hub_text(source, split))


def calibration_windows(tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                        source: str = DEFAULT_SOURCE) -> torch.Tensor:
    """``[n_samples, seq_len]`` distinct, non-overlapping windows drawn at random (seeded)."""
    ids = token_stream(tokenizer, source, "calibration")
    n_chunks = len(ids) // seq_len
    if n_chunks < n_samples:
        raise DataError(f"calibration text has {len(ids)} tokens: room for {n_chunks} windows of "
                        f"{seq_len}, {n_samples} asked for; use fewer or shorter samples")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_chunks, generator=g)[:n_samples].sort().values
    return torch.stack([ids[i * seq_len:(i + 1) * seq_len] for i in pick.tolist()])


def evaluation_windows(tokenizer, seq_len: int, n_windows: int | None = None,
                       source: str = DEFAULT_SOURCE) -> torch.Tensor:
    """The first ``n_windows`` consecutive non-overlapping windows of the evaluation text."""
    ids = token_stream(tokenizer, source, "evaluation")
    available = len(ids) // seq_len
    if available == 0:
        raise DataError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    n = available if n_windows is None else n_windows
    if n > available:
        raise DataError(f"evaluation text holds {available} windows of {seq_len} tokens, {n} asked for")
    return ids[: n * seq_len].reshape(n, seq_len)


def fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the exact tokens, recorded in logs so two runs can be shown to match."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
