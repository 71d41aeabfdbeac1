"""Dense W8A16 matmul (Triton): ``y = x @ (codes * scales[:, None])^T`` with int8 codes and one scale per row.

For the LM head. Once the decoder linears are 2:4 + int4, the fp16 LM head of LLaMA-2-7B (32000 x 4096,
262 MB) is the largest single read of a batch-1 decode step: ~95 us of the ~2 ms step on an H100
(benchmarks/KERNEL_NOTES.md). As int8 rows (the table format of ``nn/embedding.quantize_rows``) it is
half the bytes. The kernel streams ``[BLOCK_N, BLOCK_K]`` code tiles, converts them to the activation
type (exact: 8-bit integers fit fp16's and bf16's significands) and multiplies on the tensor cores with
``tl.dot`` (the token rows padded to 16), accumulating in fp32; the row scale is applied once at the end,
so the only rounding besides fp32 accumulation is the final one to the output type.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  NUM_STAGES: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptr + offs_m[:, None] * sxm + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * swn + (k0 + offs_k)[:, None], mask=n_ok[None, :] & k_ok[:, None],
                    other=0)
        if DOT_F32:
            # Triton 3.6's CPU interpreter computes bf16 dots wrongly; it runs them in fp32.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


#: (max tokens, config); the first bucket holding M is used. The 1-16 token one is the best of the
#: one-token sweep of benchmarks/bench_w8a16.py on an H100 at both 32000 x 4096 and 128256 x 4096
#: (51 and 182 us; 4 stages instead of 3: 60 and 186 us).
CONFIGS = (
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, NUM_STAGES=3, num_warps=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, NUM_STAGES=4, num_warps=4)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, NUM_STAGES=4, num_warps=8)),
)


def config_for(m: int) -> dict:
    for limit, cfg in CONFIGS:
        if limit is None or m <= limit:
            return dict(cfg)
    raise AssertionError("CONFIGS ends with a catch-all")


def w8a16_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """``x [..., K] @ (codes [N, K] int8 * scales [N])^T (+ bias)``, output in x's dtype (fp16/bf16)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"w8a16_linear needs float16 or bfloat16 activations, got {x.dtype}")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D int8 tensor, got {codes.dtype} of {codes.dim()} dims")
    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"scales must have shape [{n}], got {tuple(scales.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    m = x2d.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    cfg = config_for(m) if config is None else dict(config)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _w8a16_kernel[grid](x2d, codes, scales, bias if bias is not None else scales, y, m, n, k,
                        x2d.stride(0), codes.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                        DOT_F32=_interp_compat.interpreting() and x.dtype == torch.bfloat16, **cfg)
    return y.reshape(*lead, n)


@torch.library.custom_op("sparsequant::w8a16_linear", mutates_args=())
def w8a16_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w8a16_linear`` as one opaque op for torch.compile."""
    return w8a16_linear(x, codes, scales, bias)


@w8a16_linear_op.register_fake
def _w8a16_linear_fake(x, codes, scales, bias=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def w8a16_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: dequantize in float32, multiply, round once to x's dtype (any device)."""
    w = codes.float() * scales.float()[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
