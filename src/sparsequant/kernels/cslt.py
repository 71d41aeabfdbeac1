"""W8A8 on 2:4 weights through cuSPARSELt (PyTorch's ``_cslt_compress`` / ``_cslt_sparse_mm``).

Weights: int8 or fp8 e4m3, 2:4 along K, one scale per output channel, compressed once.
Activations: quantized per token at run time by a Triton kernel (int8 or fp8, symmetric).
``y = (xq @ wq^T) * xscale[m] * wscale[n]``: cuSPARSELt applies ``wscale`` as its alpha vector
(one value per output channel) and writes the output dtype; cuSPARSELt has no per-column scale,
so the per-token ``xscale`` is applied by a small Triton epilogue in place.

cuSPARSELt's default algorithm is often far from its best, so the algorithm is searched once per
(N, K, kind, output dtype, token bucket) and cached in memory and on disk. Nothing here searches
while a CUDA graph is being captured (an uncached shape then uses algorithm 0), so a layer can
be captured once the shapes it will see have been run eagerly.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q,
                       QMAX: tl.constexpr, IS_INT: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per token: pass 1 finds |x|max, pass 2 writes the codes (the row stays in L2).
    # Rows M.. (padding up to cuSPARSELt's multiple of 16) get zeros.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_x + k0 + offs, mask=(k0 + offs < K) & (row < M), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    m = tl.max(amax, axis=0)
    scale = tl.where(m > 0, m / QMAX, 1.0)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + offs < K
        v = tl.load(x_ptr + row * stride_x + k0 + offs, mask=ok & (row < M), other=0.0).to(tl.float32) * inv
        if IS_INT:
            # round half away from zero, like torch.round on the ties we can see in practice
            r = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
            q = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)
        else:
            q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * stride_q + k0 + offs, q, mask=ok)
    tl.store(s_ptr + row, scale)


def quantize_per_token(x2d: torch.Tensor, kind: str, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization on the GPU: ``(q [Mp, K], scale [Mp] float32)``.

    ``Mp`` is M rounded up to a multiple of ``pad_to``; padding rows are zero with scale 1.
    """
    if kind not in ("int8", "fp8"):
        raise ValueError(f"activation quantization must be 'int8' or 'fp8', got {kind!r}")
    if x2d.dim() != 2 or x2d.stride(-1) != 1:
        raise ValueError("quantize_per_token needs a 2-D tensor with contiguous rows")
    m, k = x2d.shape
    mp = -(-m // pad_to) * pad_to
    qdt = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    q = torch.empty(mp, k, dtype=qdt, device=x2d.device)
    s = torch.empty(mp, dtype=torch.float32, device=x2d.device)
    if mp:
        _quant_rows_kernel[(mp,)](x2d, q, s, m, k, x2d.stride(0), q.stride(0),
                                 QMAX=127.0 if kind == "int8" else 448.0, IS_INT=kind == "int8",
                                 BLOCK_K=min(4096, triton.next_power_of_2(k)), num_warps=4)
    return q, s


@triton.jit
def _epilogue_kernel(y_ptr, o_ptr, rs_ptr, cs_ptr, M, N, stride_y, stride_o,
                     HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    v = tl.load(y_ptr + rm[:, None] * stride_y + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    v = v * tl.load(rs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_COL:
        v = v * tl.load(cs_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(o_ptr + rm[:, None] * stride_o + rn[None, :], v.to(o_ptr.dtype.element_ty), mask=ok)


def scale_epilogue(y: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``y * row_scale[:, None] (* col_scale[None, :])`` in ``out_dtype`` (in place when it is y's)."""
    m, n = y.shape
    out = y if y.dtype == out_dtype else torch.empty(m, n, dtype=out_dtype, device=y.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 256))
    _epilogue_kernel[grid](y, out, row_scale, row_scale if col_scale is None else col_scale, m, n,
                           y.stride(0), out.stride(0), HAS_COL=col_scale is not None,
                           BLOCK_M=32, BLOCK_N=256, num_warps=4)
    return out


# -- algorithm cache -------------------------------------------------------------------------
_LOCK = threading.Lock()
_ALGS: dict[str, int] = {}
_LOADED = False


def _cache_path() -> Path:
    root = os.environ.get("SPARSEQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsequant")
    return Path(root) / "cslt_algorithms.json"


def _load_cache() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        _ALGS.update({k: int(v) for k, v in json.loads(_cache_path().read_text()).items()})
    except (OSError, ValueError):
        pass


def _save_cache() -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_ALGS, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a search per process


def token_bucket(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


class CsltW8A8:
    """A 2:4 int8/fp8 weight compressed for cuSPARSELt, with per-channel scales."""

    def __init__(self, wq: torch.Tensor, wscale: torch.Tensor, kind: str, out_dtype: torch.dtype):
        if kind not in ("int8", "fp8"):
            raise ValueError(f"kind must be 'int8' or 'fp8', got {kind!r}")
        want = torch.int8 if kind == "int8" else torch.float8_e4m3fn
        if wq.dtype != want or wq.dim() != 2 or not wq.is_cuda:
            raise TypeError(f"{kind} W8A8 needs a 2-D CUDA {want} weight, got {wq.dtype} {tuple(wq.shape)} on {wq.device}")
        n, k = wq.shape
        if n % 16 or k % 16:
            raise ValueError(f"cuSPARSELt needs both weight dimensions divisible by 16, got {n} x {k}")
        if out_dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"output dtype must be float16 or bfloat16, got {out_dtype}")
        self.n, self.k, self.kind, self.out_dtype = n, k, kind, out_dtype
        self.compressed = torch._cslt_compress(wq.contiguous())
        self.wscale = wscale.to(device=wq.device, dtype=torch.float32).contiguous()
        # cuSPARSELt (0.8, H100) takes a per-channel alpha vector for int8 but refuses it for
        # fp8; there the epilogue applies both scales, and the raw product goes through bf16
        # (fp8 products overflow fp16).
        self.alpha = self.wscale if kind == "int8" else None
        self.mm_dtype = out_dtype if kind == "int8" else torch.bfloat16

    def _key(self, m: int) -> str:
        return f"{torch.cuda.get_device_name()}|{self.kind}|{self.n}x{self.k}|{self.out_dtype}|{token_bucket(m)}"

    def algorithm(self, xq_t: torch.Tensor) -> int:
        key = self._key(xq_t.shape[1])
        with _LOCK:
            _load_cache()
            if key in _ALGS:
                return _ALGS[key]
        if torch.cuda.is_current_stream_capturing():
            return 0
        alg = int(torch._cslt_sparse_mm_search(self.compressed, xq_t, alpha=self.alpha,
                                               out_dtype=self.mm_dtype, transpose_result=True))
        with _LOCK:
            _ALGS[key] = alg
            _save_cache()
        return alg

    def mm(self, xq: torch.Tensor, xscale: torch.Tensor) -> torch.Tensor:
        """``(xq @ wq^T) * xscale[:, None] * wscale[None, :]``: [M, N] in out_dtype."""
        xq_t = xq.t()  # [K, M] column-major view, the operand layout cuSPARSELt wants
        alg = self.algorithm(xq_t)
        y = torch._cslt_sparse_mm(self.compressed, xq_t, alpha=self.alpha, out_dtype=self.mm_dtype,
                                  transpose_result=True, alg_id=alg)
        return scale_epilogue(y, xscale, None if self.alpha is not None else self.wscale, self.out_dtype)

    def mm_only(self, xq: torch.Tensor) -> torch.Tensor:
        """The cuSPARSELt product alone (for timing): int8 scaled by wscale, fp8 unscaled."""
        xq_t = xq.t()
        return torch._cslt_sparse_mm(self.compressed, xq_t, alpha=self.alpha, out_dtype=self.mm_dtype,
                                     transpose_result=True, alg_id=self.algorithm(xq_t))

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.shape[-1] != self.k:
            raise ValueError(f"input has {x2d.shape[-1]} features, the weight expects {self.k}")
        m = x2d.shape[0]
        # cuSPARSELt wants the token count a multiple of 16: quantize into a padded buffer.
        xq, xs = quantize_per_token(x2d.contiguous(), self.kind, pad_to=16)
        return self.mm(xq, xs)[:m]


def weight_from_dense(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8/fp8 codes ``[N, K]`` and scales ``[N]`` of a dense (2:4) float weight."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    top = 127.0 if kind == "int8" else 448.0
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    y = w / scale[:, None]
    if kind == "int8":
        q = torch.round(y).clamp_(-127, 127).to(torch.int8)
    else:
        q = y.clamp_(-448, 448).to(torch.float8_e4m3fn)
    return q, scale
