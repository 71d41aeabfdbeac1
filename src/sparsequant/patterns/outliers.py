"""Structured outliers: exactly k of every 256 input weights of each row, kept in 16-bit float.

A weight becomes ``W = S + O``: ``O`` holds the outliers, ``S`` the sparse (and maybe quantized)
rest, computed by the pruner on ``W - O``. Taking the most salient weights out first means the
N:M selection and the quantization scales of ``S`` no longer have to accommodate them.

Blocks. The inputs of a row are cut into blocks of 256 consecutive columns; each full block keeps
exactly ``k`` outliers (k = 4, 8 or 16). A ragged last block of ``r < 256`` columns (576 = 2 x 256
+ 64) keeps ``ceil(k * r / 256)``, the same density rounded up, so a row keeps
``outlier_count(K, k)`` in all.

Storage. ``values [N, T]`` in the checkpoint's 16-bit float and ``index [N, T]`` uint8, the
position inside its block, ascending within each block; slot ``j`` belongs to block ``j // k``,
so a kernel finds block ``b`` of any row at ``b * k`` without a scan. That is
``T * 24`` bits per row: for k = 8, 0.75 bits per original weight.

Selection. The ``k`` weights of largest saliency ``w^2 * c_j`` per block, with the same column
curvature as the hybrid tiles (``1 / [H^-1]_jj`` of the damped Hessian when one was collected,
``||x_j||^2`` otherwise, 1 without statistics): the weights whose removal would cost the most.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError
from .spec import OUTLIER_BLOCK, OUTLIER_KS

_FLOAT16 = (torch.float16, torch.bfloat16)


def block_counts(in_features: int, k: int) -> list[int]:
    """Outliers per block of one row: ``k`` per full block, ``ceil(k*r/256)`` for a last block of r."""
    if k not in OUTLIER_KS:
        raise PatternError(f"outliers per {OUTLIER_BLOCK} inputs must be one of {OUTLIER_KS}, got {k}")
    if in_features < 1:
        raise PatternError(f"outliers need at least one input column, got {in_features}")
    full, r = divmod(in_features, OUTLIER_BLOCK)
    return [k] * full + ([-(-k * r // OUTLIER_BLOCK)] if r else [])


def outlier_count(in_features: int, k: int) -> int:
    return sum(block_counts(in_features, k))


def _block_starts(in_features: int, k: int, device=None) -> torch.Tensor:
    """int64 ``[T]``: the first column of the block each slot belongs to."""
    counts = block_counts(in_features, k)
    starts = torch.arange(len(counts), dtype=torch.int64) * OUTLIER_BLOCK
    return starts.repeat_interleave(torch.tensor(counts)).to(device)


@dataclass
class OutlierSet:
    values: torch.Tensor  # [N, T] float16 / bfloat16
    index: torch.Tensor  # [N, T] uint8, column within the block
    k: int
    in_features: int

    def columns(self) -> torch.Tensor:
        """int64 ``[N, T]``: each outlier's input column."""
        return self.index.to(torch.int64) + _block_starts(self.in_features, self.k, self.index.device)

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        """float32 ``[N, K]`` with the outlier values at their positions and zeros elsewhere."""
        n, k = (int(v) for v in shape)
        if (n, k) != (self.values.shape[0], self.in_features):
            raise PatternError(f"outliers of a {self.values.shape[0]}x{self.in_features} weight asked for shape {(n, k)}")
        out = torch.zeros(n, k, dtype=torch.float32, device=self.values.device)
        return out.scatter_(1, self.columns(), self.values.float())

    def validate(self, shape: tuple[int, int] | None = None) -> "OutlierSet":
        """Prove: exactly the block counts per row, distinct ascending positions inside each block,
        16-bit finite values. Returns self."""
        counts = block_counts(self.in_features, self.k)
        t = sum(counts)
        rows = self.values.shape[0] if self.values.dim() == 2 else -1
        if shape is not None and tuple(shape) != (rows, self.in_features):
            raise PatternError(f"outliers fit a {rows}x{self.in_features} weight, not {tuple(shape)}")
        if self.values.dim() != 2 or tuple(self.values.shape) != (rows, t) or tuple(self.index.shape) != (rows, t):
            raise PatternError(
                f"outliers must be values and index of shape [rows, {t}] ({self.k} per {OUTLIER_BLOCK} of "
                f"{self.in_features} inputs); got {tuple(self.values.shape)} and {tuple(self.index.shape)}"
            )
        if self.index.dtype != torch.uint8:
            raise PatternError(f"outlier index must be uint8, got {self.index.dtype}")
        if self.values.dtype not in _FLOAT16:
            raise PatternError(f"outlier values must be float16 or bfloat16, got {self.values.dtype}")
        if not bool(torch.isfinite(self.values).all()):
            raise PatternError("outlier values contain NaN or Inf")
        widths = torch.tensor([min(OUTLIER_BLOCK, self.in_features - b * OUTLIER_BLOCK) for b in range(len(counts))])
        width = widths.repeat_interleave(torch.tensor(counts)).to(self.index.device)
        idx = self.index.to(torch.int64)
        if bool((idx >= width).any()):
            raise PatternError("an outlier index points past the end of its block")
        # Slots of one block are consecutive; ascending inside each block means exactly distinct.
        block = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts)).to(idx.device)
        same = block[1:] == block[:-1]
        if bool((idx[:, 1:][:, same] <= idx[:, :-1][:, same]).any()):
            raise PatternError(f"outlier positions must be distinct and ascending within each block of {OUTLIER_BLOCK}")
        return self

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.index.numel()

    def scale_rows(self, scale: torch.Tensor) -> "OutlierSet":
        """The same positions with row i's values times ``scale[i]``, rounded to their 16-bit dtype."""
        values = (self.values.float() * scale.float().to(self.values.device)[:, None]).to(self.values.dtype)
        if not bool(torch.isfinite(values).all()):
            raise PatternError(f"scaled outlier values overflow {self.values.dtype}")
        return OutlierSet(values, self.index, self.k, self.in_features)


def select_outliers(
    weight: torch.Tensor, saliency: torch.Tensor, k: int, storage_dtype: torch.dtype = torch.float16
) -> OutlierSet:
    """The ``k`` most salient weights of every block of 256 inputs, per row (see the module docstring)."""
    if storage_dtype not in _FLOAT16:
        raise PatternError(f"outliers are stored as float16 or bfloat16, got {storage_dtype}")
    if weight.dim() != 2 or tuple(saliency.shape) != tuple(weight.shape):
        raise PatternError(f"weight {tuple(weight.shape)} and saliency {tuple(saliency.shape)} must be the same 2-D shape")
    if not bool(torch.isfinite(saliency).all()):
        raise PatternError("outlier saliency contains NaN or Inf; check the weights and statistics")
    n, cols = weight.shape
    counts = block_counts(cols, k)
    picks = []
    for b, c in enumerate(counts):
        lo = b * OUTLIER_BLOCK
        block = saliency[:, lo : lo + OUTLIER_BLOCK]
        picks.append(block.topk(c, dim=1).indices.sort(dim=1).values)
    index = torch.cat(picks, dim=1)
    cols_abs = index + _block_starts(cols, k, index.device)
    values = weight.gather(1, cols_abs).to(storage_dtype)
    return OutlierSet(values=values, index=index.to(torch.uint8), k=k, in_features=cols).validate((n, cols))
