"""Decode kernel (1-4 tokens per pass) that reads the sparse-tensor-core layout (mma_sp_layout.py).

A prepared 2:4 weight on a Hopper GPU holds only the mma.sp layout (kernels.Nm24State), so the
few-token kernel must read it too. One thread owns one *quad* of the layout: the lanes 4g..4g+3 of
a row tile's warp-sized block, i.e. rows g and g + 8 of a 16-row tile times one 128-column
super-tile. Those bytes are contiguous (64 code bytes for int4, 128 for int8, then 32 metadata
bytes elsewhere), so a thread loads them with 16-byte loads and a warp reads 512 contiguous code
bytes per row tile. Per k-tile (32 columns) the thread loads the 64 activation bytes once per
token (the same address for every thread of the program: L1 broadcast) and does for each of its
16 groups of four (2 rows x 8 chunks):

- the PRMT selector of the kept pair, from the mma.sp nibble ``i0 | i1 << 2``: two masks and one
  multiply-add turn four nibbles of a metadata word into index bytes ``i0 | i1 << 4``, and one PRMT
  *lookup* in the constant 0x76543210 turns such a byte into the selector bytes
  ``(0x10 + 0x22 i0, 0x10 + 0x22 i1)`` (1.5 integer-pipe instructions per group, shared by all
  tokens; the byte shifts are IMAD.HI on the FMA pipe, which this kernel leaves idle);
- one LOP3 (int4: nibbles q, q + 4 -> fp16 pair ``1024 + c``; an IMAD.HI shift per two groups) or PRMT
  (int8), then ``sub.f16x2`` (or ``fma.f16x2`` by 1/16 for the high nibble) to the exact code
  minus the zero point, and ``mul.f16x2`` by the row's scale (fp16 path: the weight rounded to
  fp16 once, as the tiled kernel's A operand);
- per token: one PRMT picks the two activations out of the chunk's four, one ``fma.f16x2``.

The fp16 products of one k-tile (8 per half-word) are summed in fp16, converted and added in
fp32. bf16 activations have no fp16 arithmetic: the exact ``c - z`` pair is converted to fp32,
the gathered bf16 pair is widened with a shift and a mask, products and sums are fp32 and the
scale is applied once per k-tile. All this is one inline-PTX block per k-tile (``_asm_ktile``);
the same kernel has a portable path in plain Triton ops (fp32) for the CPU interpreter, and the
PTX itself is checked on the CPU by an instruction-level emulation (tests).

Split-K: with ``n_split > 1`` each program writes fp32 partial sums and the last program of a
row block to arrive (atomic counter) adds them in a fixed order and writes y: one launch,
deterministic, safe inside CUDA graphs (the counter is reset by that program). ``pick_config``
gives each thread two super-tiles. Measured on an H100 (BENCHMARKS.md, "Decode over the mma.sp
layout"): 1 token 2.41x cuBLAS fp16, faster than the tiled mma.sp kernel for K <= 4096, which is
where kernels.Nm24State sends 1 token here; the kernel waits on its loads at low occupancy
(benchmarks/KERNEL_NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interp_compat
from .mma_sp_layout import ROWS as _ROWS
from .mma_sp_layout import ST_COLS as _ST_COLS

if _interp_compat.interpreting():
    _interp_compat.install()

# constexpr copies: jitted code reads only constexpr globals
RED_CHUNK = tl.constexpr(8)  # partial sums read at once by the split-K fix-up
ROWS = tl.constexpr(_ROWS)
ST_COLS = tl.constexpr(_ST_COLS)

#: Tokens one kernel pass handles (more tokens: several passes).
MAX_PASS_TOKENS = 4

_F16_CONST = {
    "Z4": 0x64086408,  # (1024 + 8) x2: int4 zero point in the 1024 + c encoding
    "Z8": 0x64806480,  # (1024 + 128) x2
    "SIXT": 0x2C002C00,  # 1/16 x2 (high nibble: 1024 + 16 c)
    "M72": 0xD480D480,  # -72 x2: (1024 + 16 c) / 16 - 72 = c - 8
}


def _asm_ktile(bits: int, bf16: bool, tokens: int) -> tuple[str, str]:
    """PTX for one k-tile of one quad: returns (asm, constraints).

    Operands: outputs $0..$7 = fp32 accumulators (token t, row half h) at 2 t + h, then inputs:
    8 code words (int4: word kt of lanes tig 0..3, the last four unused; int8: words 2 kt, 2 kt + 1
    of lanes tig 0..3), metadata words of roles 0 and 1 for this k-tile, the scale word, the
    address of the k-tile's first activation of token 0 and the token stride in bytes (64-bit),
    then the 8 accumulators in. Tokens past ``tokens`` pass through.
    """
    n_acc = 2 * MAX_PASS_TOKENS
    c_ops = [f"${n_acc + i}" for i in range(8)]
    m_ops = [f"${n_acc + 8}", f"${n_acc + 9}"]
    s_op, xp_op, xs_op = f"${n_acc + 10}", f"${n_acc + 11}", f"${n_acc + 12}"
    acc_in = [f"${n_acc + 13 + i}" for i in range(n_acc)]
    regs32 = ["T", "t", "a", "b", "xp", "S0", "S1", "K0", "K1"]
    regs32 += [f"Y{r}{eo}" for r in range(2) for eo in "eo"]
    regs32 += [f"P{tig}{q}" for tig in range(4) for q in range(4)]
    regs32 += [f"E{tig}{q}" for tig in range(4) for q in range(4)]
    regs32 += [f"X{t}_{i}" for t in range(tokens) for i in range(16)]
    regs32 += [f"H{t}{h}" for t in range(tokens) for h in range(2)]
    lines = ["{", ".reg .b32 " + ", ".join(regs32) + ";", ".reg .b64 px;", ".reg .b16 h0, h1;",
             ".reg .f32 f0, f1, SF0, SF1;"]
    if bf16:
        lines.append(".reg .f32 " + ", ".join(f"C{tig}{q}{v}" for tig in range(4) for q in range(4) for v in range(2))
                     + ", " + ", ".join(f"F{t}{h}" for t in range(tokens) for h in range(2)) + ";")
    # The integer pipe (LOP3, PRMT, SHF) issues half as fast as the FMA pipe (IMAD) and carries
    # most of this code, so right shifts are written as mul.hi by a power of two (IMAD.HI).
    # Selector index bytes: Y{r}e byte k = i0 | i1 << 4 of nibble 2k, Y{r}o of nibble 2k + 1
    # (i0 + 4 i1 + 3 * 4 i1 per byte, no carries).
    lines.append("mov.b32 T, 0x76543210;")
    for r in range(2):
        m = m_ops[r]
        lines += [f"and.b32 t, {m}, 0x0C0C0C0C;", f"and.b32 a, {m}, 0x0F0F0F0F;", f"mad.lo.u32 Y{r}e, t, 3, a;",
                  f"mul.hi.u32 b, {m}, 0x10000000;", "and.b32 t, b, 0x0C0C0C0C;", "and.b32 a, b, 0x0F0F0F0F;",
                  f"mad.lo.u32 Y{r}o, t, 3, a;"]
    # codes -> exact (c - zero) fp16 pairs P{tig}{q}; q = A register: row half q & 1, chunk half q >> 1
    for tig in range(4):
        if bits == 4:
            w = c_ops[tig]
            lines += [f"lop3.b32 P{tig}0, {w}, 0x000F000F, 0x64006400, 0xEA;",
                      f"lop3.b32 P{tig}1, {w}, 0x00F000F0, 0x64006400, 0xEA;",
                      f"mul.hi.u32 t, {w}, 0x1000000;",
                      f"lop3.b32 P{tig}2, t, 0x000F000F, 0x64006400, 0xEA;",
                      f"lop3.b32 P{tig}3, t, 0x00F000F0, 0x64006400, 0xEA;"]
        else:
            w0, w1 = c_ops[2 * tig], c_ops[2 * tig + 1]
            lines += ["mov.b32 K0, 0x64646464;",
                      f"prmt.b32 P{tig}0, {w0}, K0, 0x4140;", f"prmt.b32 P{tig}1, {w0}, K0, 0x4342;",
                      f"prmt.b32 P{tig}2, {w1}, K0, 0x4140;", f"prmt.b32 P{tig}3, {w1}, K0, 0x4342;"]
    if bits == 4:
        lines += [f"mov.b32 K0, {_F16_CONST['Z4']:#x};"]
        for tig in range(4):
            lines += [f"sub.f16x2 P{tig}0, P{tig}0, K0;", f"sub.f16x2 P{tig}2, P{tig}2, K0;"]
        lines += [f"mov.b32 K0, {_F16_CONST['SIXT']:#x};", f"mov.b32 K1, {_F16_CONST['M72']:#x};"]
        for tig in range(4):
            lines += [f"fma.rn.f16x2 P{tig}1, P{tig}1, K0, K1;", f"fma.rn.f16x2 P{tig}3, P{tig}3, K0, K1;"]
    else:
        lines += [f"mov.b32 K0, {_F16_CONST['Z8']:#x};"]
        lines += [f"sub.f16x2 P{tig}{q}, P{tig}{q}, K0;" for tig in range(4) for q in range(4)]
    if bf16:
        lines += [f"mov.b32 {{h0, h1}}, {s_op};", "cvt.f32.f16 SF0, h0;", "cvt.f32.f16 SF1, h1;"]
        for tig in range(4):
            for q in range(4):
                lines += [f"mov.b32 {{h0, h1}}, P{tig}{q};",
                          f"cvt.f32.f16 C{tig}{q}0, h0;", f"cvt.f32.f16 C{tig}{q}1, h1;"]
    else:
        lines += [f"prmt.b32 S0, {s_op}, {s_op}, 0x1010;", f"prmt.b32 S1, {s_op}, {s_op}, 0x3232;"]
        lines += [f"mul.f16x2 P{tig}{q}, P{tig}{q}, S{q & 1};" for tig in range(4) for q in range(4)]
    # selectors E{tig}{q}: nibble j = 4 h + tig of role word cr (chunk 4 cr + tig, row g + 8 h); one
    # PRMT lookup in T turns index byte (i0, i1) into the selector bytes (0x10 + 0x22 i0, 0x10 + 0x22 i1)
    for tig in range(4):
        for q in range(4):
            h, cr = q & 1, q >> 1
            j = 4 * h + tig
            y, kb = f"Y{cr}{'eo'[j % 2]}", j // 2
            if kb:
                lines += [f"mul.hi.u32 t, {y}, {1 << (32 - 8 * kb):#x};", f"prmt.b32 E{tig}{q}, T, T, t;"]
            else:
                lines.append(f"prmt.b32 E{tig}{q}, T, T, {y};")
    for t in range(tokens):
        lines.append(f"mov.b64 px, {xp_op};" if t == 0 else f"add.s64 px, px, {xs_op};")
        for v in range(4):
            xs = ", ".join(f"X{t}_{4 * v + i}" for i in range(4))
            lines.append(f"ld.global.nc.v4.u32 {{{xs}}}, [px+{16 * v}];")
    for t in range(tokens):
        first = {0: True, 1: True}
        for tig in range(4):
            for q in range(4):
                h, cr = q & 1, q >> 1
                c = tig + 4 * cr
                lines.append(f"prmt.b32 xp, X{t}_{2 * c}, X{t}_{2 * c + 1}, E{tig}{q};")
                if bf16:
                    lines += ["shl.b32 t, xp, 16;", "and.b32 xp, xp, 0xFFFF0000;"]
                    if first[h]:
                        lines.append(f"mul.f32 F{t}{h}, C{tig}{q}0, t;")
                    else:
                        lines.append(f"fma.rn.f32 F{t}{h}, C{tig}{q}0, t, F{t}{h};")
                    lines.append(f"fma.rn.f32 F{t}{h}, C{tig}{q}1, xp, F{t}{h};")
                else:
                    if first[h]:
                        lines.append(f"mul.f16x2 H{t}{h}, P{tig}{q}, xp;")
                    else:
                        lines.append(f"fma.rn.f16x2 H{t}{h}, P{tig}{q}, xp, H{t}{h};")
                first[h] = False
        for h in range(2):
            out, ain = f"${2 * t + h}", acc_in[2 * t + h]
            if bf16:
                lines.append(f"fma.rn.f32 {out}, F{t}{h}, SF{h}, {ain};")
            else:
                lines += [f"mov.b32 {{h0, h1}}, H{t}{h};", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;",
                          "add.f32 f0, f0, f1;", f"add.f32 {out}, {ain}, f0;"]
    for i in range(2 * tokens, n_acc):
        lines.append(f"mov.b32 ${i}, {acc_in[i]};")
    lines.append("}")
    constraints = ",".join(["=f"] * n_acc + ["r"] * 11 + ["l", "l"] + ["f"] * n_acc)
    return "\n".join(lines), constraints


_ASM = {(b, bf, t): _asm_ktile(b, bf, t) for b in (4, 8) for bf in (False, True) for t in range(1, MAX_PASS_TOKENS + 1)}
# PTX strings as global constexprs (kernel arguments would be hashed at every launch).
CONS = tl.constexpr(_ASM[(4, False, 1)][1])
A4H1, A4H2, A4H3, A4H4 = (tl.constexpr(_ASM[(4, False, t)][0]) for t in range(1, 5))
A8H1, A8H2, A8H3, A8H4 = (tl.constexpr(_ASM[(8, False, t)][0]) for t in range(1, 5))
A4B1, A4B2, A4B3, A4B4 = (tl.constexpr(_ASM[(4, True, t)][0]) for t in range(1, 5))
A8B1, A8B2, A8B3, A8B4 = (tl.constexpr(_ASM[(8, True, t)][0]) for t in range(1, 5))
# 16 bytes of weights if the flag is set (a prefetch past the program's last super-tile is not
# issued). WEIGHTS_L1=False: no L1 allocation, so the activations keep L1; True: default
# caching, so the other half of each 32-byte sector (the thread's next 16-byte load) hits L1.
LD4_NA = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $5, 0; "
                      "@p ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4]; }")
LD4_L1 = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $5, 0; @p ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4]; }")


@triton.jit
def _ld4(addr, flag, WEIGHTS_L1: tl.constexpr):
    if WEIGHTS_L1:
        return tl.inline_asm_elementwise(LD4_L1, "=r,=r,=r,=r,l,r", [addr, flag],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(LD4_NA, "=r,=r,=r,=r,l,r", [addr, flag],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _ktile_asm(c0, c1, c2, c3, c4, c5, c6, c7, m0, m1, sw, xa, xs, a0, a1, a2, a3, a4, a5, a6, a7,
               BITS: tl.constexpr, BF16: tl.constexpr, TOKENS: tl.constexpr):
    args = [c0, c1, c2, c3, c4, c5, c6, c7, m0, m1, sw, xa, xs, a0, a1, a2, a3, a4, a5, a6, a7]
    dt: tl.constexpr = (tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32)
    if BITS == 4:
        if BF16:
            if TOKENS == 1:
                r = tl.inline_asm_elementwise(A4B1, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 2:
                r = tl.inline_asm_elementwise(A4B2, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 3:
                r = tl.inline_asm_elementwise(A4B3, CONS, args, dtype=dt, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(A4B4, CONS, args, dtype=dt, is_pure=True, pack=1)
        else:
            if TOKENS == 1:
                r = tl.inline_asm_elementwise(A4H1, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 2:
                r = tl.inline_asm_elementwise(A4H2, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 3:
                r = tl.inline_asm_elementwise(A4H3, CONS, args, dtype=dt, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(A4H4, CONS, args, dtype=dt, is_pure=True, pack=1)
    else:
        if BF16:
            if TOKENS == 1:
                r = tl.inline_asm_elementwise(A8B1, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 2:
                r = tl.inline_asm_elementwise(A8B2, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 3:
                r = tl.inline_asm_elementwise(A8B3, CONS, args, dtype=dt, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(A8B4, CONS, args, dtype=dt, is_pure=True, pack=1)
        else:
            if TOKENS == 1:
                r = tl.inline_asm_elementwise(A8H1, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 2:
                r = tl.inline_asm_elementwise(A8H2, CONS, args, dtype=dt, is_pure=True, pack=1)
            elif TOKENS == 3:
                r = tl.inline_asm_elementwise(A8H3, CONS, args, dtype=dt, is_pure=True, pack=1)
            else:
                r = tl.inline_asm_elementwise(A8H4, CONS, args, dtype=dt, is_pure=True, pack=1)
    return r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]


@triton.jit
def _pair_dot(w, m, x_row, col0, jj, q, tig, sc, zero, ACT_DTYPE: tl.constexpr, BITS: tl.constexpr):
    """Portable path: one kept pair (A register q of lane tig) dotted with one token's activations."""
    if BITS == 4:
        c0 = (w >> (4 * q)) & 0xF
        c1 = (w >> (4 * q + 16)) & 0xF
    else:
        c0 = (w >> (16 * (q % 2))) & 0xFF
        c1 = (w >> (16 * (q % 2) + 8)) & 0xFF
    nib = (m >> (4 * jj)) & 0xF
    xa = tl.load(x_row + col0 + (nib & 3)).to(tl.float32)
    xb = tl.load(x_row + col0 + (nib >> 2)).to(tl.float32)
    return ((c0 - zero).to(tl.float32) * xa + (c1 - zero).to(tl.float32) * xb) * sc


@triton.jit
def _ktile_portable(c0, c1, c2, c3, c4, c5, c6, c7, m0, m1, sw, x_ptr, col_kt, stride_xm,
                    a0, a1, a2, a3, a4, a5, a6, a7,
                    BITS: tl.constexpr, TOKENS: tl.constexpr, ACT_DTYPE: tl.constexpr):
    """The same k-tile in plain Triton ops (fp32): the CPU interpreter and any device without PTX."""
    zero: tl.constexpr = 8 if BITS == 4 else 128
    s0 = (sw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    s1 = ((sw >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    for t in tl.static_range(TOKENS):
        x_row = x_ptr + t * stride_xm + col_kt
        p0 = tl.zeros(s0.shape, tl.float32)
        p1 = tl.zeros(s0.shape, tl.float32)
        for tig in tl.static_range(4):
            for q in tl.static_range(4):
                if BITS == 4:
                    if tig == 0:
                        w = c0
                    elif tig == 1:
                        w = c1
                    elif tig == 2:
                        w = c2
                    else:
                        w = c3
                else:
                    if 2 * tig + q // 2 == 0:
                        w = c0
                    elif 2 * tig + q // 2 == 1:
                        w = c1
                    elif 2 * tig + q // 2 == 2:
                        w = c2
                    elif 2 * tig + q // 2 == 3:
                        w = c3
                    elif 2 * tig + q // 2 == 4:
                        w = c4
                    elif 2 * tig + q // 2 == 5:
                        w = c5
                    elif 2 * tig + q // 2 == 6:
                        w = c6
                    else:
                        w = c7
                if q // 2 == 0:
                    m = m0
                else:
                    m = m1
                col0 = 4 * (tig + 4 * (q // 2))
                if q % 2 == 0:
                    p0 += _pair_dot(w, m, x_row, col0, tig, q, tig, s0, zero, ACT_DTYPE, BITS)
                else:
                    p1 += _pair_dot(w, m, x_row, col0, 4 + tig, q, tig, s1, zero, ACT_DTYPE, BITS)
        if t == 0:
            a0 += p0
            a1 += p1
        elif t == 1:
            a2 += p0
            a3 += p1
        elif t == 2:
            a4 += p0
            a5 += p1
        else:
            a6 += p0
            a7 += p1
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _load_step(qw_ptr, meta_ptr, sc_ptr, tile, g, live, BITS: tl.constexpr, GPS: tl.constexpr,
               USE_ASM: tl.constexpr, WEIGHTS_L1: tl.constexpr):
    """Everything a quad needs of one super-tile (nothing is read where ``live`` is false): code
    words (16 for int4, 32 for int8: lane tig's words at 4 tig / 8 tig, as four-word tuples),
    the 8 metadata words (lane-in-quad l, word j at 2 l + j) and the scale word of each k-tile."""
    WQ: tl.constexpr = BITS  # code words per lane per super-tile
    lane0 = tile * 32 + 4 * g
    if USE_ASM:
        flag = live.to(tl.int32)
        cb = (qw_ptr + lane0 * WQ).to(tl.int64, bitcast=True)
        mb = (meta_ptr + lane0 * 2).to(tl.int64, bitcast=True)
        q0 = _ld4(cb, flag, WEIGHTS_L1)
        q1 = _ld4(cb + 16, flag, WEIGHTS_L1)
        q2 = _ld4(cb + 32, flag, WEIGHTS_L1)
        q3 = _ld4(cb + 48, flag, WEIGHTS_L1)
        if BITS == 8:
            q4 = _ld4(cb + 64, flag, WEIGHTS_L1)
            q5 = _ld4(cb + 80, flag, WEIGHTS_L1)
            q6 = _ld4(cb + 96, flag, WEIGHTS_L1)
            q7 = _ld4(cb + 112, flag, WEIGHTS_L1)
        else:
            q4 = q0
            q5 = q0
            q6 = q0
            q7 = q0
        mA = _ld4(mb, flag, WEIGHTS_L1)
        mB = _ld4(mb + 16, flag, WEIGHTS_L1)
    else:
        cp = qw_ptr + lane0 * WQ
        q0 = (tl.load(cp, mask=live), tl.load(cp + 1, mask=live), tl.load(cp + 2, mask=live), tl.load(cp + 3, mask=live))
        q1 = (tl.load(cp + 4, mask=live), tl.load(cp + 5, mask=live), tl.load(cp + 6, mask=live), tl.load(cp + 7, mask=live))
        q2 = (tl.load(cp + 8, mask=live), tl.load(cp + 9, mask=live), tl.load(cp + 10, mask=live),
              tl.load(cp + 11, mask=live))
        q3 = (tl.load(cp + 12, mask=live), tl.load(cp + 13, mask=live), tl.load(cp + 14, mask=live),
              tl.load(cp + 15, mask=live))
        if BITS == 8:
            q4 = (tl.load(cp + 16, mask=live), tl.load(cp + 17, mask=live), tl.load(cp + 18, mask=live),
                  tl.load(cp + 19, mask=live))
            q5 = (tl.load(cp + 20, mask=live), tl.load(cp + 21, mask=live), tl.load(cp + 22, mask=live),
                  tl.load(cp + 23, mask=live))
            q6 = (tl.load(cp + 24, mask=live), tl.load(cp + 25, mask=live), tl.load(cp + 26, mask=live),
                  tl.load(cp + 27, mask=live))
            q7 = (tl.load(cp + 28, mask=live), tl.load(cp + 29, mask=live), tl.load(cp + 30, mask=live),
                  tl.load(cp + 31, mask=live))
        else:
            q4 = q0
            q5 = q0
            q6 = q0
            q7 = q0
        mp = meta_ptr + lane0 * 2
        mA = (tl.load(mp, mask=live), tl.load(mp + 1, mask=live), tl.load(mp + 2, mask=live), tl.load(mp + 3, mask=live))
        mB = (tl.load(mp + 4, mask=live), tl.load(mp + 5, mask=live), tl.load(mp + 6, mask=live),
              tl.load(mp + 7, mask=live))
    sp = sc_ptr + (tile * 8 + g) * GPS
    sw0 = tl.load(sp, mask=live, other=0)
    if GPS == 1:
        sw = (sw0, sw0, sw0, sw0)
    elif GPS == 2:
        sw2 = tl.load(sp + 1, mask=live, other=0)
        sw = (sw0, sw0, sw2, sw2)
    else:
        sw = (sw0, tl.load(sp + 1, mask=live, other=0), tl.load(sp + 2, mask=live, other=0),
              tl.load(sp + 3, mask=live, other=0))
    return (q0, q1, q2, q3, q4, q5, q6, q7), (mA, mB), sw


@triton.jit
def _ktile(kt: tl.constexpr, q0, q1, q2, q3, q4, q5, q6, q7, mA, mB, sw, x_ptr, col_kt, stride_xm,
           a0, a1, a2, a3, a4, a5, a6, a7,
           BITS: tl.constexpr, TOKENS: tl.constexpr, USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr):
    # code words of k-tile kt for lanes tig 0..3 (int4: word kt; int8: words 2 kt, 2 kt + 1)
    if BITS == 4:
        c0 = q0[kt]
        c1 = q1[kt]
        c2 = q2[kt]
        c3 = q3[kt]
        c4 = c0
        c5 = c0
        c6 = c0
        c7 = c0
    else:
        # lane tig's 8 words are q{2 tig}, q{2 tig + 1}; word 2 kt + hh sits in q{2 tig + kt // 2}[2 (kt % 2) + hh]
        if kt < 2:
            c0 = q0[2 * (kt % 2)]
            c1 = q0[2 * (kt % 2) + 1]
            c2 = q2[2 * (kt % 2)]
            c3 = q2[2 * (kt % 2) + 1]
            c4 = q4[2 * (kt % 2)]
            c5 = q4[2 * (kt % 2) + 1]
            c6 = q6[2 * (kt % 2)]
            c7 = q6[2 * (kt % 2) + 1]
        else:
            c0 = q1[2 * (kt % 2)]
            c1 = q1[2 * (kt % 2) + 1]
            c2 = q3[2 * (kt % 2)]
            c3 = q3[2 * (kt % 2) + 1]
            c4 = q5[2 * (kt % 2)]
            c5 = q5[2 * (kt % 2) + 1]
            c6 = q7[2 * (kt % 2)]
            c7 = q7[2 * (kt % 2) + 1]
    # metadata of k-tile kt: role r at lane-in-quad r + 2 (kt % 2), word kt // 2
    if kt % 2 == 0:
        m0 = mA[kt // 2]
        m1 = mA[2 + kt // 2]
    else:
        m0 = mB[kt // 2]
        m1 = mB[2 + kt // 2]
    if USE_ASM:
        xa = (x_ptr + col_kt).to(tl.int64, bitcast=True) + tl.zeros(sw.shape, tl.int64)
        xs = (stride_xm * 2).to(tl.int64) + tl.zeros(sw.shape, tl.int64)
        return _ktile_asm(c0, c1, c2, c3, c4, c5, c6, c7, m0, m1, sw, xa, xs, a0, a1, a2, a3, a4, a5, a6, a7,
                          BITS, ACT_DTYPE == tl.bfloat16, TOKENS)
    else:
        return _ktile_portable(c0, c1, c2, c3, c4, c5, c6, c7, m0, m1, sw, x_ptr, col_kt, stride_xm,
                               a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, ACT_DTYPE)


@triton.jit
def _after(step, other, zero):
    """``step`` with a false data dependency on every word of ``other`` (``zero`` is 0 at run time)."""
    qs, ms, sw = step
    oq, om, osw = other
    d = osw[0] ^ osw[1] ^ osw[2] ^ osw[3]
    for i in tl.static_range(8):
        d ^= oq[i][0] ^ oq[i][1] ^ oq[i][2] ^ oq[i][3]
    d ^= om[0][0] ^ om[0][1] ^ om[0][2] ^ om[0][3] ^ om[1][0] ^ om[1][1] ^ om[1][2] ^ om[1][3]
    mA, mB = ms
    mA = (mA[0] | (d & zero), mA[1], mA[2], mA[3])
    return qs, (mA, mB), sw


@triton.jit
def _supertile(step, x_ptr, col, stride_xm, a0, a1, a2, a3, a4, a5, a6, a7,
               BITS: tl.constexpr, TOKENS: tl.constexpr, USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr):
    """The four k-tiles of one loaded super-tile (``_load_step``'s result) added to the accumulators."""
    qs, ms, sw = step
    q0, q1, q2, q3, q4, q5, q6, q7 = qs
    mA, mB = ms
    a0, a1, a2, a3, a4, a5, a6, a7 = _ktile(0, q0, q1, q2, q3, q4, q5, q6, q7, mA, mB, sw[0], x_ptr, col, stride_xm,
                                            a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, USE_ASM, ACT_DTYPE)
    a0, a1, a2, a3, a4, a5, a6, a7 = _ktile(1, q0, q1, q2, q3, q4, q5, q6, q7, mA, mB, sw[1], x_ptr, col + 32, stride_xm,
                                            a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, USE_ASM, ACT_DTYPE)
    a0, a1, a2, a3, a4, a5, a6, a7 = _ktile(2, q0, q1, q2, q3, q4, q5, q6, q7, mA, mB, sw[2], x_ptr, col + 64, stride_xm,
                                            a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, USE_ASM, ACT_DTYPE)
    a0, a1, a2, a3, a4, a5, a6, a7 = _ktile(3, q0, q1, q2, q3, q4, q5, q6, q7, mA, mB, sw[3], x_ptr, col + 96, stride_xm,
                                            a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, USE_ASM, ACT_DTYPE)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _store_rows(y_ptr, part_ptr, t, acc, row, ok, pid_s, M, N, stride_ym, SPLIT_K: tl.constexpr):
    if SPLIT_K:
        tl.store(part_ptr + (pid_s * M + t) * N + row, acc, mask=ok)
    else:
        tl.store(y_ptr + t * stride_ym + row, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _decode_mma_kernel(qw_ptr, meta_ptr, sc_ptr, x_ptr, y_ptr, part_ptr, cnt_ptr,
                       N, RT, S, st_per_split, n_split, stride_xm, stride_ym, zero,
                       BITS: tl.constexpr, GPS: tl.constexpr, TOKENS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_RT: tl.constexpr, USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr,
                       PAIR: tl.constexpr, WEIGHTS_L1: tl.constexpr):
    # Program (pid_r, pid_s): row tiles [pid_r * BLOCK_RT, +BLOCK_RT), super-tiles [pid_s * st_per_split, +st_per_split).
    BQ: tl.constexpr = BLOCK_RT * 8
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    quad = pid_r * BQ + tl.arange(0, BQ)
    rt_raw = quad // 8
    rt = tl.minimum(rt_raw, RT - 1)  # quads past the last tile read a valid one and store nothing
    g = quad % 8
    s_begin = pid_s * st_per_split
    s_end = tl.minimum(s_begin + st_per_split, S)
    a0 = tl.zeros([BQ], tl.float32)
    a1 = tl.zeros([BQ], tl.float32)
    a2 = tl.zeros([BQ], tl.float32)
    a3 = tl.zeros([BQ], tl.float32)
    a4 = tl.zeros([BQ], tl.float32)
    a5 = tl.zeros([BQ], tl.float32)
    a6 = tl.zeros([BQ], tl.float32)
    a7 = tl.zeros([BQ], tl.float32)
    on = rt >= 0  # all true
    STEP: tl.constexpr = 2 if PAIR else 1
    for s in range(s_begin, s_end, STEP):
        cur = _load_step(qw_ptr, meta_ptr, sc_ptr, rt * S + s, g, on, BITS, GPS, USE_ASM, WEIGHTS_L1)
        if PAIR:
            # Both super-tiles' weights are requested before either is computed: one memory
            # latency per pair instead of two. ptxas sinks loads whose values are needed only
            # later to just before their use (it did so with a loop-carried prefetch in run 2 and
            # with the second super-tile here), so the first super-tile is made to depend on the
            # second one's words through ``zero`` (a kernel argument, 0 at run time). A last odd
            # super-tile is computed twice, the second time with zero scales (adds exactly 0).
            s2 = tl.minimum(s + 1, s_end - 1)
            nx = _load_step(qw_ptr, meta_ptr, sc_ptr, rt * S + s2, g, on, BITS, GPS, USE_ASM, WEIGHTS_L1)
            cur = _after(cur, nx, zero)
        a0, a1, a2, a3, a4, a5, a6, a7 = _supertile(cur, x_ptr, s * ST_COLS, stride_xm, a0, a1, a2, a3, a4, a5, a6, a7,
                                                    BITS, TOKENS, USE_ASM, ACT_DTYPE)
        if PAIR:
            qs, ms, sw = nx
            keep = s + 1 < s_end
            sw = (tl.where(keep, sw[0], 0), tl.where(keep, sw[1], 0), tl.where(keep, sw[2], 0), tl.where(keep, sw[3], 0))
            a0, a1, a2, a3, a4, a5, a6, a7 = _supertile((qs, ms, sw), x_ptr, s2 * ST_COLS, stride_xm,
                                                        a0, a1, a2, a3, a4, a5, a6, a7, BITS, TOKENS, USE_ASM, ACT_DTYPE)

    row = rt_raw * ROWS + g
    ok0 = (rt_raw < RT) & (row < N)
    ok1 = (rt_raw < RT) & (row + 8 < N)
    M = TOKENS
    _store_rows(y_ptr, part_ptr, 0, a0, row, ok0, pid_s, M, N, stride_ym, SPLIT_K)
    _store_rows(y_ptr, part_ptr, 0, a1, row + 8, ok1, pid_s, M, N, stride_ym, SPLIT_K)
    if TOKENS > 1:
        _store_rows(y_ptr, part_ptr, 1, a2, row, ok0, pid_s, M, N, stride_ym, SPLIT_K)
        _store_rows(y_ptr, part_ptr, 1, a3, row + 8, ok1, pid_s, M, N, stride_ym, SPLIT_K)
    if TOKENS > 2:
        _store_rows(y_ptr, part_ptr, 2, a4, row, ok0, pid_s, M, N, stride_ym, SPLIT_K)
        _store_rows(y_ptr, part_ptr, 2, a5, row + 8, ok1, pid_s, M, N, stride_ym, SPLIT_K)
    if TOKENS > 3:
        _store_rows(y_ptr, part_ptr, 3, a6, row, ok0, pid_s, M, N, stride_ym, SPLIT_K)
        _store_rows(y_ptr, part_ptr, 3, a7, row + 8, ok1, pid_s, M, N, stride_ym, SPLIT_K)

    if SPLIT_K:
        # The last program of this row block adds the partial sums in split order (deterministic)
        # and resets the counter, so a call is one launch and can live in a CUDA graph.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_r, 1, sem="acq_rel")
        if done == n_split - 1:
            rows = pid_r * (BLOCK_RT * ROWS) + tl.arange(0, BLOCK_RT * ROWS)
            r_ok = rows < N
            pp = tl.arange(0, RED_CHUNK)
            for t in tl.static_range(TOKENS):
                tot = tl.zeros([BLOCK_RT * ROWS], dtype=tl.float32)
                # RED_CHUNK partials at a time, all loads in flight together; fixed order of sums
                for p0 in range(0, n_split, RED_CHUNK):
                    p = p0 + pp
                    ptrs = part_ptr + ((p * M + t) * N)[:, None] + rows[None, :]
                    v = tl.load(ptrs, mask=(p < n_split)[:, None] & r_ok[None, :], other=0.0, cache_modifier=".cg")
                    tot += tl.sum(v, axis=0)
                tl.store(y_ptr + t * stride_ym + rows, tot.to(y_ptr.dtype.element_ty), mask=r_ok)
            tl.atomic_xchg(cnt_ptr + pid_r, 0)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def pick_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Row tiles per program and split-K for ``m`` tokens of an ``n x k`` weight: enough threads
    (one quad per thread) for about ``THREADS_PER_SM`` per SM, each walking at least ``MIN_STEPS``
    super-tiles."""
    rt, s = -(-n // _ROWS), -(-k // _ST_COLS)
    quads = rt * 8
    steps = max(MIN_STEPS, -(-quads * s // (THREADS_PER_SM * sms)))
    steps = min(steps, s)
    return dict(BLOCK_RT=BLOCK_RT, SPLIT=-(-s // steps), PAIR=PAIR, WEIGHTS_L1=WEIGHTS_L1)


#: Planner constants (see pick_config) and code variants, from the H100 sweep in
#: benchmarks/bench_decode_mma.py (BENCHMARKS.md).
THREADS_PER_SM = 1024
MIN_STEPS = 2  # run 2: 2 super-tiles per thread was best or within 3% on all five shapes
BLOCK_RT = 16  # 8 and 16 within 3% (run 2), 16 slightly ahead on 3 of 5 shapes
PAIR = False  # run 4: 96 instead of 72 registers cost more occupancy than the second memory wait
WEIGHTS_L1 = True  # run 2: within +-3% either way


class DecodeMmaWorkspace:
    """Split-K arrival counters of one weight (zero between calls: the last program resets its own)."""

    def __init__(self, n: int, device):
        self.counters = torch.zeros(-(-n // _ROWS), dtype=torch.int32, device=device)


def _check_input(x2d: torch.Tensor, lay) -> torch.Tensor:
    from ..errors import SparseQuantError

    if x2d.dim() != 2 or x2d.shape[1] != lay.k:
        raise SparseQuantError(f"decode input must be [M, {lay.k}], got {tuple(x2d.shape)}")
    if x2d.dtype not in _TL_DTYPE:
        raise SparseQuantError(f"the decode kernel needs float16 or bfloat16 activations, got {x2d.dtype}")
    if x2d.device != lay.qw.device:
        raise SparseQuantError(f"input on {x2d.device}, weight on {lay.qw.device}")
    kp = lay.s * _ST_COLS
    # The PTX reads whole k-tiles with 16-byte loads: rows padded to the super-tile with zeros
    # (padding weights are exactly 0, but 0 * garbage could be NaN) and 16-byte aligned.
    if lay.k != kp or not x2d.is_contiguous() or x2d.data_ptr() % 16:
        xp = torch.zeros(x2d.shape[0], kp, dtype=x2d.dtype, device=x2d.device)
        xp[:, : lay.k] = x2d
        x2d = xp
    return x2d


def decode_mma_linear(x2d: torch.Tensor, lay, workspace: DecodeMmaWorkspace | None = None,
                      config: dict | None = None, use_asm: bool | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ W^T`` from an ``MmaSpLayout`` (any M; passes of up to 4 tokens). Output dtype = x's."""
    from ..errors import SparseQuantError

    xin = _check_input(x2d, lay)
    m, n = x2d.shape[0], lay.n
    if out is None:
        out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    elif out.shape != (m, n) or out.dtype != x2d.dtype or out.device != x2d.device or not out.is_contiguous():
        raise SparseQuantError(f"out must be a contiguous {x2d.dtype} [{m}, {n}] tensor on {x2d.device}")
    if m == 0:
        return out
    ok = xin.is_cuda
    if use_asm is None:
        use_asm = ok
    elif use_asm and not ok:
        raise SparseQuantError("the PTX decode path runs on CUDA devices only")
    cfg = dict(config or pick_config(m, n, lay.k))
    block_rt, split = cfg["BLOCK_RT"], max(1, min(int(cfg["SPLIT"]), lay.s))
    st_per_split = -(-lay.s // split)
    split = -(-lay.s // st_per_split)  # no empty programs
    row_progs = -(-lay.rt // block_rt)
    if split > 1:
        if workspace is None:
            workspace = DecodeMmaWorkspace(n, x2d.device)
        if workspace.counters.numel() < row_progs:
            raise SparseQuantError(f"workspace has {workspace.counters.numel()} counters, {row_progs} needed")
        cnt = workspace.counters
    grid = (row_progs, split)
    for t0 in range(0, m, MAX_PASS_TOKENS):
        tk = min(MAX_PASS_TOKENS, m - t0)
        xs, ys = xin[t0:t0 + tk], out[t0:t0 + tk]
        part = torch.empty(split * tk * n, dtype=torch.float32, device=x2d.device) if split > 1 else ys
        _decode_mma_kernel[grid](
            lay.qw, lay.meta, lay.sc, xs, ys, part, cnt if split > 1 else ys,
            n, lay.rt, lay.s, st_per_split, split, xs.stride(0), ys.stride(0), 0,
            BITS=lay.bits, GPS=lay.gps, TOKENS=tk, SPLIT_K=split > 1, BLOCK_RT=block_rt,
            USE_ASM=bool(use_asm), ACT_DTYPE=_TL_DTYPE[x2d.dtype], num_warps=max(1, block_rt * 8 // 32),
            PAIR=bool(cfg.get("PAIR", PAIR)), WEIGHTS_L1=bool(cfg.get("WEIGHTS_L1", WEIGHTS_L1)),
        )
    return out
