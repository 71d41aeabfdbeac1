"""Bit packing of small unsigned integers and of bool masks into uint8 streams.

Element ``i`` of a ``bits``-wide stream occupies bits ``[i*bits, (i+1)*bits)`` counted from the
least significant bit of byte 0 (LSB first). For 4 bits this is "two per byte, even element in
the low nibble"; for 8 bits it is the identity.
"""
from __future__ import annotations

import torch

from ..errors import PatternError


def packed_nbytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of integers in ``[0, 2**bits)`` into a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise PatternError(f"can pack 1 to 8 bits per value, got {bits}")
    v = values.reshape(-1).to(torch.int32)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise PatternError(f"values outside [0, {2**bits}) cannot be packed in {bits} bits")
    if bits == 8:
        return v.to(torch.uint8)
    if bits == 4:
        if v.numel() % 2:
            v = torch.cat([v, v.new_zeros(1)])
        pair = v.reshape(-1, 2)
        return (pair[:, 0] | (pair[:, 1] << 4)).to(torch.uint8)
    shifts = torch.arange(bits, device=v.device, dtype=torch.int32)
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=v.device, dtype=torch.int32))
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values as uint8."""
    p = packed.reshape(-1).to(torch.int32)
    if p.numel() < packed_nbytes(count, bits):
        raise PatternError(f"packed stream holds {p.numel()} bytes, {packed_nbytes(count, bits)} needed")
    if bits == 8:
        return p[:count].to(torch.uint8)
    if bits == 4:
        both = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)
        return both[:count].to(torch.uint8)
    stream = ((p.unsqueeze(1) >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    weights = 1 << torch.arange(bits, device=p.device, dtype=torch.int32)
    return (stream * weights).sum(1).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask of any shape as a 1-D bitmap (1 bit per element, LSB first)."""
    return pack_bits(mask.reshape(-1).to(torch.uint8), 1)


def unpack_mask(bitmap: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for s in shape:
        count *= s
    return unpack_bits(bitmap, 1, count).bool().reshape(shape)
