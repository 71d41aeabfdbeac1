"""The kernel layout of a quantized 2:4 weight, built once at ``prepare()`` time.

The checkpoint layout (patterns/pack24.py) is compact but costs many integer instructions to
decode per weight. This layout holds the same bits (no extra bytes apart from padding K to a
multiple of 32), arranged so that decoding is a handful of instructions per group of four:

A *unit* is 32 consecutive input columns of one output row: 8 groups of four, 16 kept values.

``meta [U, N] int32`` - one word per unit. For the group pair ``q`` (groups ``2q`` and ``2q+1``)
    the word holds ``r_q << 2q`` where ``r_q`` has ``i0(2q)`` at bits 0-1, ``i1(2q)`` at bits 8-9,
    ``i0(2q+1)`` at bits 16-17 and ``i1(2q+1)`` at bits 24-25. So ``((meta >> 2q) & 0x03030303)
    * 0x22 + 0x10101010`` is, in one multiply-add, two byte-permute selectors that pick the two
    kept fp16 activations of each group out of its four (PRMT in the decode kernel).
``vals [U * W, N] int32`` - W = bits / 2 words per unit (2 for int4, 4 for int8); word ``u*W + h``.
    int4: word h covers groups 4h..4h+3; slot 0 of group ``4h+j`` sits in bits ``4j..4j+3`` and
    slot 1 in bits ``16+4j..19+4j``, so ``(word >> 4j) & 0x000F000F | 0x64006400`` is the fp16
    pair ``(1024 + code0, 1024 + code1)`` (one LOP3).
    int8: word h covers groups 2h, 2h+1 in position order (bytes g0s0, g0s1, g1s0, g1s1);
    ``prmt(word, 0x64646464, 0x4140)`` is the fp16 pair of group 2h.
``scales [GP, N] float16`` and ``zeros [GP, N] uint8`` (asymmetric only) - group-major so a row
    of N is contiguous. Columns past K (padding to a whole unit) hold the zero point.

Every array is N-contiguous: consecutive GPU lanes own consecutive output rows, each lane walks
K, so weight loads are 16-byte coalesced and all lanes of a warp read the same activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..patterns.bits import unpack_bits
from ..patterns.pack24 import unpack_24_indices

UNIT = 32  # input columns per unit


@dataclass
class Nm24Layout:
    n: int
    k: int
    bits: int
    group: int  # columns per scale group as the kernels see it (a multiple of 32)
    units: int  # U = ceil(K / 32)
    meta: torch.Tensor
    vals: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    sym_zero: int

    @property
    def words_per_unit(self) -> int:
        return self.bits // 2

    def nbytes(self) -> int:
        t = [self.meta, self.vals, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(x.numel() * x.element_size() for x in t)


def kernel_group(packed) -> int | None:
    """Scale-group width the kernels use, or None when the format is not supported by them."""
    q = packed.quant
    k = packed.shape[1]
    if q.group_size is None or q.group_size >= k:
        return -(-k // UNIT) * UNIT  # one group spans the (padded) row
    if q.group_size % UNIT:
        return None
    return q.group_size


def build_layout(packed, device) -> Nm24Layout:
    """Rearrange a quantized 'nm24' PackedWeight (int4 or int8 codes) into the kernel layout."""
    if packed.storage != "nm24" or packed.quant is None:
        raise PatternError("the 2:4 kernel layout needs a quantized 'nm24' weight")
    q = packed.quant
    if q.bits not in (4, 8):
        raise PatternError(f"the 2:4 kernels support 4- and 8-bit codes, got {q.bits}")
    g = kernel_group(packed)
    if g is None:
        raise PatternError(f"the 2:4 kernels need a group size that is a multiple of {UNIT}, got {q.group_size}")
    n, k = packed.shape
    dev = torch.device(device)
    meta = packed.tensors["meta"].to(dev)
    codes = unpack_bits(packed.tensors["qweight"].to(dev), q.bits, n * (k // 2)).reshape(n, k // 4, 2)
    idx = unpack_24_indices(meta)  # [N, K/4, 2], validated ascending
    units = -(-k // UNIT)
    pad_groups = units * 8 - k // 4
    if pad_groups:
        # Padding groups keep positions (0, 1) with the zero point as code: weight exactly 0
        # (the kernels also read the activations there as 0).
        if q.symmetric:
            zp = torch.full((n, 1, 1), q.sym_zero, dtype=codes.dtype, device=dev)
        else:
            zp = packed.tensors["zeros"].to(dev)[:, -1:].to(codes.dtype).view(n, 1, 1)
        idx = torch.cat([idx, torch.tensor([0, 1], device=dev).expand(n, pad_groups, 2)], dim=1)
        codes = torch.cat([codes, zp.expand(n, pad_groups, 2)], dim=1)
    idx = idx.reshape(n, units, 4, 2, 2).to(torch.int64)  # [n, u, pair q, member, (i0, i1)]
    codes = codes.reshape(n, units, 8, 2).to(torch.int64)

    # meta: i0 of member e of pair q at bit 2q + 16e, i1 at bit 2q + 16e + 8.
    q_sh = (2 * torch.arange(4, device=dev)).view(1, 1, 4, 1)
    e_sh = (16 * torch.arange(2, device=dev)).view(1, 1, 1, 2)
    m = (idx[..., 0] << (q_sh + e_sh)) | (idx[..., 1] << (q_sh + e_sh + 8))
    meta_w = m.sum(dim=(2, 3))  # disjoint bit fields: sum == or
    if q.bits == 4:
        c = codes.reshape(n, units, 2, 4, 2)  # [n, u, word h, j, slot]
        j_sh = (4 * torch.arange(4, device=dev)).view(1, 1, 1, 4)
        words = ((c[..., 0] << j_sh) | (c[..., 1] << (j_sh + 16))).sum(dim=3)  # [n, u, 2]
    else:
        c = codes.reshape(n, units, 4, 4)  # [n, u, word h, byte]
        b_sh = (8 * torch.arange(4, device=dev)).view(1, 1, 1, 4)
        words = (c << b_sh).sum(dim=3)  # [n, u, 4]
    # Store as int32 bit patterns (values up to 2**32 - 1 wrap to negative int32).
    to_i32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    meta_t = to_i32(meta_w).t().contiguous()  # [U, N]
    vals_t = to_i32(words.reshape(n, units * (q.bits // 2))).t().contiguous()  # [U*W, N]

    groups_kernel = -(-units * UNIT // g)
    scales = packed.tensors["scales"].to(dev).to(torch.float16)
    if scales.shape != (n, q.n_groups(k)):
        raise PatternError(f"scales shape {tuple(scales.shape)} does not fit weight {packed.shape} / {q}")
    sc = torch.zeros(groups_kernel, n, dtype=torch.float16, device=dev)
    sc[: scales.shape[1]] = scales.t()
    zeros = None
    if not q.symmetric:
        zeros = torch.zeros(groups_kernel, n, dtype=torch.uint8, device=dev)
        zeros[: scales.shape[1]] = packed.tensors["zeros"].to(dev).to(torch.uint8).t()
    return Nm24Layout(
        n=n, k=k, bits=q.bits, group=g, units=units, meta=meta_t, vals=vals_t,
        scales=sc.contiguous(), zeros=zeros, sym_zero=q.sym_zero,
    )
