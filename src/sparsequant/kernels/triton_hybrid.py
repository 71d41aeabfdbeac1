"""Triton kernels for hybrid-tile weights (every tile dense or 2:4; layout in hybrid_layout.py).

Decode (1-16 tokens): like triton_decode, each program owns BLOCK_N output rows - inside one tile
row, so every tile it visits has one flag - and a range of tile columns (split-K). Per tile it
reads the flag and the tile's word offsets, then walks the tile's units. A 2:4 tile is one
*sub-unit* per unit: its metadata word picks the two kept activations of each group of four
(triton_decode._half_unit, PTX on fp16). A dense tile is two sub-units per unit, positions (0, 1)
and (2, 3), with constant metadata: the same arithmetic, twice the value words, no metadata read.
The flag thus sets the trip count of the sub-unit loop and where its metadata comes from.
The default variant (``_hybrid_decode_pf_kernel``, ``PREFETCH``) is software-pipelined: it issues
tile t+1's loads before computing tile t (measured faster on an H100; the plain kernel is kept for
comparison and as the simplest statement of the computation).

Many tokens: ``expand_hybrid_t`` writes the dequantized ``W^T [K, N]`` in the activation dtype
(one program per row block and tile column, branch-free on the flag: a dense tile reads sub-unit
``p // 2`` with the constant metadata), then cuBLAS multiplies.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interp_compat
from .hybrid_layout import DENSE_META_A, DENSE_META_B
from .triton_decode import (_TL_DTYPE, DecodeWorkspace, _half_unit, _out, _reduce_split, _write_row,
                            activation_words, resolve_use_asm, split_buffers)

if _interp_compat.interpreting():
    _interp_compat.install()

META_A = tl.constexpr(DENSE_META_A)
META_B = tl.constexpr(DENSE_META_B)


@triton.jit
def _hybrid_decode_kernel(
    xw_ptr, flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K4, U, C, TR, stride_xm, stride_ym, group_units, cols_per_split,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, SPLIT: tl.constexpr,
    UPT: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    W: tl.constexpr = BITS // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ti = (pid_n * BLOCK_N) // TR  # BLOCK_N divides TR: all rows of this program lie in tile row ti
    th = tl.minimum(TR, N - ti * TR)  # rows of this tile row (the last one may be partial)
    rloc = offs_n - ti * TR
    ul = tl.arange(0, BLOCK_U)  # unit within a tile (BLOCK_U = UPT rounded up to a power of two)
    t_begin = pid_s * cols_per_split
    t_end = tl.minimum(t_begin + cols_per_split, C)

    for m in range(0, M):
        acc = tl.zeros([BLOCK_U, BLOCK_N], dtype=tl.float32)
        for t in range(t_begin, t_end):
            tile = ti * C + t
            is24 = tl.load(flags_ptr + tile)
            voff = tl.load(off_ptr + 2 * tile)
            moff = tl.load(off_ptr + 2 * tile + 1)
            u = t * UPT + ul
            u_ok = (ul < UPT) & (u < U)
            ok = u_ok[:, None] & n_ok[None, :]
            g_off = (u // group_units)[:, None] * N + offs_n[None, :]
            sc = tl.load(sc_ptr + g_off, mask=ok, other=0.0)
            if HAS_ZP:
                zp = tl.load(zp_ptr + g_off, mask=ok, other=0).to(tl.int32)
            else:
                zp = tl.full([BLOCK_U, BLOCK_N], SYM_ZERO, tl.int32)
            # fp16 pairs (s, s) and (1024 + z, 1024 + z) for the PTX path (as triton_decode)
            s2 = (sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
            z2 = (zp + 0x6400) * 0x10001
            # the unit's 8 groups of activations, as 8-byte words, shared by every sub-unit
            g = u * 8
            x_row = xw_ptr + m * stride_xm + g[:, None]
            x0 = tl.broadcast_to(tl.load(x_row + 0, mask=(u_ok & (g + 0 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x1 = tl.broadcast_to(tl.load(x_row + 1, mask=(u_ok & (g + 1 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x2 = tl.broadcast_to(tl.load(x_row + 2, mask=(u_ok & (g + 2 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x3 = tl.broadcast_to(tl.load(x_row + 3, mask=(u_ok & (g + 3 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x4 = tl.broadcast_to(tl.load(x_row + 4, mask=(u_ok & (g + 4 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x5 = tl.broadcast_to(tl.load(x_row + 5, mask=(u_ok & (g + 5 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x6 = tl.broadcast_to(tl.load(x_row + 6, mask=(u_ok & (g + 6 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            x7 = tl.broadcast_to(tl.load(x_row + 7, mask=(u_ok & (g + 7 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
            # 2:4 tile: 1 sub-unit per unit with stored metadata; dense tile: 2 with constant metadata
            n_sub = 2 - is24
            for s in range(0, n_sub):
                if is24 != 0:
                    meta = tl.load(meta_ptr + moff + ul[:, None] * th + rloc[None, :], mask=ok, other=0)
                else:
                    meta = tl.zeros([BLOCK_U, BLOCK_N], dtype=tl.int32) + tl.where(s == 0, META_A, META_B)
                base = vals_ptr + voff + ((ul * n_sub + s) * W)[:, None] * th + rloc[None, :]
                va0 = tl.load(base, mask=ok, other=0)
                if BITS == 8:
                    va1 = tl.load(base + th, mask=ok, other=0)
                    vb0 = tl.load(base + 2 * th, mask=ok, other=0)
                    vb1 = tl.load(base + 3 * th, mask=ok, other=0)
                else:
                    vb0 = tl.load(base + th, mask=ok, other=0)
                    va1 = va0
                    vb1 = vb0
                acc += _half_unit(meta, va0, va1, s2, z2, sc, zp, x0, x1, x2, x3, 0, BITS, USE_ASM, ACT_DTYPE)
                acc += _half_unit(meta, vb0, vb1, s2, z2, sc, zp, x4, x5, x6, x7, 1, BITS, USE_ASM, ACT_DTYPE)

        _write_row(y_ptr, part_ptr, tl.sum(acc, axis=0), m, M, N, offs_n, n_ok, pid_s, stride_ym, SPLIT)

    if SPLIT > 1:
        _reduce_split(y_ptr, part_ptr, cnt_ptr, pid_n, M, N, offs_n, n_ok, stride_ym, SPLIT, BLOCK_N)


@triton.jit
def _tile_loads(xw_ptr, flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, m, t, valid, ti, th, rloc,
                offs_n, n_ok, ul, N, K4, U, C, stride_xm, group_units,
                SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, UPT: tl.constexpr,
                BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr):
    """Everything tile ``t`` needs, loaded up front (masked off when not ``valid``): flag,
    metadata, sub-unit 0 words (va*, vb*), sub-unit 1 words (vc*, vd*; dense tiles only),
    scales, zero points, the 8 activation words of each unit."""
    W: tl.constexpr = BITS // 2
    tile = ti * C + t
    is24 = tl.load(flags_ptr + tile, mask=valid, other=1)
    voff = tl.load(off_ptr + 2 * tile, mask=valid, other=0)
    moff = tl.load(off_ptr + 2 * tile + 1, mask=valid, other=0)
    u = t * UPT + ul
    u_ok = (ul < UPT) & (u < U) & valid
    ok = u_ok[:, None] & n_ok[None, :]
    g_off = (u // group_units)[:, None] * N + offs_n[None, :]
    sc = tl.load(sc_ptr + g_off, mask=ok, other=0.0)
    if HAS_ZP:
        zp = tl.load(zp_ptr + g_off, mask=ok, other=0).to(tl.int32)
    else:
        zp = tl.full([BLOCK_U, BLOCK_N], SYM_ZERO, tl.int32)
    meta = tl.load(meta_ptr + moff + ul[:, None] * th + rloc[None, :], mask=ok & (is24 != 0), other=0)
    n_sub = 2 - is24
    base = vals_ptr + voff + ((ul * n_sub) * W)[:, None] * th + rloc[None, :]
    ok1 = ok & (is24 == 0)
    va0 = tl.load(base, mask=ok, other=0)
    vc0 = tl.load(base + W * th, mask=ok1, other=0)
    if BITS == 8:
        va1 = tl.load(base + th, mask=ok, other=0)
        vb0 = tl.load(base + 2 * th, mask=ok, other=0)
        vb1 = tl.load(base + 3 * th, mask=ok, other=0)
        vc1 = tl.load(base + (W + 1) * th, mask=ok1, other=0)
        vd0 = tl.load(base + (W + 2) * th, mask=ok1, other=0)
        vd1 = tl.load(base + (W + 3) * th, mask=ok1, other=0)
    else:
        vb0 = tl.load(base + th, mask=ok, other=0)
        vd0 = tl.load(base + (W + 1) * th, mask=ok1, other=0)
        va1 = va0
        vb1 = vb0
        vc1 = vc0
        vd1 = vd0
    g = u * 8
    x_row = xw_ptr + m * stride_xm + g[:, None]
    x0 = tl.broadcast_to(tl.load(x_row + 0, mask=(u_ok & (g + 0 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x1 = tl.broadcast_to(tl.load(x_row + 1, mask=(u_ok & (g + 1 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x2 = tl.broadcast_to(tl.load(x_row + 2, mask=(u_ok & (g + 2 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x3 = tl.broadcast_to(tl.load(x_row + 3, mask=(u_ok & (g + 3 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x4 = tl.broadcast_to(tl.load(x_row + 4, mask=(u_ok & (g + 4 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x5 = tl.broadcast_to(tl.load(x_row + 5, mask=(u_ok & (g + 5 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x6 = tl.broadcast_to(tl.load(x_row + 6, mask=(u_ok & (g + 6 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    x7 = tl.broadcast_to(tl.load(x_row + 7, mask=(u_ok & (g + 7 < K4))[:, None], other=0), [BLOCK_U, BLOCK_N])
    return is24, meta, va0, va1, vb0, vb1, vc0, vc1, vd0, vd1, sc, zp, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _hybrid_decode_pf_kernel(
    xw_ptr, flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K4, U, C, TR, stride_xm, stride_ym, group_units, cols_per_split,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, SPLIT: tl.constexpr,
    UPT: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr,
):
    # The same computation as _hybrid_decode_kernel, software-pipelined by hand: the loads of tile
    # t+1 (both sub-units' words, the second masked off for 2:4 tiles, so no traffic) are issued
    # before tile t is computed, so each warp keeps two tiles of loads in flight.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ti = (pid_n * BLOCK_N) // TR
    th = tl.minimum(TR, N - ti * TR)
    rloc = offs_n - ti * TR
    ul = tl.arange(0, BLOCK_U)
    t_begin = pid_s * cols_per_split
    t_end = tl.minimum(t_begin + cols_per_split, C)

    for m in range(0, M):
        acc = tl.zeros([BLOCK_U, BLOCK_N], dtype=tl.float32)
        nxt = _tile_loads(xw_ptr, flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, m, t_begin,
                          t_begin < t_end, ti, th, rloc, offs_n, n_ok, ul, N, K4, U, C, stride_xm, group_units,
                          SYM_ZERO, BITS, HAS_ZP, UPT, BLOCK_U, BLOCK_N)
        for t in range(t_begin, t_end):
            is24, meta, va0, va1, vb0, vb1, vc0, vc1, vd0, vd1, sc, zp, x0, x1, x2, x3, x4, x5, x6, x7 = nxt
            nxt = _tile_loads(xw_ptr, flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, m, t + 1,
                              t + 1 < t_end, ti, th, rloc, offs_n, n_ok, ul, N, K4, U, C, stride_xm, group_units,
                              SYM_ZERO, BITS, HAS_ZP, UPT, BLOCK_U, BLOCK_N)
            s2 = (sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
            z2 = (zp + 0x6400) * 0x10001
            # sub-unit 0: the 2:4 tile's own metadata, or positions (0, 1) of a dense tile
            meta0 = tl.where(is24 != 0, meta, META_A)
            acc += _half_unit(meta0, va0, va1, s2, z2, sc, zp, x0, x1, x2, x3, 0, BITS, USE_ASM, ACT_DTYPE)
            acc += _half_unit(meta0, vb0, vb1, s2, z2, sc, zp, x4, x5, x6, x7, 1, BITS, USE_ASM, ACT_DTYPE)
            if is24 == 0:  # dense tile: sub-unit 1, positions (2, 3)
                meta1 = tl.zeros([BLOCK_U, BLOCK_N], dtype=tl.int32) + META_B
                acc += _half_unit(meta1, vc0, vc1, s2, z2, sc, zp, x0, x1, x2, x3, 0, BITS, USE_ASM, ACT_DTYPE)
                acc += _half_unit(meta1, vd0, vd1, s2, z2, sc, zp, x4, x5, x6, x7, 1, BITS, USE_ASM, ACT_DTYPE)
        _write_row(y_ptr, part_ptr, tl.sum(acc, axis=0), m, M, N, offs_n, n_ok, pid_s, stride_ym, SPLIT)

    if SPLIT > 1:
        _reduce_split(y_ptr, part_ptr, cnt_ptr, pid_n, M, N, offs_n, n_ok, stride_ym, SPLIT, BLOCK_N)


@triton.jit
def _hybrid_expand_kernel(
    flags_ptr, off_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, wt_ptr, N, K, U, C, TR, group_units,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, UPT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # W^T [K, N] of one tile column for BLOCK_N rows, one unit (32 columns) at a time: a
    # [32, BLOCK_N] tile per step, stored N-contiguous (coalesced, like the layout's loads).
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    W: tl.constexpr = BITS // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ti = (pid_n * BLOCK_N) // TR
    th = tl.minimum(TR, N - ti * TR)
    rloc = offs_n - ti * TR
    tile = ti * C + t
    is24 = tl.load(flags_ptr + tile)
    voff = tl.load(off_ptr + 2 * tile)
    moff = tl.load(off_ptr + 2 * tile + 1)
    n_sub = 2 - is24
    col = tl.arange(0, 32)
    j = (col // 4)[:, None]  # group within the unit
    p = (col % 4)[:, None]  # position within the group
    msh = 2 * (j // 2) + 16 * (j % 2)
    # dense tile: position p lives in sub-unit p // 2, whose constant metadata keeps (0, 1) / (2, 3)
    sub = tl.where(is24 != 0, 0, p // 2)
    const_meta = tl.where(p < 2, META_A, META_B)
    for ul in range(0, UPT):
        u = t * UPT + ul
        u_ok = u < U
        ok = n_ok & u_ok
        meta = tl.load(meta_ptr + moff + ul * th + rloc, mask=ok & (is24 != 0), other=0)[None, :]
        meta = tl.where(is24 != 0, meta, const_meta)
        i0 = (meta >> msh) & 3
        i1 = (meta >> (msh + 8)) & 3
        first = p == i0
        kept = first | (p == i1)
        if BITS == 4:
            word = (ul * n_sub + sub) * W + j // 4
            shift = 4 * (j % 4) + tl.where(first, 0, 16)
            v = tl.load(vals_ptr + voff + word * th + rloc[None, :], mask=ok[None, :], other=0)
            code = (v >> shift) & 0xF
        else:
            word = (ul * n_sub + sub) * W + j // 2
            shift = 16 * (j % 2) + tl.where(first, 0, 8)
            v = tl.load(vals_ptr + voff + word * th + rloc[None, :], mask=ok[None, :], other=0)
            code = (v >> shift) & 0xFF
        g_off = (u // group_units) * N + offs_n
        sc = tl.load(sc_ptr + g_off, mask=ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ZP:
            zf = tl.load(zp_ptr + g_off, mask=ok, other=0).to(tl.float32)[None, :]
        else:
            zf = SYM_ZERO * 1.0
        # 2**23 + code as a float bit pattern: code -> fp32 with one OR (as triton_prefill)
        cf = (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zf)
        w = tl.where(kept, cf * sc, 0.0)
        k = u * 32 + col
        tl.store(wt_ptr + k[:, None] * N + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
                 mask=(k < K)[:, None] & ok[None, :])


#: Default decode variant: True = software-pipelined (_hybrid_decode_pf_kernel), False = plain.
#: H100, 1 token, 35% (BENCHMARKS.md, '### Hybrid tiles'): pipelined with split 8 was the fastest
#: configuration on all three LLaMA-2-7B shapes (9.2 / 16.7 / 15.5 us vs 10.8 / 17.2 / 16.5 plain).
PREFETCH = True
#: Most split-K programs per row block; each program keeps >= MIN_TILES_PER_SPLIT tile columns so
#: the pipelined loop has tiles to overlap (split 32, one tile per program, was 15-40% slower).
MAX_SPLIT = 8
MIN_TILES_PER_SPLIT = 4


def block_n_for(lay, n_rows: int | None = None) -> int:
    """Largest power of two <= 128 that divides the tile rows (a program stays in one tile row),
    narrowed for small N."""
    b = 128
    while lay.tile_rows % b:
        b //= 2
    n_rows = lay.n if n_rows is None else n_rows
    while b > 16 and b // 2 >= n_rows:
        b //= 2
    return b


def pick_hybrid_decode_config(lay, m: int, sms: int = 132) -> dict:
    """Row block (128 rows where the tile rows allow) and split-K (up to MAX_SPLIT, at least
    MIN_TILES_PER_SPLIT tile columns per program), from the H100 sweep in bench_hybrid.py."""
    block_n = block_n_for(lay)
    split = 1
    while split < MAX_SPLIT and lay.n_tile_cols // (split * 2) >= MIN_TILES_PER_SPLIT:
        split *= 2
    return dict(BLOCK_N=block_n, SPLIT=split, num_warps=4)


def hybrid_decode_linear(x2d: torch.Tensor, lay, workspace: DecodeWorkspace | None = None,
                         config: dict | None = None, use_asm: bool | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ W^T`` with the hybrid decode kernel; M <= 16. Output dtype = x dtype."""
    x2d, xw = activation_words(x2d, lay.k, "hybrid decode")
    m, n = x2d.shape[0], lay.n
    cfg = dict(config or pick_hybrid_decode_config(lay, m))
    if lay.tile_rows % cfg["BLOCK_N"]:
        raise ValueError(f"BLOCK_N {cfg['BLOCK_N']} must divide the tile rows {lay.tile_rows}")
    use_asm = resolve_use_asm(use_asm, x2d)
    y = _out(out, m, n, x2d)
    cols_per_split = -(-lay.n_tile_cols // cfg["SPLIT"])
    split = -(-lay.n_tile_cols // cols_per_split)  # no program without a tile column
    part, cnt = split_buffers(split, m, n, y, workspace)
    upt = lay.units_per_tile
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    kernel = _hybrid_decode_pf_kernel if cfg.get("PREFETCH", PREFETCH) else _hybrid_decode_kernel
    kernel[grid](
        xw, lay.flags, lay.offsets, lay.meta, lay.vals, lay.scales,
        lay.zeros if lay.zeros is not None else lay.scales, y, part, cnt,
        m, n, lay.k // 4, lay.units, lay.n_tile_cols, lay.tile_rows, xw.stride(0), y.stride(0), lay.group // 32,
        cols_per_split,
        SYM_ZERO=lay.sym_zero, BITS=lay.bits, HAS_ZP=lay.zeros is not None, SPLIT=split,
        UPT=upt, BLOCK_U=triton.next_power_of_2(upt), BLOCK_N=cfg["BLOCK_N"],
        USE_ASM=bool(use_asm), ACT_DTYPE=_TL_DTYPE[x2d.dtype],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return y


def expand_hybrid_t(lay, dtype: torch.dtype, out: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """The dequantized weight transposed, ``W^T [K, N]`` in ``dtype``."""
    if out is None:
        out = torch.empty(lay.k, lay.n, dtype=dtype, device=lay.vals.device)
    elif out.shape != (lay.k, lay.n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} [{lay.k}, {lay.n}] tensor")
    bn = block_n or block_n_for(lay)
    if lay.tile_rows % bn:
        raise ValueError(f"block_n {bn} must divide the tile rows {lay.tile_rows}")
    grid = (triton.cdiv(lay.n, bn), lay.n_tile_cols)
    _hybrid_expand_kernel[grid](
        lay.flags, lay.offsets, lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales,
        out, lay.n, lay.k, lay.units, lay.n_tile_cols, lay.tile_rows, lay.group // 32,
        SYM_ZERO=lay.sym_zero, BITS=lay.bits, HAS_ZP=lay.zeros is not None, UPT=lay.units_per_tile,
        BLOCK_N=bn, num_warps=4,
    )
    return out


def hybrid_expand_linear(x2d: torch.Tensor, lay) -> torch.Tensor:
    """``x2d @ W^T`` by expanding W^T into a transient dense buffer, then cuBLAS."""
    if x2d.shape[1] != lay.k:
        raise ValueError(f"input has {x2d.shape[1]} features, the weight expects {lay.k}")
    if x2d.dtype not in _TL_DTYPE:
        raise TypeError(f"hybrid kernels need float16 or bfloat16 activations, got {x2d.dtype}")
    return x2d @ expand_hybrid_t(lay, x2d.dtype)
