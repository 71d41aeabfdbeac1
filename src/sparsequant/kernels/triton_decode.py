"""Decode kernel (1-16 tokens, dispatched for 1-8): ``y = x @ W^T`` for a quantized 2:4 weight, without expanding W.

At a few tokens the work is a pass over the packed weight (3.1 bits per weight for int4 g128),
so what matters is bytes in flight and instructions per weight. Each lane owns four consecutive
output rows and walks K one *unit* (32 columns, 8 groups of four) at a time; all lanes of a warp
read the same activations (one broadcast 8-byte load per group of four). Per group:

- a byte permute (PRMT) picks the two kept fp16 activations out of the group's four; its
  selector comes out of one multiply-add on the pre-arranged metadata (see layout.py);
- one LOP3 turns two 4-bit codes into the fp16 pair ``1024 + code`` (int8: one PRMT);
- ``sub.f16x2`` (zero point), ``mul.f16x2`` (scale) and ``fma.f16x2`` against the activations.

That is about 8 PTX instructions per group of four weights (about 12 SASS instructions per group
in the compiled loop, with addressing), near the ~13 that the memory system leaves per group at
full bandwidth; on an H100 the kernel reaches 28-52% of the memory roofline at 1 token (see
benchmarks/KERNEL_NOTES.md for why). Products of four groups are summed in fp16 (as the weights
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


# PTX strings as global constexprs: passing them as kernel arguments would hash them per launch.
ASM_I4_0 = tl.constexpr(_ASM[(4, 0)][0])
ASM_I4_1 = tl.constexpr(_ASM[(4, 1)][0])
ASM_I8_0 = tl.constexpr(_ASM[(8, 0)][0])
ASM_I8_1 = tl.constexpr(_ASM[(8, 1)][0])
CONS_I4 = tl.constexpr(_ASM[(4, 0)][1])
CONS_I8 = tl.constexpr(_ASM[(8, 0)][1])


@triton.jit
def _half_unit(meta, v0, v1, s2, z2, sc, zp, x0, x1, x2, x3,
               H: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr):
    """Sum over groups 4H..4H+3 of one unit: w0 * x[i0] + w1 * x[i1] per group (fp32 result)."""
    if USE_ASM:
        if BITS == 4:
            if H == 0:
                part = tl.inline_asm_elementwise(ASM_I4_0, CONS_I4, [meta, v0, s2, z2, x0, x1, x2, x3],
                                                 dtype=tl.float32, is_pure=True, pack=1)
            else:
                part = tl.inline_asm_elementwise(ASM_I4_1, CONS_I4, [meta, v0, s2, z2, x0, x1, x2, x3],
                                                 dtype=tl.float32, is_pure=True, pack=1)
        else:
            if H == 0:
                part = tl.inline_asm_elementwise(ASM_I8_0, CONS_I8, [meta, v0, v1, s2, z2, x0, x1, x2, x3],
                                                 dtype=tl.float32, is_pure=True, pack=1)
            else:
                part = tl.inline_asm_elementwise(ASM_I8_1, CONS_I8, [meta, v0, v1, s2, z2, x0, x1, x2, x3],
                                                 dtype=tl.float32, is_pure=True, pack=1)
    else:
        # The same arithmetic in plain Triton (fp32): bf16, the CPU interpreter, the fallback.
        part = tl.zeros(meta.shape, dtype=tl.float32)
        scf = sc.to(tl.float32)
        for jj in tl.static_range(4):
            j = 4 * H + jj
            sh = 2 * (j // 2) + 16 * (j % 2)
            i0 = ((meta >> sh) & 3).to(tl.int64)
            i1 = ((meta >> (sh + 8)) & 3).to(tl.int64)
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
            part += (c0 - zp).to(tl.float32) * scf * xa + (c1 - zp).to(tl.float32) * scf * xb
    return part


@triton.jit
def _load_weights(meta_ptr, vals_ptr, sc_ptr, zp_ptr, u, u_end, U, N, offs_n, n_ok, group_units,
                  SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
                  BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr):
    """Metadata, scales, zero points and value words of units ``u`` (masked past the range)."""
    W: tl.constexpr = BITS // 2
    ok = ((u < u_end) & (u < U))[:, None] & n_ok[None, :]
    col = offs_n[None, :]
    meta = tl.load(meta_ptr + u[:, None] * N + col, mask=ok, other=0)
    g_off = (u // group_units)[:, None] * N + col
    sc = tl.load(sc_ptr + g_off, mask=ok, other=0.0)
    if HAS_ZP:
        zp = tl.load(zp_ptr + g_off, mask=ok, other=0).to(tl.int32)
    else:
        zp = tl.full([BLOCK_U, BLOCK_N], SYM_ZERO, tl.int32)
    va0 = tl.load(vals_ptr + (u * W)[:, None] * N + col, mask=ok, other=0)
    if BITS == 8:
        va1 = tl.load(vals_ptr + (u * W + 1)[:, None] * N + col, mask=ok, other=0)
        vb0 = tl.load(vals_ptr + (u * W + 2)[:, None] * N + col, mask=ok, other=0)
        vb1 = tl.load(vals_ptr + (u * W + 3)[:, None] * N + col, mask=ok, other=0)
    else:
        vb0 = tl.load(vals_ptr + (u * W + 1)[:, None] * N + col, mask=ok, other=0)
        va1 = va0
        vb1 = vb0
    return meta, sc, zp, va0, va1, vb0, vb1


@triton.jit
def _write_row(y_ptr, part_ptr, out, m, M, N, offs_n, n_ok, pid_s, stride_ym, SPLIT: tl.constexpr):
    """Token row m of this program: straight to y without split-K, else to the partial-sum scratch."""
    if SPLIT == 1:
        tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(part_ptr + (pid_s * M + m) * N + offs_n, out, mask=n_ok)


@triton.jit
def _reduce_split(y_ptr, part_ptr, cnt_ptr, pid_n, M, N, offs_n, n_ok, stride_ym,
                  SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The last program of a column block to arrive adds the SPLIT partial sums and resets the
    counter, so a call is one launch (and can live in a CUDA graph)."""
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if done == SPLIT - 1:
        for m in range(0, M):
            tot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + m * stride_ym + offs_n, tot.to(y_ptr.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _decode24_kernel(
    xw_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N, K4, U, stride_xm, stride_ym, group_units, units_per_split,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, USE_ASM: tl.constexpr, ACT_DTYPE: tl.constexpr,
):
    # Program (pid_n, pid_s): rows [pid_n*BLOCK_N, +BLOCK_N), units [pid_s*units_per_split, +units_per_split).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_u = tl.arange(0, BLOCK_U)
    u_begin = pid_s * units_per_split
    u_end = u_begin + units_per_split

    # Tokens one after another: the program's slice of W (a few KB) stays in L1 after token 0.
    n_it = units_per_split // BLOCK_U
    for m in range(0, M):
        acc = tl.zeros([BLOCK_U, BLOCK_N], dtype=tl.float32)
        # Software pipelining by hand: the weights of step it+1 are loaded before step it is
        # computed, so each warp keeps two steps of loads in flight.
        nxt = _load_weights(meta_ptr, vals_ptr, sc_ptr, zp_ptr, u_begin + offs_u, u_end, U, N, offs_n, n_ok,
                            group_units, SYM_ZERO, BITS, HAS_ZP, BLOCK_U, BLOCK_N)
        for it in range(0, n_it):
            u = u_begin + it * BLOCK_U + offs_u
            u_ok = (u < u_end) & (u < U)
            meta, sc, zp, va0, va1, vb0, vb1 = nxt
            nxt = _load_weights(meta_ptr, vals_ptr, sc_ptr, zp_ptr, u + BLOCK_U, u_end, U, N, offs_n, n_ok,
                                group_units, SYM_ZERO, BITS, HAS_ZP, BLOCK_U, BLOCK_N)
            # fp16 pairs (s, s) and (1024 + z, 1024 + z), once per unit for its 8 groups
            s2 = (sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 0x10001
            z2 = (zp + 0x6400) * 0x10001
            for h in tl.static_range(2):
                # the 4 groups' activations: 8-byte loads, identical across the warp (broadcast)
                g = u * 8 + 4 * h
                x_row = xw_ptr + m * stride_xm + g[:, None]
                x0 = tl.load(x_row + 0, mask=(u_ok & (g + 0 < K4))[:, None], other=0)
                x1 = tl.load(x_row + 1, mask=(u_ok & (g + 1 < K4))[:, None], other=0)
                x2 = tl.load(x_row + 2, mask=(u_ok & (g + 2 < K4))[:, None], other=0)
                x3 = tl.load(x_row + 3, mask=(u_ok & (g + 3 < K4))[:, None], other=0)
                x0 = tl.broadcast_to(x0, [BLOCK_U, BLOCK_N])
                x1 = tl.broadcast_to(x1, [BLOCK_U, BLOCK_N])
                x2 = tl.broadcast_to(x2, [BLOCK_U, BLOCK_N])
                x3 = tl.broadcast_to(x3, [BLOCK_U, BLOCK_N])
                if h == 0:
                    acc += _half_unit(meta, va0, va1, s2, z2, sc, zp, x0, x1, x2, x3, 0, BITS, USE_ASM, ACT_DTYPE)
                else:
                    acc += _half_unit(meta, vb0, vb1, s2, z2, sc, zp, x0, x1, x2, x3, 1, BITS, USE_ASM, ACT_DTYPE)

        _write_row(y_ptr, part_ptr, tl.sum(acc, axis=0), m, M, N, offs_n, n_ok, pid_s, stride_ym, SPLIT)

    if SPLIT > 1:
        _reduce_split(y_ptr, part_ptr, cnt_ptr, pid_n, M, N, offs_n, n_ok, stride_ym, SPLIT, BLOCK_N)


def _out(out, m, n, x2d):
    if out is None:
        return torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    if out.shape != (m, n) or out.dtype != x2d.dtype or out.device != x2d.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous {x2d.dtype} [{m}, {n}] tensor on {x2d.device}")
    return out


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def pick_decode_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Block sizes and split-K for the decode kernel (from the sweep in benchmarks/bench_kernels.py)."""
    block_n = 128 if n >= 128 * 8 else max(16, triton.next_power_of_2(min(n, 128)))
    units = -(-k // 32)
    tiles = -(-n // block_n)
    # Aim for ~4 programs of 4 warps per SM; never split below ~4 units per program.
    split = 1
    while tiles * split < 4 * sms and units // (split * 2) >= 4:
        split *= 2
    block_u = 4 if units // split >= 16 else 2
    return dict(BLOCK_N=block_n, BLOCK_U=block_u, SPLIT=split, num_warps=4)


class DecodeWorkspace:
    """Per-weight split-K counters (zero between calls: the last program resets its own)."""

    def __init__(self, n: int, device):
        self.counters = torch.zeros(-(-n // 16), dtype=torch.int32, device=device)


def activation_words(x2d: torch.Tensor, k: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a decode kernel's input ``[M <= 16, k]`` and return ``(x2d, words)``: the activations
    contiguous and 16-byte aligned, and their int64 view (one word = the 4 activations of a group)."""
    m, kx = x2d.shape
    if kx != k:
        raise ValueError(f"input has {kx} features, the weight expects {k}")
    if m > 16:
        raise ValueError(f"the {kernel} kernel takes at most 16 tokens, got {m}")
    if x2d.dtype not in _TL_DTYPE:
        raise TypeError(f"{kernel} kernel needs float16 or bfloat16 activations, got {x2d.dtype}")
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 16:
        x2d = x2d.clone()
    return x2d, x2d.view(torch.int64)


def resolve_use_asm(use_asm: bool | None, x2d: torch.Tensor) -> bool:
    """The inline-PTX path by default exactly where it can run: float16 activations on CUDA."""
    ok = x2d.is_cuda and x2d.dtype == torch.float16
    if use_asm and not ok:
        raise ValueError("the PTX decode path needs float16 activations on a CUDA device")
    return ok if use_asm is None else bool(use_asm)


def split_buffers(split: int, m: int, n: int, y: torch.Tensor, workspace: DecodeWorkspace | None):
    """``(partial sums, counters)`` for split-K (fresh scratch, the workspace's counters), or
    placeholders the kernel never touches when ``split == 1``."""
    if split == 1:
        return y, y
    if workspace is None:
        workspace = DecodeWorkspace(n, y.device)
    return torch.empty(split * m * n, dtype=torch.float32, device=y.device), workspace.counters


def decode_linear(x2d: torch.Tensor, lay, workspace: DecodeWorkspace | None = None, config: dict | None = None,
                  use_asm: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ W^T`` with the decode kernel; M <= 16. Output dtype = x dtype."""
    x2d, xw = activation_words(x2d, lay.k, "decode")
    m, n = x2d.shape[0], lay.n
    cfg = dict(config or pick_decode_config(m, n, lay.k))
    use_asm = resolve_use_asm(use_asm, x2d)
    y = _out(out, m, n, x2d)
    split = cfg["SPLIT"]
    units_per_split = -(-lay.units // split)
    units_per_split = -(-units_per_split // cfg["BLOCK_U"]) * cfg["BLOCK_U"]
    part, cnt = split_buffers(split, m, n, y, workspace)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    _decode24_kernel[grid](
        xw, lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales,
        y, part, cnt,
        m, n, lay.k // 4, lay.units, xw.stride(0), y.stride(0), lay.group // 32, units_per_split,
        SYM_ZERO=lay.sym_zero, BITS=lay.bits, HAS_ZP=lay.zeros is not None, SPLIT=split,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_U=cfg["BLOCK_U"], USE_ASM=bool(use_asm), ACT_DTYPE=_TL_DTYPE[x2d.dtype],
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return y
