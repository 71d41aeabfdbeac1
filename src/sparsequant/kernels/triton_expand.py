"""Expand a 2:4 weight to dense fp16 ``W [N, K]`` fast (inline PTX), for the many-token path.

With hundreds of tokens the cheapest correct plan is one pass that writes the dense weight and
then cuBLAS. That pass should run at memory speed (2 bytes written per weight), which the plain
Triton expansion (``triton_prefill.expand_dense_t``: a dozen integer ops and selects per weight)
does not. Here one lane expands a whole unit (32 columns of one row) in registers: per group of
four, the fp16 pair ``(w0, w1)`` comes from one LOP3 (int4) or PRMT (int8) plus ``sub``/``mul``
in f16x2, and the dense four ``[.., w0 at i0, w1 at i1, ..]`` are two 64-bit shifts of the two
halves by ``16 * i0`` and ``16 * i1`` (read straight out of the layout's metadata word), OR-ed.
The lane then stores its 64 contiguous bytes. fp16 only (bf16 uses the portable expansion).
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
