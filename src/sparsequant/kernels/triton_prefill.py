"""Prefill kernel (16-8192 tokens): expand packed 2:4 tiles to dense in registers, then tl.dot.

With many tokens the dense tensor cores are the bottleneck, not the weight bytes, so each
program decodes a [BLOCK_K, BLOCK_N] tile of W^T from the kernel layout (layout.py) straight
into registers - metadata, codes, zero point and scale for all 32 columns of a unit come from
one word each - and hands it to tl.dot with an fp32 accumulator. The decode cost is shared by
BLOCK_M tokens, so large BLOCK_M keeps it small against the matrix work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import _out

from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()


@triton.jit
def _dense_tile(meta_ptr, vals_ptr, sc_ptr, zp_ptr, k, offs_n, U, N, group_units,
                SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """W^T[k, n] for a [BLOCK_K] vector of columns k and [BLOCK_N] rows n, in fp32 (0 where pruned).

    Every element reads its unit's words (threads that share a row block share them through L1);
    see layout.py for the bit fields.
    """
    W: tl.constexpr = BITS // 2
    u = k // 32
    c = k % 32
    j = c // 4
    p = (c % 4)[:, None]
    ok = (u < U)[:, None] & (offs_n < N)[None, :]
    meta = tl.load(meta_ptr + u[:, None] * N + offs_n[None, :], mask=ok, other=0)
    msh = (2 * (j // 2) + 16 * (j % 2))[:, None]
    i0 = (meta >> msh) & 3
    i1 = (meta >> (msh + 8)) & 3
    first = i0 == p
    kept = first | (i1 == p)
    if BITS == 4:
        v = tl.load(vals_ptr + (u * W + j // 4)[:, None] * N + offs_n[None, :], mask=ok, other=0)
        code = (v >> ((4 * (j % 4))[:, None] + tl.where(first, 0, 16))) & 0xF
    else:
        v = tl.load(vals_ptr + (u * W + j // 2)[:, None] * N + offs_n[None, :], mask=ok, other=0)
        code = (v >> ((16 * (j % 2))[:, None] + tl.where(first, 0, 8))) & 0xFF
    g_off = (u // group_units)[:, None] * N + offs_n[None, :]
    sc = tl.load(sc_ptr + g_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZP:
        zf = tl.load(zp_ptr + g_off, mask=ok, other=0).to(tl.float32)
    else:
        zf = SYM_ZERO * 1.0
    # 2**23 + code as a float bit pattern: code -> fp32 in one OR instead of a slow I2F
    cf = (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zf)
    return tl.where(kept, cf * sc, 0.0)


@triton.jit
def _prefill24_kernel(
    x_ptr, meta_ptr, vals_ptr, sc_ptr, zp_ptr, y_ptr,
    M, N, K, U, stride_xm, stride_ym, group_units,
    SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # Grouped program order so that GROUP_M row blocks reuse the same weight tiles from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    BLOCK_K: tl.constexpr = BLOCK_U * 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)

    # Column c of a unit: group j = c // 4, position p = c % 4 (see layout.py for the bit fields).
    # The tile is built as [BLOCK_U, 32, BLOCK_N] so each unit's words are loaded once.
    W: tl.constexpr = BITS // 2
    n_ok = offs_n < N
    col = tl.arange(0, 32)
    j = (col // 4)[None, :, None]
    p = (col % 4)[None, :, None]
    msh = 2 * (j // 2) + 16 * (j % 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for u0 in range(0, U, BLOCK_U):
        k = u0 * 32 + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        u = u0 + tl.arange(0, BLOCK_U)
        w_ok = (u < U)[:, None] & n_ok[None, :]
        meta = tl.load(meta_ptr + u[:, None] * N + offs_n[None, :], mask=w_ok, other=0)[:, None, :]
        i0 = (meta >> msh) & 3
        i1 = (meta >> (msh + 8)) & 3
        first = p == i0
        kept = first | (p == i1)
        v0 = tl.load(vals_ptr + (u * W)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)[:, None, :]
        v1 = tl.load(vals_ptr + (u * W + 1)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)[:, None, :]
        if BITS == 4:
            v = tl.where(j < 4, v0, v1)
            code = (v >> (4 * (j % 4) + tl.where(first, 0, 16))) & 0xF
        else:
            v2 = tl.load(vals_ptr + (u * W + 2)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)[:, None, :]
            v3 = tl.load(vals_ptr + (u * W + 3)[:, None] * N + offs_n[None, :], mask=w_ok, other=0)[:, None, :]
            wi = j // 2
            v = tl.where(wi == 0, v0, tl.where(wi == 1, v1, tl.where(wi == 2, v2, v3)))
            code = (v >> (16 * (j % 2) + tl.where(first, 0, 8))) & 0xFF
        g_off = (u // group_units)[:, None] * N + offs_n[None, :]
        sc = tl.load(sc_ptr + g_off, mask=w_ok, other=0.0).to(tl.float32)[:, None, :]
        if HAS_ZP:
            zf = tl.load(zp_ptr + g_off, mask=w_ok, other=0).to(tl.float32)[:, None, :]
        else:
            zf = SYM_ZERO * 1.0
        # 2**23 + code as a float bit pattern: code -> fp32 with one OR instead of a slow I2F
        cf = (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zf)
        w = tl.reshape(tl.where(kept, cf * sc, 0.0), [BLOCK_K, BLOCK_N])
        if DOT_F32:
            # Triton 3.6's CPU interpreter computes bf16 dots wrongly; it runs them in fp32.
            acc = tl.dot(xt.to(tl.float32), w, acc)
        else:
            acc = tl.dot(xt, w.to(x_ptr.dtype.element_ty), acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _expand24_kernel(meta_ptr, vals_ptr, sc_ptr, zp_ptr, wt_ptr, N, K, U, group_units,
                     SYM_ZERO: tl.constexpr, BITS: tl.constexpr, HAS_ZP: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # W^T [K, N] dense in the activation dtype: for many tokens, expanding once and calling
    # cuBLAS costs one extra pass over a dense weight, small next to the matrix product.
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dense_tile(meta_ptr, vals_ptr, sc_ptr, zp_ptr, k, offs_n, U, N, group_units, SYM_ZERO, BITS, HAS_ZP)
    tl.store(wt_ptr + k[:, None] * N + offs_n[None, :], w.to(wt_ptr.dtype.element_ty),
             mask=(k < K)[:, None] & (offs_n < N)[None, :])


def expand_dense_t(lay, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized weight transposed, ``W^T [K, N]`` in ``dtype`` (for x @ W^T via cuBLAS)."""
    if out is None:
        out = torch.empty(lay.k, lay.n, dtype=dtype, device=lay.meta.device)
    elif out.shape != (lay.k, lay.n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} [{lay.k}, {lay.n}] tensor")
    grid = (triton.cdiv(lay.k, 64), triton.cdiv(lay.n, 128))
    _expand24_kernel[grid](lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales, out,
                           lay.n, lay.k, lay.units, lay.group // 32, SYM_ZERO=lay.sym_zero, BITS=lay.bits,
                           HAS_ZP=lay.zeros is not None, BLOCK_K=64, BLOCK_N=128, num_warps=8)
    return out


def expand_linear(x2d: torch.Tensor, lay) -> torch.Tensor:
    """``x2d @ W^T`` by expanding W into a transient dense buffer and calling cuBLAS.

    fp16 on CUDA uses the inline-PTX expansion (triton_expand.py, ``W [N, K]``); otherwise the
    portable Triton expansion writes ``W^T [K, N]``.
    """
    if x2d.is_cuda and x2d.dtype == torch.float16:
        from .triton_expand import expand_dense_ptx

        return torch.nn.functional.linear(x2d, expand_dense_ptx(lay))
    return x2d @ expand_dense_t(lay, x2d.dtype)



def pick_prefill_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Tile sizes per token count (from the sweep in benchmarks/bench_kernels.py)."""
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        # Few tokens give few programs: narrow the column block until the GPU is covered.
        bn = 64 if triton.cdiv(n, 64) * triton.cdiv(m, bm) >= sms else 32
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_U=2, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_U=2, GROUP_M=8, num_warps=4, num_stages=2)


def prefill_linear(x2d: torch.Tensor, lay, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x2d [M, K] @ W^T`` with the prefill kernel. Output dtype = x dtype."""
    m, k = x2d.shape
    if k != lay.k:
        raise ValueError(f"input has {k} features, the weight expects {lay.k}")
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"prefill kernel needs float16 or bfloat16 activations, got {x2d.dtype}")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    cfg = dict(config or pick_prefill_config(m, lay.n, k))
    y = _out(out, m, lay.n, x2d)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(lay.n, cfg["BLOCK_N"]),)
    _prefill24_kernel[grid](
        x2d, lay.meta, lay.vals, lay.scales, lay.zeros if lay.zeros is not None else lay.scales, y,
        m, lay.n, k, lay.units, x2d.stride(0), y.stride(0), lay.group // 32,
        SYM_ZERO=lay.sym_zero, BITS=lay.bits, HAS_ZP=lay.zeros is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_U=cfg["BLOCK_U"], GROUP_M=cfg["GROUP_M"],
        DOT_F32=not x2d.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y
