"""Decode kernel (1-16 tokens): ``y = x @ W^T`` for a quantized 2:4 weight, without expanding W.

At a few tokens the work is a pass over the packed weight (3.1 bits per weight for int4 g128),
so what matters is bytes in flight and instructions per weight. Each lane owns four consecutive
output rows and walks K one *unit* (32 columns, 8 groups of four) at a time; all lanes of a warp
read the same activations (one broadcast 8-byte load per group of four). Per group:

- a byte permute (PRMT) picks the two kept fp16 activations out of the group's four; its
  selector comes out of one multiply-add on the pre-arranged metadata (see layout.py);
- one LOP3 turns two 4-bit codes into the fp16 pair ``1024 + code`` (int8: one PRMT);
- ``sub.f16x2`` (zero point), ``mul.f16x2`` (scale) and ``fma.f16x2`` against the activations.

That is about 8 instructions per group of four weights, under the ~13 that the memory system
leaves per group at full bandwidth. Products of four groups are summed in fp16 (as the weights
are already scaled, these are partial dot products of real magnitude) and then added in fp32.
This path is written as inline PTX; the same kernel has a portable path in plain Triton ops
(fp32 arithmetic) that runs for bf16 activations, under TRITON_INTERPRET=1 and as a fallback.

Split-K: when N / BLOCK_N programs cannot fill the GPU, K is split; each program writes its
partial sums to a scratch buffer and the last one to finish (an atomic counter per column
block) adds them up and writes the output, so one launch does everything and it is safe inside
CUDA graphs (the counter is reset by that last program).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()


def _asm_half_unit(bits: int, half: int) -> tuple[str, str]:
    """PTX for groups 4*half .. 4*half+3 of a unit: returns (asm, constraints).

    Operands: $0 f32 out; $1 meta word; $2 (,$3) value word(s); then scale pair, zero pair,
    then the four groups' activations as 64-bit words (4 fp16 each).
    """
    nv = 1 if bits == 4 else 2
    s_op, z_op = f"${2 + nv}", f"${3 + nv}"
    x_ops = [f"${4 + nv + i}" for i in range(4)]
    lines = [
        "{",
        ".reg .b32 sa, sb, t, w, xp, acc, lo, hi, magic;",
        ".reg .b16 a0, a1;",
        ".reg .f32 f0, f1;",
        # selectors of groups (4h, 4h+1) and (4h+2, 4h+3): one multiply-add per pair
        f"shr.b32 t, $1, {4 * half};",
        "and.b32 t, t, 0x03030303;",
        "mad.lo.u32 sa, t, 0x22, 0x10101010;",
        f"shr.b32 t, $1, {4 * half + 2};",
        "and.b32 t, t, 0x03030303;",
        "mad.lo.u32 sb, t, 0x22, 0x10101010;",
        "mov.b32 magic, 0x64646464;",
    ]
    for jj in range(4):
        sel = "sa" if jj < 2 else "sb"
        lines.append(f"mov.b64 {{lo, hi}}, {x_ops[jj]};")
        if jj % 2:
            lines.append(f"shr.b32 t, {sel}, 16;")
            lines.append("prmt.b32 xp, lo, hi, t;")
        else:
            lines.append(f"prmt.b32 xp, lo, hi, {sel};")
        if bits == 4:
            if jj:
                lines.append(f"shr.b32 t, $2, {4 * jj};")
                lines.append("lop3.b32 w, t, 0x000F000F, 0x64006400, 0xEA;")
            else:
                lines.append("lop3.b32 w, $2, 0x000F000F, 0x64006400, 0xEA;")
        else:
            word = "$2" if jj < 2 else "$3"
            lines.append(f"prmt.b32 w, {word}, magic, {'0x4140' if jj % 2 == 0 else '0x4342'};")
        lines.append(f"sub.f16x2 w, w, {z_op};")
        lines.append(f"mul.f16x2 w, w, {s_op};")
        if jj == 0:
            lines.append("mul.f16x2 acc, w, xp;")
        else:
            lines.append("fma.rn.f16x2 acc, w, xp, acc;")
    lines += [
        "mov.b32 {a0, a1}, acc;",
        "cvt.f32.f16 f0, a0;",
        "cvt.f32.f16 f1, a1;",
        "add.f32 $0, f0, f1;",
        "}",
    ]
    constraints = "=r," + ",".join(["r"] * (1 + nv + 2) + ["l"] * 4)
    return "\n".join(lines), constraints


_ASM = {(b, h): _asm_half_unit(b, h) for b in (4, 8) for h in (0, 1)}


@triton.jit
def _decode24_kernel(
    xw_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K4, U, stride_xm, stride_ym, group_units, units_per_split,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
    USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr,
    ASM_I4_0: tl.constexpr, ASM_I4_1: tl.constexpr, ASM_I8_0: tl.constexpr, ASM_I8_1: tl.constexpr,
    CONS_I4: tl.constexpr, CONS_I8: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    W: tl.constexpr = BITS // 2  # value words per unit
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_u = tl.arange(0, BLOCK_U)

    acc = tl.zeros([BLOCK_M, BLOCK_U, BLOCK_N], dtype=tl.float32)
    u_begin = pid_s * units_per_split
    u_end = u_begin + units_per_split
    for it in range(0, units_per_split // BLOCK_U):
        u = u_begin + it * BLOCK_U + offs_u
        w_ok = ((u < u_end) & (u < U))[:, None] & n_ok[None, :]
        w_off = u[:, None] * N + offs_n[None, :]
        meta = tl.load(meta_ptr + w_off, mask=w_ok, other=0)
        g_off = (u // group_units)[:, None] * N + offs_n[None, :]
        sc = tl.load(sc_ptr + g_off, mask=w_ok, other=0.0)
        if HAS_ZP:
            zp = tl.load(zp_ptr + g_off, mask=w_ok, other=0).to(tl.int32)
        else:
            zp = tl.full([BLOCK_U, BLOCK_N], SYM_ZERO, tl.int32)
        if USE_ASM:
            # fp16 pairs (s, s) and (1024 + z, 1024 + z) once per unit, shared by 8 groups
            s2 = (sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
            z2 = (zp + 0x6400) * 0x10001
            meta3 = tl.broadcast_to(meta[None, :, :], [BLOCK_M, BLOCK_U, BLOCK_N])
            s3 = tl.broadcast_to(s2[None, :, :], [BLOCK_M, BLOCK_U, BLOCK_N])
            z3 = tl.broadcast_to(z2[None, :, :], [BLOCK_M, BLOCK_U, BLOCK_N])
        scf = sc.to(tl.float32)[None, :, :]
        for h in tl.static_range(2):
            # activations of the 4 groups of this half unit: one 8-byte broadcast load each
            gidx = u * 8 + 4 * h
            x_row = xw_ptr + offs_m[:, None, None] * stride_xm + gidx[None, :, None]
            x_ok = m_ok[:, None, None] & (gidx[None, :, None] < K4)
            x0 = tl.load(x_row + 0, mask=x_ok, other=0)
            x1 = tl.load(x_row + 1, mask=x_ok & (gidx[None, :, None] + 1 < K4), other=0)
            x2 = tl.load(x_row + 2, mask=x_ok & (gidx[None, :, None] + 2 < K4), other=0)
            x3 = tl.load(x_row + 3, mask=x_ok & (gidx[None, :, None] + 3 < K4), other=0)
            if BITS == 4:
                v0 = tl.load(vals_ptr + (u * W + h)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)
                v1 = v0
            else:
                v0 = tl.load(vals_ptr + (u * W + 2 * h)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)
                v1 = tl.load(vals_ptr + (u * W + 2 * h + 1)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)
            if USE_ASM:
                xa0 = tl.broadcast_to(x0, [BLOCK_M, BLOCK_U, BLOCK_N])
                xa1 = tl.broadcast_to(x1, [BLOCK_M, BLOCK_U, BLOCK_N])
                xa2 = tl.broadcast_to(x2, [BLOCK_M, BLOCK_U, BLOCK_N])
                xa3 = tl.broadcast_to(x3, [BLOCK_M, BLOCK_U, BLOCK_N])
                va = tl.broadcast_to(v0[None, :, :], [BLOCK_M, BLOCK_U, BLOCK_N])
                if BITS == 4:
                    if h == 0:
                        part = tl.inline_asm_elementwise(
                            ASM_I4_0, CONS_I4, [meta3, va, s3, z3, xa0, xa1, xa2, xa3],
                            dtype=tl.float32, is_pure=True, pack=1)
                    else:
                        part = tl.inline_asm_elementwise(
                            ASM_I4_1, CONS_I4, [meta3, va, s3, z3, xa0, xa1, xa2, xa3],
                            dtype=tl.float32, is_pure=True, pack=1)
                else:
                    vb = tl.broadcast_to(v1[None, :, :], [BLOCK_M, BLOCK_U, BLOCK_N])
                    if h == 0:
                        part = tl.inline_asm_elementwise(
                            ASM_I8_0, CONS_I8, [meta3, va, vb, s3, z3, xa0, xa1, xa2, xa3],
                            dtype=tl.float32, is_pure=True, pack=1)
                    else:
                        part = tl.inline_asm_elementwise(
                            ASM_I8_1, CONS_I8, [meta3, va, vb, s3, z3, xa0, xa1, xa2, xa3],
                            dtype=tl.float32, is_pure=True, pack=1)
                acc += part
            else:
                for jj in tl.static_range(4):
                    j = 4 * h + jj
                    sh = 2 * (j // 2) + 16 * (j % 2)
                    i0 = ((meta >> sh) & 3)[None, :, :].to(tl.int64)
                    i1 = ((meta >> (sh + 8)) & 3)[None, :, :].to(tl.int64)
                    if jj == 0:
                        xg = x0
                    elif jj == 1:
                        xg = x1
                    elif jj == 2:
                        xg = x2
                    else:
                        xg = x3
                    xa = ((xg >> (16 * i0)) & 0xFFFF).to(tl.int16).to(ACT_DTYPE, bitcast=True).to(tl.float32)
                    xb = ((xg >> (16 * i1)) & 0xFFFF).to(tl.int16).to(ACT_DTYPE, bitcast=True).to(tl.float32)
                    if BITS == 4:
                        c0 = (v0 >> (4 * jj)) & 0xF
                        c1 = (v0 >> (16 + 4 * jj)) & 0xF
                    else:
                        if jj < 2:
                            vw = v0
                        else:
                            vw = v1
                        c0 = (vw >> (16 * (jj % 2))) & 0xFF
                        c1 = (vw >> (16 * (jj % 2) + 8)) & 0xFF
                    w0 = (c0 - zp).to(tl.float32)[None, :, :] * scf
                    w1 = (c1 - zp).to(tl.float32)[None, :, :] * scf
                    acc += w0 * xa + w1 * xb

    out = tl.sum(acc, axis=1)
    o_ok = m_ok[:, None] & n_ok[None, :]
    y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=o_ok)
    else:
        p_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_s * BLOCK_M * N + p_off, out, mask=o_ok)
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part_ptr + s * BLOCK_M * N + p_off, mask=o_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + y_off, tot.to(y_ptr.dtype.element_ty), mask=o_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


def _out(out, m, n, x2d):
    if out is None:
        return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if out.shape != (m, n) or out.dtype != x2d.dtype or out.device != x2d.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous {x2d.dtype} [{m}, {n}] tensor on {x2d.device}")
    return out


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def pick_decode_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Block sizes and split-K for the decode kernel (from the sweep in benchmarks/bench_kernels.py)."""
    block_m = max(1, triton.next_power_of_2(m))
    block_n = 128 if n >= 128 * 8 else max(16, triton.next_power_of_2(min(n, 128)))
    block_u = 2 if block_m <= 2 else 1
    units = -(-k // 32)
    tiles = -(-n // block_n)
    # Aim for ~4 programs of 4 warps per SM; never split below ~4 unit-steps per program.
    split = 1
    while tiles * split < 4 * sms and units // (split * 2) >= 4 * block_u:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_U=block_u, SPLIT=split, num_warps=4)


class DecodeWorkspace:
    """Per-weight split-K counters (zero between calls: the last program resets its own)."""

    def __init__(self, n: int, device):
        self.counters = torch.zeros(-(-n // 16), dtype=torch.int32, device=device)


def decode_linear(x2d: torch.Tensor, lay, workspace: DecodeWorkspace | None = None, config: dict | None = None,
                  use_asm: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ W^T`` with the decode kernel; M <= 16. Output dtype = x dtype."""
    m, k = x2d.shape
    if k != lay.k:
        raise ValueError(f"input has {k} features, the weight expects {lay.k}")
    if m > 16:
        raise ValueError(f"the decode kernel takes at most 16 tokens, got {m}")
    if x2d.dtype not in _TL_DTYPE:
        raise TypeError(f"decode kernel needs float16 or bfloat16 activations, got {x2d.dtype}")
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 16:
        x2d = x2d.clone()
    xw = x2d.view(torch.int64)  # one 8-byte word = the 4 activations of one group
    n = lay.n
    cfg = dict(config or pick_decode_config(m, n, k))
    if use_asm is None:
        use_asm = x2d.is_cuda and x2d.dtype == torch.float16
    if use_asm and not (x2d.is_cuda and x2d.dtype == torch.float16):
        raise ValueError("the PTX decode path needs float16 activations on a CUDA device")
    y = _out(out, m, n, x2d)
    split = cfg["SPLIT"]
    units_per_split = -(-lay.units // split)
    units_per_split = -(-units_per_split // cfg["BLOCK_U"]) * cfg["BLOCK_U"]
    if split > 1:
        if workspace is None:
            workspace = DecodeWorkspace(n, x2d.device)
        part = torch.empty(split * cfg["BLOCK_M"] * n, dtype=torch.float32, device=x2d.device)
        cnt = workspace.counters
    else:
        part, cnt = y, y  # unused
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    _decode24_kernel[grid](
        xw, lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales,
        y, part, cnt,
        m, n, k // 4, lay.units, xw.stride(0), y.stride(0), lay.group // 32, units_per_split,
        SYM_ZERO=lay.sym_zero, BITS=lay.bits, HAS_ZP=lay.zeros is not None, SPLIT=split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_U=cfg["BLOCK_U"],
        USE_ASM=bool(use_asm), ACT_DTYPE=_TL_DTYPE[x2d.dtype],
        ASM_I4_0=_ASM[(4, 0)][0], ASM_I4_1=_ASM[(4, 1)][0], ASM_I8_0=_ASM[(8, 0)][0], ASM_I8_1=_ASM[(8, 1)][0],
        CONS_I4=_ASM[(4, 0)][1], CONS_I8=_ASM[(8, 0)][1],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return y
