"""The kernel layout of a quantized hybrid-tile weight (tiles dense or 2:4), built once by ``prepare``.

The checkpoint keeps each tile's codes as a byte stream (patterns/pack_hybrid.py). The kernels
want what the 2:4 kernels get from layout.py: 32-column *units*, one metadata word and
``W = bits / 2`` value words per unit, words arranged so a group of four decodes in a few
instructions, and consecutive lanes on consecutive output rows. Here that holds per tile:

- A 2:4 tile is stored exactly as layout.py stores a 2:4 matrix, restricted to the tile:
  ``meta`` words ``[units_in_tile, h]`` and value words ``[units_in_tile * W, h]`` (h = the tile's
  rows), row index fastest.
- A dense tile is stored as *two* 2:4 sub-units per unit: sub-unit A holds positions (0, 1) of
  every group of four, sub-unit B positions (2, 3), each in layout.py's value-word format. Their
  metadata is a constant (``DENSE_META``), so dense tiles store no metadata; the 32 codes of a
  unit take 2 W words, the same bits as the checkpoint. Value words ``[units_in_tile, 2, W, h]``.
  The decode kernel therefore runs the very same per-group arithmetic as the 2:4 kernel
  (triton_decode._half_unit) on a dense tile, twice per unit.
- ``offsets [R, C, 2]`` int32: the tile's first word in ``vals`` and in ``meta``; ``flags [R, C]``
  int32 (1 = 2:4). A kernel program owns rows of one tile row and jumps to each tile in O(1).
- ``scales [groups, N]`` fp16, ``zeros [groups, N]`` uint8 (asymmetric only): as layout.py, over
  the whole matrix, K padded to whole units (the padding holds the zero point: weight exactly 0).

The words themselves come from layout.build_layout applied to three 2:4 *views* of the matrix
(the real 2:4 mask; positions (0, 1); positions (2, 3)), so the bit arrangement is defined in one
place. Tile columns must be a multiple of 32 (a unit never straddles two tiles).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint.packed import PackedWeight
from ..errors import PatternError
from ..patterns import SparsitySpec
from ..patterns.bits import pack_bits, unpack_bits
from ..patterns.hybrid import TileGrid, grid_for
from ..patterns.pack24 import pack_24
from ..patterns.pack_hybrid import unpack_hybrid
from .layout import UNIT, build_layout, kernel_group

#: Metadata words of the dense sub-units (layout.py's meta format): A keeps positions (0, 1) of
#: each group (i0 = 0, i1 = 1 -> 0x55 in the i1 bytes), B keeps (2, 3) (0xAA / 0xFF), as int32.
DENSE_META_A = 0x55005500
DENSE_META_B = 0xFFAAFFAA - 2**32
#: Tile grid given to quantized 'dense' storage (all tiles dense).
DENSE_TILE = (128, 128)


@dataclass
class HybridLayout:
    n: int
    k: int
    bits: int
    group: int  # columns per scale group as the kernels see it (a multiple of 32)
    units: int  # ceil(K / 32)
    tile_rows: int
    tile_cols: int
    flags: torch.Tensor  # int32 [R, C], 1 = 2:4
    offsets: torch.Tensor  # int32 [R, C, 2]: first word in vals, in meta
    vals: torch.Tensor  # int32 flat
    meta: torch.Tensor  # int32 flat (2:4 tiles only)
    scales: torch.Tensor
    zeros: torch.Tensor | None
    sym_zero: int

    @property
    def words_per_unit(self) -> int:
        return self.bits // 2

    @property
    def units_per_tile(self) -> int:
        return self.tile_cols // UNIT

    @property
    def n_tile_rows(self) -> int:
        return self.flags.shape[0]

    @property
    def n_tile_cols(self) -> int:
        return self.flags.shape[1]

    def nbytes(self) -> int:
        t = [self.flags, self.offsets, self.vals, self.meta, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(x.numel() * x.element_size() for x in t)


def _tile(packed) -> tuple[int, int]:
    return tuple(packed.sparsity.tile) if packed.storage == "hybrid" else DENSE_TILE


def unsupported_reason(packed) -> str | None:
    """Why the hybrid kernels cannot run ``packed`` (None when they can).

    Quantized 'dense' storage is accepted too, as a grid of dense 128 x 128 tiles (a hybrid
    weight at 0% is stored dense), with K a multiple of 8 as for hybrid tiles."""
    if packed.storage not in ("hybrid", "dense"):
        return f"storage is {packed.storage!r}, not 'hybrid' (or quantized 'dense')"
    if packed.quant is None or packed.quant.bits not in (4, 8):
        return "the hybrid kernels need int4 or int8 codes"
    if packed.sparsity.outliers:
        return "the kernels do not add structured outliers"
    if packed.shape[1] % 8:
        return f"the input dimension must be a multiple of 8, got {packed.shape[1]}"
    tr, tc = _tile(packed)
    if tc % UNIT:
        return f"tile columns must be a multiple of {UNIT}, got {tc}"
    if tr % 16:
        return f"tile rows must be a multiple of 16 (a program's rows stay in one tile row), got {tr}"
    if kernel_group(packed) is None:
        return f"group size must be a multiple of {UNIT} or per channel, got {packed.quant.group_size}"
    return None


def _view(entries: torch.Tensor, mask: torch.Tensor, packed) -> PackedWeight:
    """A quantized 'nm24' PackedWeight holding ``entries`` where ``mask`` keeps them."""
    q = packed.quant
    values, meta = pack_24(entries, mask)
    t = {"meta": meta, "qweight": pack_bits(values.reshape(-1), q.bits), "scales": packed.tensors["scales"]}
    if not q.symmetric:
        t["zeros"] = packed.tensors["zeros"]
    return PackedWeight(shape=packed.shape, storage="nm24", sparsity=SparsitySpec(kind="nm", n=2, m=4),
                        quant=q, tensors=t)


def build_hybrid_layout(packed, device) -> HybridLayout:
    """Rearrange a quantized 'hybrid' PackedWeight into the kernel layout (same codes and scales)."""
    why = unsupported_reason(packed)
    if why is not None:
        raise PatternError(f"no hybrid kernel layout for this weight: {why}")
    dev = torch.device(device)
    n, k = packed.shape
    q = packed.quant
    if packed.storage == "dense":
        grid = TileGrid.of((n, k), DENSE_TILE)
        if "qweight" not in packed.tensors:
            raise PatternError("packed dense weight is missing 'qweight'")
        entries = unpack_bits(packed.tensors["qweight"].to(dev), q.bits, n * k).reshape(n, k)
        mask = torch.ones(n, k, dtype=torch.bool, device=dev)
        flags = torch.zeros(grid.n_tile_rows, grid.n_tile_cols, dtype=torch.bool, device=dev)
    else:
        grid = grid_for(packed.sparsity, (n, k))
        names = ("tile_flags", "tile_offsets", "meta", "qweight")
        missing = [m for m in names if m not in packed.tensors]
        if missing:
            raise PatternError(f"packed hybrid weight is missing {missing}")
        entries, mask, flags = unpack_hybrid({m: packed.tensors[m].to(dev) for m in names}, grid, q.bits)
        flags = flags.to(dev)
    in_24 = grid.expand(flags)
    first_half = (torch.arange(k, device=dev) % 4 < 2).expand(n, k)
    sparse = build_layout(_view(entries, torch.where(in_24, mask, first_half), packed), dev)
    dense_a = build_layout(_view(entries, first_half, packed), dev)
    dense_b = build_layout(_view(entries, ~first_half, packed), dev)

    W = q.bits // 2
    upt = grid.tile_cols // UNIT
    units = sparse.units
    vals, metas, offsets = [], [], torch.zeros(grid.n_tile_rows, grid.n_tile_cols, 2, dtype=torch.int64)
    vpos = mpos = 0
    flags_cpu = flags.cpu()
    for i in range(grid.n_tile_rows):
        r0, r1 = i * grid.tile_rows, min((i + 1) * grid.tile_rows, n)
        for j in range(grid.n_tile_cols):
            u0, u1 = j * upt, min((j + 1) * upt, units)
            offsets[i, j, 0], offsets[i, j, 1] = vpos, mpos
            if flags_cpu[i, j]:
                v = sparse.vals[u0 * W:u1 * W, r0:r1].reshape(-1)
                m = sparse.meta[u0:u1, r0:r1].reshape(-1)
                metas.append(m)
                mpos += m.numel()
            else:
                a = dense_a.vals[u0 * W:u1 * W, r0:r1].reshape(u1 - u0, 1, W, r1 - r0)
                b = dense_b.vals[u0 * W:u1 * W, r0:r1].reshape(u1 - u0, 1, W, r1 - r0)
                v = torch.cat([a, b], dim=1).reshape(-1)
            vals.append(v)
            vpos += v.numel()
    if max(vpos, mpos) >= 2**31:
        raise PatternError(f"a {n}x{k} hybrid weight is too large for int32 word offsets")
    return HybridLayout(
        n=n, k=k, bits=q.bits, group=sparse.group, units=units, tile_rows=grid.tile_rows, tile_cols=grid.tile_cols,
        flags=flags.to(torch.int32).contiguous(), offsets=offsets.to(torch.int32).to(dev),
        vals=torch.cat(vals), meta=torch.cat(metas) if metas else torch.zeros(1, dtype=torch.int32, device=dev),
        scales=sparse.scales, zeros=sparse.zeros, sym_zero=sparse.sym_zero,
    )


def _decode_units(meta: torch.Tensor, words: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """layout.py's unit format back to codes: ``meta [u, h]``, ``words [u, W, h]`` (int64) ->
    ``(codes [h, u*32], kept [h, u*32])``. Written from the bit definitions, not from build_layout."""
    u, W, h = words.shape
    j = torch.arange(8)  # group within the unit
    sh = (2 * (j // 2) + 16 * (j % 2)).view(1, 8, 1)
    i0 = (meta[:, None, :] >> sh) & 3  # [u, 8, h]
    i1 = (meta[:, None, :] >> (sh + 8)) & 3
    if bits == 4:
        w = words[:, (j // 4), :]  # [u, 8, h]
        s0 = (4 * (j % 4)).view(1, 8, 1)
        c0, c1 = (w >> s0) & 0xF, (w >> (s0 + 16)) & 0xF
    else:
        w = words[:, (j // 2), :]
        s0 = (16 * (j % 2)).view(1, 8, 1)
        c0, c1 = (w >> s0) & 0xFF, (w >> (s0 + 8)) & 0xFF
    p = torch.arange(4).view(1, 1, 4, 1)
    codes = torch.where(p == i0[:, :, None], c0[:, :, None], torch.where(p == i1[:, :, None], c1[:, :, None], 0))
    kept = (p == i0[:, :, None]) | (p == i1[:, :, None])  # [u, 8, 4, h]
    return codes.permute(3, 0, 1, 2).reshape(h, u * 32), kept.permute(3, 0, 1, 2).reshape(h, u * 32)


def layout_weight(lay: HybridLayout) -> torch.Tensor:
    """The float32 ``W [N, K]`` a HybridLayout encodes (CPU, plain PyTorch; for tests)."""
    n, k, W = lay.n, lay.k, lay.words_per_unit
    mask32 = 0xFFFFFFFF
    vals = lay.vals.cpu().to(torch.int64) & mask32
    meta = lay.meta.cpu().to(torch.int64) & mask32
    codes = torch.zeros(n, lay.units * UNIT, dtype=torch.int64)
    kept = torch.zeros(n, lay.units * UNIT, dtype=torch.bool)
    upt = lay.units_per_tile
    for i in range(lay.n_tile_rows):
        r0, r1 = i * lay.tile_rows, min((i + 1) * lay.tile_rows, n)
        h = r1 - r0
        for j in range(lay.n_tile_cols):
            u0, u1 = j * upt, min((j + 1) * upt, lay.units)
            ut = u1 - u0
            vo, mo = (int(x) for x in lay.offsets[i, j])
            if int(lay.flags[i, j]):
                c, m = _decode_units(meta[mo:mo + ut * h].view(ut, h), vals[vo:vo + ut * W * h].view(ut, W, h), lay.bits)
            else:
                sub = vals[vo:vo + ut * 2 * W * h].view(ut, 2, W, h)
                const = lambda v: torch.full((ut, h), v & mask32, dtype=torch.int64)  # noqa: E731
                ca, ma = _decode_units(const(DENSE_META_A), sub[:, 0], lay.bits)
                cb, mb = _decode_units(const(DENSE_META_B), sub[:, 1], lay.bits)
                c, m = torch.where(ma, ca, cb), ma | mb
            codes[r0:r1, u0 * UNIT:u1 * UNIT], kept[r0:r1, u0 * UNIT:u1 * UNIT] = c, m
    g = lay.group
    scale = lay.scales.cpu().float().t().repeat_interleave(g, dim=1)[:, :lay.units * UNIT]
    if lay.zeros is None:
        zero = torch.full_like(scale, float(lay.sym_zero))
    else:
        zero = lay.zeros.cpu().float().t().repeat_interleave(g, dim=1)[:, :lay.units * UNIT]
    w = torch.where(kept, (codes.float() - zero) * scale, torch.zeros_like(scale))
    return w[:, :k].contiguous()
