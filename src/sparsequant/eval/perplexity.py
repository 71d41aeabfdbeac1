"""Perplexity over non-overlapping windows: exp of the mean next-token NLL over every predicted token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ..progress import progress_bar


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> float:
    """Each window is scored on its own (no carried context): ``seq_len - 1`` predictions per window."""
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    bar = progress_bar(total=len(windows), desc=desc, enabled=bool(progress), leave=False, unit="win")
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        bar.update(len(batch))
    bar.close()
    return math.exp(total_nll / total_tokens)
