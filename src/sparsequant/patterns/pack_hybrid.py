"""The hybrid-tile storage format shared by checkpoints and (future) kernels.

For ``W[N, K]`` cut into a ``R x C`` grid of tiles (``patterns/hybrid.py``; edge tiles partial):
- ``tile_flags`` uint8 ``[R, C]``: 1 = the tile is 2:4, 0 = dense;
- ``tile_offsets`` int32 ``[R, C, 2]``: where tile ``(i, j)`` starts in the value stream and in the
  metadata stream, so a kernel reads a tile's flag and jumps to its data in O(1);
- value stream, tiles in row-major tile order: a dense tile holds its ``h x w`` entries, a 2:4
  tile its ``h x w/2`` kept entries (pack24 order), both row-major within the tile. Quantized
  (``qweight``, uint8): each tile's codes as an LSB-first bit stream starting on a byte, offsets
  in bytes (at 4 and 8 bits every tile row is whole bytes: 64 bytes per dense row of a 128-wide
  int4 tile, 32 per 2:4 row). Unquantized (``values``, the storage dtype): offsets in elements;
- ``meta`` uint8: the 2:4 tiles' metadata, ``h x w/8`` bytes each in pack24's nibble layout
  (``idx0 | idx1 << 2`` per group of four, even group in the low nibble), offsets in bytes;
  dense tiles have none (their metadata offset is where the next 2:4 tile's would start).
Scales and zero points stay per row and group of the whole matrix, as for the other kinds; with
group 128 and 128-wide tiles a tile column is one quantization group.

Flags and offsets cost 9 bytes per tile: 0.004 bits per weight at 128 x 128.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from .bits import pack_bits, packed_nbytes, unpack_bits
from .hybrid import TileGrid
from .pack24 import pack_24, unpack_24

_MAX_OFFSET = 2**31 - 1


def _tile_sizes(grid: TileGrid, flags: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile (row-major, flat): value-stream and metadata-stream lengths."""
    vals, metas = [], []
    for i in range(grid.n_tile_rows):
        for j in range(grid.n_tile_cols):
            h, w = grid.tile_shape(i, j)
            count = h * w // 2 if flags[i, j] else h * w
            vals.append(count if bits is None else packed_nbytes(count, bits))
            metas.append(h * w // 8 if flags[i, j] else 0)
    return torch.tensor(vals, dtype=torch.int64), torch.tensor(metas, dtype=torch.int64)


def tile_offsets(grid: TileGrid, flags: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, int, int]:
    """``(offsets int32 [R, C, 2], value-stream length, metadata length)`` for ``flags``."""
    vals, metas = _tile_sizes(grid, flags.cpu(), bits)
    starts = torch.stack([vals.cumsum(0) - vals, metas.cumsum(0) - metas], dim=1)
    total_v, total_m = int(vals.sum()), int(metas.sum())
    if max(total_v, total_m) > _MAX_OFFSET:
        raise PatternError(f"a {grid.rows}x{grid.cols} hybrid weight is too large for int32 tile offsets")
    return starts.to(torch.int32).reshape(grid.n_tile_rows, grid.n_tile_cols, 2), total_v, total_m


def pack_hybrid(
    src: torch.Tensor, mask: torch.Tensor, flags: torch.Tensor, grid: TileGrid, bits: int | None
) -> dict[str, torch.Tensor]:
    """Tensors of the format above. ``src`` holds codes (uint8, ``bits`` given) or float values;
    ``mask``/``flags`` must agree (``hybrid.tile_flags`` proves it)."""
    stream, meta = [], []
    for i in range(grid.n_tile_rows):
        for j in range(grid.n_tile_cols):
            rs, cs = grid.bounds(i, j)
            block = src[rs, cs]
            if flags[i, j]:
                block, m = pack_24(block.contiguous(), mask[rs, cs].contiguous())
                meta.append(m.reshape(-1))
            block = block.reshape(-1)
            stream.append(block if bits is None else pack_bits(block, bits))
    offsets, _, _ = tile_offsets(grid, flags, bits)
    out = {
        "tile_flags": flags.to(torch.uint8).cpu(),
        "tile_offsets": offsets,
        "meta": torch.cat(meta) if meta else torch.zeros(0, dtype=torch.uint8),
    }
    out["values" if bits is None else "qweight"] = torch.cat(stream)
    return out


def unpack_hybrid(
    tensors: dict[str, torch.Tensor], grid: TileGrid, bits: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_hybrid`: ``(entries [N, K], mask [N, K], flags [R, C])``; pruned
    entries are 0. Raises PatternError when flags, offsets and stream lengths disagree."""
    flags8 = tensors["tile_flags"]
    if tuple(flags8.shape) != (grid.n_tile_rows, grid.n_tile_cols) or flags8.dtype != torch.uint8:
        raise PatternError(f"tile_flags {tuple(flags8.shape)} {flags8.dtype} do not fit a "
                           f"{grid.n_tile_rows}x{grid.n_tile_cols} grid of uint8")
    if bool((flags8 > 1).any()):
        raise PatternError("tile_flags must be 0 (dense) or 1 (2:4)")
    flags = flags8.bool()
    offsets, total_v, total_m = tile_offsets(grid, flags, bits)
    if not torch.equal(tensors["tile_offsets"].cpu(), offsets):
        raise PatternError("tile_offsets do not match the tile flags")
    stream = tensors["values" if bits is None else "qweight"].reshape(-1)
    meta = tensors["meta"].reshape(-1)
    if stream.numel() != total_v or meta.numel() != total_m:
        raise PatternError(f"hybrid streams hold {stream.numel()} / {meta.numel()} entries, the flags need "
                           f"{total_v} / {total_m}")
    dtype = torch.uint8 if bits is not None else stream.dtype
    out = torch.zeros(grid.rows, grid.cols, dtype=dtype, device=stream.device)
    mask = torch.ones(grid.rows, grid.cols, dtype=torch.bool, device=stream.device)
    for i in range(grid.n_tile_rows):
        for j in range(grid.n_tile_cols):
            h, w = grid.tile_shape(i, j)
            vo, mo = (int(v) for v in offsets[i, j])
            count = h * w // 2 if flags[i, j] else h * w
            size = count if bits is None else packed_nbytes(count, bits)
            chunk = stream[vo : vo + size]
            if bits is not None:
                chunk = unpack_bits(chunk, bits, count)
            rs, cs = grid.bounds(i, j)
            if flags[i, j]:
                dense, m = unpack_24(chunk.reshape(h, w // 2), meta[mo : mo + h * w // 8].reshape(h, w // 8))
                out[rs, cs], mask[rs, cs] = dense, m
            else:
                out[rs, cs] = chunk.reshape(h, w)
    return out, mask, flags
