"""The 2:4 storage format shared by checkpoints and kernels.

For ``W[N, K]`` with exactly two kept weights in every group of four along K:
- values ``[N, K/2]``: the kept entries of each group in position order (first kept, second kept);
- metadata ``[N, K/8]`` uint8: one 4-bit nibble per group, ``idx0 | idx1 << 2`` with
  ``idx0 < idx1`` the kept positions in 0..3; group ``2j`` in the low nibble of byte ``j``,
  group ``2j+1`` in the high nibble (so K must be a multiple of 8).

That is 4 bits of metadata per group of four weights: 1 bit per original weight. Kernels may
reorder these arrays at load time; the checkpoint keeps this layout.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from .masks import validate_nm


def check_24_shape(in_features: int) -> None:
    if in_features % 8:
        raise PatternError(f"2:4 storage needs the input dimension to be a multiple of 8, got {in_features}")


def mask_to_indices24(mask: torch.Tensor) -> torch.Tensor:
    """Kept positions per group: int64 ``[N, K/4, 2]``, ascending."""
    validate_nm(mask, 2, 4, exact=True)
    n, k = mask.shape
    groups = mask.reshape(n, k // 4, 4)
    # Sort keys: kept positions first, in ascending order.
    pos = torch.arange(4, device=mask.device).expand_as(groups)
    key = torch.where(groups, pos, pos + 4)
    return key.sort(dim=-1).values[..., :2]


def pack_24(dense: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2:4 matrix (any dtype) into ``(values [N, K/2], metadata [N, K/8] uint8)``."""
    n, k = dense.shape
    check_24_shape(k)
    idx = mask_to_indices24(mask)
    values = dense.reshape(n, k // 4, 4).gather(-1, idx).reshape(n, k // 2)
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values, meta


def unpack_24_indices(meta: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, K/4, 2]`` kept positions from packed metadata ``[N, K/8]``."""
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(m.shape[0], -1)  # [N, K/4]
    idx = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)
    if bool((idx[..., 0] >= idx[..., 1]).any()):
        raise PatternError("2:4 metadata is corrupt: kept positions must be two distinct ascending indices")
    return idx


def unpack_24(values: torch.Tensor, meta: torch.Tensor, fill=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_24`: ``(dense [N, K], mask [N, K])``; dropped entries get ``fill``."""
    n, half = values.shape
    k = half * 2
    if meta.shape != (n, k // 8):
        raise PatternError(f"2:4 metadata shape {tuple(meta.shape)} does not match values {tuple(values.shape)}")
    idx = unpack_24_indices(meta)
    dense = torch.full((n, k // 4, 4), fill, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, values.reshape(n, k // 4, 2))
    mask = torch.zeros((n, k // 4, 4), dtype=torch.bool, device=values.device)
    mask.scatter_(-1, idx, True)
    return dense.reshape(n, k), mask.reshape(n, k)
