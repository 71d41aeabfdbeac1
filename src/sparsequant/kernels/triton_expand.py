"""Expand a 2:4 weight to dense fp16 ``W [N, K]`` fast (inline PTX), for the many-token path.

With hundreds of tokens the cheapest correct plan is one pass that writes the dense weight and
then cuBLAS. That pass should run at memory speed (2 bytes written per weight), which the plain
Triton expansion (``triton_prefill.expand_dense_t``: a dozen integer ops and selects per weight)
does not. Here one lane expands a whole unit (32 columns of one row) in registers: per group of
four, the fp16 pair ``(w0, w1)`` comes from one LOP3 (int4) or PRMT (int8) plus ``sub``/``mul``
in f16x2, and the dense four ``[.., w0 at i0, w1 at i1, ..]`` are two 64-bit shifts of the two
halves by ``16 * i0`` and ``16 * i1`` (read straight out of the layout's metadata word), OR-ed.
The lane then stores its 64 contiguous bytes. fp16 only (bf16 uses the portable expansion).

``expand_mma_sp`` does the same job for the sparse-tensor-core layout (mma_sp_layout.py), which is
the only layout a prepared weight holds when the mma.sp kernels run (kernels.Nm24State): above
128 tokens (and from 33 on for small weights) expanding it once and calling cuBLAS is faster than
the tiled kernel. It is plain Triton (no PTX), so the CPU interpreter runs exactly what the GPU runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import _load_weights


def _asm_expand_unit(bits: int) -> tuple[str, str]:
    """PTX: outputs $0..$15 = the 16 fp16-pair words of one unit; inputs meta, value words, s2, z2."""
    nv = 2 if bits == 4 else 4
    meta = "$16"
    words = [f"${17 + i}" for i in range(nv)]
    s_op, z_op = f"${17 + nv}", f"${18 + nv}"
    lines = ["{", ".reg .b32 t, w, lo, hi, s0, s1, magic;", ".reg .b64 d0, d1;", "mov.b32 magic, 0x64646464;"]
    for j in range(8):
        if bits == 4:
            word, jj = words[j // 4], j % 4
            if jj:
                lines += [f"shr.b32 t, {word}, {4 * jj};", "lop3.b32 w, t, 0x000F000F, 0x64006400, 0xEA;"]
            else:
                lines += [f"lop3.b32 w, {word}, 0x000F000F, 0x64006400, 0xEA;"]
        else:
            lines += [f"prmt.b32 w, {words[j // 2]}, magic, {'0x4140' if j % 2 == 0 else '0x4342'};"]
        lines += [f"sub.f16x2 w, w, {z_op};", f"mul.f16x2 w, w, {s_op};"]
        sh = 2 * (j // 2) + 16 * (j % 2)  # bit of i0(j) in the metadata word; i1(j) is 8 higher
        lines += [f"shr.b32 s0, {meta}, {sh - 4};" if sh >= 4 else f"shl.b32 s0, {meta}, {4 - sh};",
                  "and.b32 s0, s0, 0x30;",  # 16 * i0
                  f"shr.b32 s1, {meta}, {sh + 4};",
                  "and.b32 s1, s1, 0x30;",  # 16 * i1
                  "and.b32 lo, w, 0xFFFF;",
                  "shr.b32 hi, w, 16;",
                  "cvt.u64.u32 d0, lo;",
                  "cvt.u64.u32 d1, hi;",
                  "shl.b64 d0, d0, s0;",
                  "shl.b64 d1, d1, s1;",
                  "or.b64 d0, d0, d1;",
                  f"mov.b64 {{${2 * j}, ${2 * j + 1}}}, d0;"]
    lines.append("}")
    constraints = ",".join(["=r"] * 16 + ["r"] * (1 + nv + 2))
    return "\n".join(lines), constraints


ASM_EX4 = tl.constexpr(_asm_expand_unit(4)[0])
CONS_EX4 = tl.constexpr(_asm_expand_unit(4)[1])
ASM_EX8 = tl.constexpr(_asm_expand_unit(8)[0])
CONS_EX8 = tl.constexpr(_asm_expand_unit(8)[1])


@triton.jit
def _stack16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15):
    """``[*shape, 16]`` with ``o_i`` at index i, built from joins (one lane keeps all 16).

    tl.join appends its new axis last, so in a tree of joins the first join's choice ends up as
    the most significant index bit: the leaves go in bit-reversed order.
    """
    q0 = tl.join(tl.join(o0, o8), tl.join(o4, o12))
    q1 = tl.join(tl.join(o2, o10), tl.join(o6, o14))
    q2 = tl.join(tl.join(o1, o9), tl.join(o5, o13))
    q3 = tl.join(tl.join(o3, o11), tl.join(o7, o15))
    w = tl.join(tl.join(q0, q1), tl.join(q2, q3))
    return tl.reshape(w, o0.shape + [16])


@triton.jit
def _expand24_ptx_kernel(meta_ptr, vals_ptr, sc_ptr, zp_ptr, w_ptr, N, K2, U, group_units,
                         SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
                         BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr):
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    meta, sc, zp, va0, va1, vb0, vb1 = _load_weights(meta_ptr, vals_ptr, sc_ptr, zp_ptr, u, U, U, N, n, n < N,
                                                     group_units, SYM_ZERO, BITS, HAS_ZP, BLOCK_U, BLOCK_N)
    s2 = (sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
    z2 = (zp + 0x6400) * 0x10001
    if BITS == 4:
        o = tl.inline_asm_elementwise(
            ASM_EX4, CONS_EX4, [meta, va0, vb0, s2, z2],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32,
                   tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    else:
        o = tl.inline_asm_elementwise(
            ASM_EX8, CONS_EX8, [meta, va0, va1, vb0, vb1, s2, z2],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32,
                   tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    w = _stack16(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7],
                 o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15])
    t = tl.arange(0, 16)
    col = (u * 16)[:, None, None] + t[None, None, :]
    ok = (u < U)[:, None, None] & (n < N)[None, :, None] & (col < K2)
    tl.store(w_ptr + n[None, :, None] * K2 + col, w, mask=ok)


def expand_dense_ptx(lay, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fp16 ``W [N, K]`` of the layout (CUDA only)."""
    if out is None:
        out = torch.empty(lay.n, lay.k, dtype=torch.float16, device=lay.meta.device)
    elif out.shape != (lay.n, lay.k) or out.dtype != torch.float16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float16 [{lay.n}, {lay.k}] tensor")
    if not out.is_cuda:
        raise ValueError("the PTX expansion runs on CUDA devices only")
    words = out.view(torch.int32)
    grid = (triton.cdiv(lay.units, 2), triton.cdiv(lay.n, 128))
    _expand24_ptx_kernel[grid](lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales,
                               words, lay.n, lay.k // 2, lay.units, lay.group // 32, SYM_ZERO=lay.sym_zero,
                               BITS=lay.bits, HAS_ZP=lay.zeros is not None, BLOCK_U=2, BLOCK_N=128, num_warps=4)
    return out


# -- the mma.sp layout (mma_sp_layout.py) -> dense W [N, K], fp16 or bf16 -----------------------------

@triton.jit
def _round_bits16(f, OUT_DTYPE: tl.constexpr):
    """The 16-bit pattern of fp32 ``f`` (finite) rounded to nearest-even in OUT_DTYPE, as int32.

    bf16 is rounded with integer ops on the fp32 bits: Triton 3.6's CPU interpreter truncates in
    ``.to(tl.bfloat16)``, so this keeps the interpreter and the GPU bit-identical.
    """
    if OUT_DTYPE == tl.bfloat16:
        u = f.to(tl.int32, bitcast=True)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    else:
        return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _expand_mma_kernel(qw_ptr, meta_ptr, sc_ptr, w_ptr, N, Q, S,
                       GPS: tl.constexpr, BITS: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One element = one chunk (4 columns) of one row: its two kept codes, metadata nibble and
    scale are gathered from the lane that holds them, and the dense four are stored as one 64-bit
    word (the fp16/bf16 pair shifted to positions i0, i1), so a row's chunks are contiguous stores.
    Which lane holds what is mma_sp_layout.py's docstring, inverted.
    """
    n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ok = (n < N)[:, None] & (q < Q)[None, :]
    rt = (n // 16)[:, None]
    h = ((n % 16) // 8)[:, None]  # row g (0) or g + 8 (1) of the lane pair
    g = (n % 8)[:, None]
    s = (q // 32)[None, :]  # super-tile
    kt = ((q % 32) // 8)[None, :]  # k-tile inside it
    c = (q % 8)[None, :]  # chunk inside the k-tile
    tig = c % 4
    cr = c // 4  # chunk tig (0) or 4 + tig (1)
    tile = rt * S + s
    lane = 4 * g + tig
    if BITS == 4:
        # word kt of the lane: A register r = 2 cr + h in nibbles r and r + 4
        word = tl.load(qw_ptr + (tile * 32 + lane) * 4 + kt, mask=ok, other=0)
        sh = 4 * (2 * cr + h)
        c0 = (word >> sh) & 0xF
        c1 = (word >> (sh + 16)) & 0xF
        zero = 8
    else:
        # word 2 kt + cr of the lane: bytes (row g v0, row g v1, row g+8 v0, row g+8 v1)
        word = tl.load(qw_ptr + (tile * 32 + lane) * 8 + 2 * kt + cr, mask=ok, other=0)
        sh = 16 * h
        c0 = (word >> sh) & 0xFF
        c1 = (word >> (sh + 8)) & 0xFF
        zero = 128
    # metadata of (row, chunk): lane 4 g + role + 2 (kt % 2) with role = cr, word kt // 2,
    # nibble 4 h + tig (META_NIBBLES)
    mw = tl.load(meta_ptr + (tile * 32 + 4 * g + cr + 2 * (kt % 2)) * 2 + kt // 2, mask=ok, other=0)
    nib = (mw >> (4 * (4 * h + tig))) & 0xF
    sw = tl.load(sc_ptr + (tile * 8 + g) * GPS + (kt * GPS) // 4, mask=ok, other=0)
    scale = ((sw >> (16 * h)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    # (code - zero) * scale is exact in fp32 (<= 8 + 11 bits): one rounding to the output type,
    # as the tiled kernel's A operand.
    b0 = _round_bits16((c0 - zero).to(tl.float32) * scale, OUT_DTYPE).to(tl.int64)
    b1 = _round_bits16((c1 - zero).to(tl.float32) * scale, OUT_DTYPE).to(tl.int64)
    i0 = (nib & 3).to(tl.int64)
    i1 = (nib >> 2).to(tl.int64)
    out = (b0 << (16 * i0)) | (b1 << (16 * i1))
    tl.store(w_ptr + n[:, None].to(tl.int64) * Q + q[None, :], out, mask=ok)


_OUT_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def expand_mma_sp(lay, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``W [N, K]`` in ``dtype`` (float16 or bfloat16) from an ``MmaSpLayout``."""
    if dtype not in _OUT_TL:
        raise TypeError(f"the mma.sp layout expands to float16 or bfloat16, got {dtype}")
    if lay.k % 4:
        raise ValueError(f"K must be a multiple of 4 for the 64-bit chunk stores, got {lay.k}")
    if out is None:
        out = torch.empty(lay.n, lay.k, dtype=dtype, device=lay.qw.device)
    elif out.shape != (lay.n, lay.k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} [{lay.n}, {lay.k}] tensor")
    q = lay.k // 4
    block_r, block_q = 32, 64
    grid = (triton.cdiv(lay.n, block_r), triton.cdiv(q, block_q))
    _expand_mma_kernel[grid](lay.qw, lay.meta, lay.sc, out.view(torch.int64), lay.n, q, lay.s,
                             GPS=lay.gps, BITS=lay.bits, OUT_DTYPE=_OUT_TL[dtype],
                             BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4)
    return out


def expand_mma_linear(x2d: torch.Tensor, lay) -> torch.Tensor:
    """``x2d @ W^T`` by expanding the mma.sp layout into a transient dense buffer, then cuBLAS."""
    return torch.nn.functional.linear(x2d, expand_mma_sp(lay, x2d.dtype))
