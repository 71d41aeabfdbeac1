"""The sparse-tensor-core layout of a quantized 2:4 weight (``cuda/mma_sp.cu``), built once.

The CUDA kernel computes with ``mma.sp.m16n8k32`` where the weight is the sparse A operand:
a 16 x 32 tile of W (16 output rows, one *k-tile* of 32 input columns = 8 chunks of four) is
16 x 16 kept values plus 2-bit position indices. Lane ``l`` of a warp (``g = l // 4``,
``tig = l % 4``) holds four A registers of two kept values each (PTX ISA, "Matrix fragments for
sparse mma.m16n8k32 with .f16/.bf16"): reg 0 = row g, chunk tig; reg 1 = row g+8, chunk tig;
reg 2 = row g, chunk 4+tig; reg 3 = row g+8, chunk 4+tig.

Everything is grouped per 16-row *tile* ``r`` (N padded to a multiple of 16) and per 128-column
*super-tile* ``s`` (K padded to a multiple of 128; 4 k-tiles), so that a lane reads one super-tile
with one or two 16-byte loads and the warp reads 512 contiguous bytes:

``qw [RT, S, 32, WQ] int32`` - codes. int4 (WQ = 4): word ``kt`` holds the eight codes of k-tile
    kt, the pair of A register ``q`` in nibbles ``q`` and ``q + 4`` (first kept value in the lower
    one), so ``(w >> 4q) & 0x000F000F | 0x64006400`` is the fp16 pair (1024 + c0, 1024 + c1).
    int8 (WQ = 8): words ``2 kt + h`` hold A registers ``2h`` and ``2h + 1`` as bytes (c0, c1) each.
``meta [RT, S, 32, 2] int32`` - sparsity metadata. ``mma.sp.m16n8k32`` reads it from two lanes
    of each quad, T0/T1 (selector 0) or T2/T3 (selector 1); so word ``j`` of a lane with
    ``tig < 2`` describes k-tile ``2j`` and with ``tig >= 2`` k-tile ``2j + 1``, as the lane of role
    ``tig % 2``. Which (row, chunk) each nibble of a role's word describes is ``META_NIBBLES``,
    read off the hardware by the probe in ``cuda/mma_sp.cu`` (tests/test_kernels_cuda.py checks
    it); a nibble is ``i0 | i1 << 2``, as in the checkpoint.
``sc [RT, S, 8, GPS] int32`` - scales: ``GPS`` = scale groups per super-tile (4 for g32, 2 for
    g64, 1 for group sizes that are multiples of 128 or per channel), each the fp16 pair
    (scale of row g, scale of row g + 8) as one word; padding rows have scale 0.

Padding columns and rows keep positions (0, 1) with the zero point as code (weight exactly 0); the
kernel reads activations past K as 0. ``emulate_linear`` below executes this layout the way the
hardware does, on the CPU: the test that it equals the reference proves the layout offline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..patterns.bits import unpack_bits
from ..patterns.pack24 import unpack_24_indices

ROWS = 16  # rows per tile (mma m)
ST_COLS = 128  # columns per super-tile (4 mma k-tiles of 32)

#: For metadata role 0 (T0 / T2) and role 1 (T1 / T3): nibble i of the lane's word describes
#: row ``g + META_NIBBLES[role][i][0]``, chunk ``META_NIBBLES[role][i][1]`` of the k-tile.
META_NIBBLES = (
    tuple((8 * (i // 4), i % 4) for i in range(8)),
    tuple((8 * (i // 4), 4 + i % 4) for i in range(8)),
)


@dataclass
class MmaSpLayout:
    n: int
    k: int
    bits: int
    gps: int  # scale groups per super-tile
    rt: int  # row tiles
    s: int  # super-tiles per row
    qw: torch.Tensor
    meta: torch.Tensor
    sc: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.meta, self.sc))


def groups_per_supertile(packed) -> int | None:
    """Scale groups per 128-column super-tile, or None when the kernel cannot express the grouping."""
    q = packed.quant
    k = packed.shape[1]
    if q.group_size is None or q.group_size >= k:
        return 1
    if q.group_size in (32, 64):
        return ST_COLS // q.group_size
    return 1 if q.group_size % ST_COLS == 0 else None


def _to_i32(t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


def build_mma_sp_layout(packed, device="cpu", meta_nibbles=META_NIBBLES) -> MmaSpLayout:
    """Rearrange a symmetric int4/int8 'nm24' PackedWeight into the layout above."""
    if packed.storage != "nm24" or packed.quant is None:
        raise PatternError("the mma.sp layout needs a quantized 'nm24' weight")
    q = packed.quant
    if q.bits not in (4, 8) or not q.symmetric:
        raise PatternError(f"the mma.sp kernel supports symmetric int4/int8 codes, got {q}")
    gps = groups_per_supertile(packed)
    if gps is None:
        raise PatternError(f"the mma.sp kernel needs group size 32, 64, a multiple of 128 or per channel, got {q.group_size}")
    n, k = packed.shape
    dev = torch.device(device)
    rt, s = -(-n // ROWS), -(-k // ST_COLS)
    np_, kp = rt * ROWS, s * ST_COLS
    codes = unpack_bits(packed.tensors["qweight"].to(dev), q.bits, n * (k // 2)).reshape(n, k // 4, 2).long()
    idx = unpack_24_indices(packed.tensors["meta"].to(dev))  # [N, K/4, 2]
    # Pad: new groups keep (0, 1) with the zero point (weight 0); new rows likewise.
    full_codes = torch.full((np_, kp // 4, 2), q.sym_zero, dtype=torch.int64, device=dev)
    full_idx = torch.tensor([0, 1], device=dev).expand(np_, kp // 4, 2).clone()
    full_codes[:n, : k // 4] = codes
    full_idx[:n, : k // 4] = idx
    # [rt, row 16, s, kt 4, chunk 8, 2] -> split row into (half h, g) and chunk into (half c, tig)
    c6 = full_codes.reshape(rt, 2, 8, s, 4, 2, 4, 2)  # [r, h, g, s, kt, c, tig, v]
    if q.bits == 4:
        # nibble position of (h, c, v): register 2c + h, plus 4 for the second value
        shift = torch.zeros(2, 2, 2, dtype=torch.int64, device=dev)
        for h in range(2):
            for c in range(2):
                for v in range(2):
                    shift[h, c, v] = 4 * (2 * c + h + 4 * v)
        sh = shift.view(1, 2, 1, 1, 1, 2, 1, 2)
        words = (c6 << sh).sum(dim=(1, 5, 7))  # [r, g, s, kt, tig]
        qw = words.permute(0, 2, 1, 4, 3)  # [r, s, g, tig, kt]
        qw = qw.reshape(rt, s, 32, 4)
    else:
        # word 2kt + c, byte 2h + v
        sh = (8 * (2 * torch.arange(2, device=dev).view(2, 1) + torch.arange(2, device=dev).view(1, 2)))
        sh = sh.view(1, 2, 1, 1, 1, 1, 1, 2)  # over (h, v)
        words = (c6 << sh).sum(dim=(1, 7))  # [r, g, s, kt, c, tig]
        qw = words.permute(0, 2, 1, 5, 3, 4).reshape(rt, s, 32, 8)
    # Metadata nibbles [r, row 16, s, kt, chunk 8]
    nib = (full_idx[..., 0] | (full_idx[..., 1] << 2)).reshape(rt, 16, s, 4, 8)
    meta = torch.zeros(rt, s, 8, 4, 2, dtype=torch.int64, device=dev)  # [r, s, g, tig, j]
    gidx = torch.arange(8, device=dev)
    for tig in range(4):
        role, kt_off = tig % 2, tig // 2
        for j in range(2):
            kt = 2 * j + kt_off
            word = torch.zeros(rt, s, 8, dtype=torch.int64, device=dev)
            for i, (row_off, chunk) in enumerate(meta_nibbles[role]):
                word |= nib[:, gidx + row_off, :, kt, chunk].permute(0, 2, 1) << (4 * i)
            meta[:, :, :, tig, j] = word
    meta = meta.reshape(rt, s, 32, 2)
    # Scales: group of each super-tile slot, pair (row g, row g + 8)
    scales = packed.tensors["scales"].to(dev).to(torch.float16)
    if scales.shape != (n, q.n_groups(k)):
        raise PatternError(f"scales shape {tuple(scales.shape)} does not fit weight {packed.shape} / {q}")
    g_eff = q.effective_group(k)
    slot_col = torch.arange(s * gps, device=dev) * (ST_COLS // gps)  # first column of each slot
    grp = (slot_col // g_eff).clamp(max=scales.shape[1] - 1)
    sfull = torch.zeros(np_, s * gps, dtype=torch.float16, device=dev)
    sfull[:n] = scales[:, grp]
    bits16 = sfull.view(torch.int16).to(torch.int64) & 0xFFFF
    b = bits16.reshape(rt, 2, 8, s, gps)  # [r, h, g, s, slot]
    sc = (b[:, 0] | (b[:, 1] << 16)).permute(0, 2, 1, 3)  # [r, s, g, slot]
    return MmaSpLayout(n=n, k=k, bits=q.bits, gps=gps, rt=rt, s=s, qw=_to_i32(qw).contiguous(),
                       meta=_to_i32(meta).contiguous(), sc=_to_i32(sc).contiguous())


# -- the executable specification: what the kernel and the hardware do, lane by lane ----------------

def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def emulate_linear(layout: MmaSpLayout, x: torch.Tensor, meta_nibbles=META_NIBBLES) -> torch.Tensor:
    """``x @ W^T`` (float64) computed from the layout alone, as the kernel's lanes read it.

    A registers per lane come from the code words as the kernel's dequantization reads them
    (int4 nibbles q, q+4; int8 bytes), B element (k, n) from x, and each mma.sp chunk takes the
    two activations its metadata nibble names, read from the lane and nibble ``meta_nibbles`` say
    the hardware reads. Independent of ``build_mma_sp_layout``'s code except for these documented rules.
    """
    m, k = x.shape
    rt, s = layout.rt, layout.s
    xp = torch.zeros(m, s * ST_COLS, dtype=torch.float64)
    xp[:, :k] = x.double().cpu()
    qw, meta, sc = _u32(layout.qw.cpu()), _u32(layout.meta.cpu()), _u32(layout.sc.cpu())
    zero = 2 ** (layout.bits - 1)
    y = torch.zeros(m, rt * ROWS, dtype=torch.float64)
    lanes = torch.arange(32)
    g, tig = lanes // 4, lanes % 4
    for kt in range(4):
        # values[r, s, lane, reg, v]
        if layout.bits == 4:
            w = qw[:, :, :, kt]
            vals = torch.stack([torch.stack([(w >> (4 * (reg + 4 * v))) & 0xF for v in range(2)], -1)
                                for reg in range(4)], -2)
        else:
            regs = []
            for reg in range(4):
                w = qw[:, :, :, 2 * kt + reg // 2]
                regs.append(torch.stack([(w >> (8 * (2 * (reg % 2) + v))) & 0xFF for v in range(2)], -1))
            vals = torch.stack(regs, -2)
        vals = (vals - zero).double()
        # Metadata of this k-tile: lanes 4g + role + 2 (kt % 2), word kt // 2.
        # nib_of[r, s, row 16, chunk 8]
        nib_of = torch.zeros(rt, s, 16, 8, dtype=torch.int64)
        for gg in range(8):
            for role in range(2):
                word = meta[:, :, 4 * gg + role + 2 * (kt % 2), kt // 2]
                for i, (row_off, chunk) in enumerate(meta_nibbles[role]):
                    nib_of[:, :, gg + row_off, chunk] = (word >> (4 * i)) & 0xF
        for reg in range(4):
            row = g + 8 * (reg % 2)  # [32]
            chunk = tig + 4 * (reg // 2)
            nib = nib_of[:, :, row, chunk]  # [r, s, 32]
            for v in range(2):
                pos = (nib >> (2 * v)) & 3
                col = torch.arange(s).view(1, s, 1) * ST_COLS + kt * 32 + 4 * chunk.view(1, 1, 32) + pos
                xa = xp[:, col]  # [m, r, s, 32]
                # scale of this k-tile for this row
                slot = kt * layout.gps // 4
                sw = sc[:, :, :, slot][:, :, g]  # [r, s, 32]
                half = ((sw >> (16 * (reg % 2))) & 0xFFFF).to(torch.int16)
                scale = half.view(torch.float16).double()
                contrib = xa * (vals[:, :, :, reg, v] * scale).unsqueeze(0)  # [m, r, s, 32]
                out_row = torch.arange(rt).view(rt, 1) * ROWS + row.view(1, 32)  # [r, 32]
                y.index_add_(1, out_row.reshape(-1), contrib.sum(2).reshape(m, -1))
    return y[:, : layout.n]
