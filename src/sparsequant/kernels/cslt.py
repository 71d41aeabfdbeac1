"""W8A8 on 2:4 weights through cuSPARSELt: ``y = (xq @ wq^T) * xscale[m] * wscale[n]``.

Weights: int8 or fp8 e4m3, 2:4 along K, one scale per output channel, compressed once.
Activations: quantized per token at run time by one Triton kernel that reads x once.

Backends: the direct binding (``cusparselt.py``: descriptors, plan and workspace built once per
(weight, padded token count), a call is one ``cusparseLtMatmul``), or, when the library cannot be
loaded, PyTorch's ``_cslt_sparse_mm`` (a plan per call), with a warning.

Where the scales go (the direct binding picks the first mode that cuSPARSELt accepts here and that
computes the right numbers on a small probe, once per process):
- ``fused`` (fp8 only, weight scales whose ratios are powers of two, as ``weight_from_dense``
  makes them): the ratios are folded into the fp8 codes (exact but for codes that fall into fp8's
  subnormal range), the weight is cuSPARSELt's structured B, and the alpha vector (one value per
  token) is ``xscale * S``, written by the quantization kernel. No pass besides the product.
  (cuSPARSELt 0.8.0, the one torch 2.11 cu130 ships, refuses an alpha vector for fp8: on the
  H100 fp8 runs ``raw``.)
- ``alpha_w``: the weight is the structured A, the alpha vector is ``wscale`` (per channel);
  the product is written in the output dtype and a Triton pass scales each token in place.
- ``raw``: no alpha vector; the product goes through bf16 (fp8 and int8 products overflow fp16)
  and the Triton pass applies both scales.

The algorithm is searched once per (N, K, kind, output dtype, mode, token bucket) and cached in
memory and on disk (written atomically). Nothing here searches while a CUDA graph is being
captured (an uncached shape then uses the default algorithm), so run each token count once
eagerly before capturing. Diagnostic knobs: ``SPARSEQUANT_CSLT_MODES`` (comma list) restricts
the modes tried, ``SPARSEQUANT_CSLT_SEARCH=0`` skips the search (default algorithm).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..errors import SparseQuantError
from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()

#: Widest row the quantization kernel keeps in registers (one read of x); wider rows take two passes.
ONE_PASS_MAX_K = 16384


class W8A8Error(SparseQuantError, ValueError):
    """An input the W8A8 cuSPARSELt op cannot take (shape, dtype, device)."""


@triton.jit
def _quant_clamp(v, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    # int8: round half away from zero, like the reference; the caller converts to the code type
    if IS_INT:
        v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
    return tl.minimum(tl.maximum(v, -QMAX), QMAX)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, mul, M, K, stride_x, stride_q,
                       QMAX: tl.constexpr, IS_INT: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per token. Rows M.. (padding up to cuSPARSELt's multiple of 16) get zeros.
    # ``s = scale * mul``: mul folds a per-tensor weight scale into cuSPARSELt's alpha vector.
    row = tl.program_id(0)
    live = row < M
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        # the whole row in registers: x is read from memory exactly once
        ok = offs < K
        v = tl.load(x_ptr + row * stride_x + offs, mask=ok & live, other=0.0).to(tl.float32)
        m = tl.max(tl.abs(v), axis=0)
        scale = tl.where(m > 0, m / QMAX, 1.0)
        q = _quant_clamp(v * (1.0 / scale), QMAX, IS_INT)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + row * stride_x + k0 + offs, mask=(k0 + offs < K) & live, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.max(amax, axis=0)
        scale = tl.where(m > 0, m / QMAX, 1.0)
        inv = 1.0 / scale
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + offs < K
            v = tl.load(x_ptr + row * stride_x + k0 + offs, mask=ok & live, other=0.0).to(tl.float32) * inv
            q = _quant_clamp(v, QMAX, IS_INT)
            tl.store(q_ptr + row * stride_q + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row, scale * mul)


def quantize_per_token(x2d: torch.Tensor, kind: str, pad_to: int = 1, scale_mul: float = 1.0,
                       one_pass: bool | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization on the GPU: ``(q [Mp, K], scale [Mp] float32)``.

    ``Mp`` is M rounded up to a multiple of ``pad_to``; padding rows are zero with scale 1.
    The returned scales are multiplied by ``scale_mul``. ``out``: buffers to write into.
    """
    if kind not in ("int8", "fp8"):
        raise W8A8Error(f"activation quantization must be 'int8' or 'fp8', got {kind!r}")
    if x2d.dim() != 2 or x2d.stride(-1) != 1:
        raise W8A8Error("quantize_per_token needs a 2-D tensor with contiguous rows")
    m, k = x2d.shape
    mp = -(-m // pad_to) * pad_to
    qdt = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    if out is None:
        q = torch.empty(mp, k, dtype=qdt, device=x2d.device)
        s = torch.empty(mp, dtype=torch.float32, device=x2d.device)
    else:
        q, s = out
        if q.shape != (mp, k) or q.dtype != qdt or q.stride(-1) != 1 or s.shape != (mp,) or s.dtype != torch.float32:
            raise W8A8Error(f"out must be ([{mp}, {k}] {qdt}, [{mp}] float32)")
    if mp and k:
        if one_pass is None:
            one_pass = k <= ONE_PASS_MAX_K
        block = triton.next_power_of_2(k) if one_pass else min(4096, triton.next_power_of_2(k))
        warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
        _quant_rows_kernel[(mp,)](x2d, q, s, float(scale_mul), m, k, x2d.stride(0), q.stride(0),
                                 QMAX=127.0 if kind == "int8" else 448.0, IS_INT=kind == "int8",
                                 ONE_PASS=bool(one_pass), BLOCK_K=block, num_warps=warps)
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
    if m and n:
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 256))
        _epilogue_kernel[grid](y, out, row_scale, row_scale if col_scale is None else col_scale, m, n,
                               y.stride(0), out.stride(0), HAS_COL=col_scale is not None,
                               BLOCK_M=32, BLOCK_N=256, num_warps=4)
    return out


# -- algorithm cache -------------------------------------------------------------------------
_LOCK = threading.Lock()
_ALGS: dict[str, object] = {}
_LOADED = False


def _cache_path() -> Path:
    root = os.environ.get("SPARSEQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsequant")
    return Path(root) / "cslt_algorithms.json"


def _read_cache_file() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_cache() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    _ALGS.update(_read_cache_file())


def _save_cache() -> None:
    """Merge with what other processes wrote, then replace the file in one rename (never half-written)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_cache_file(), **_ALGS}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a search per process


def cached_algorithm(key: str):
    with _LOCK:
        _load_cache()
        return _ALGS.get(key)


def store_algorithm(key: str, value) -> None:
    with _LOCK:
        _ALGS[key] = value
        _save_cache()


#: cuSPARSELt 0.8's structured descriptor refuses 8-bit matrices with a dimension that is not a
#: multiple of 32 (H100: 528 x 1040 -> status 10, "operation not supported"; 64 x 128 and up pass).
SHAPE_MULTIPLE = 32


def shape_supported(n: int, k: int) -> bool:
    """Can cuSPARSELt take an 8-bit 2:4 weight of ``n`` outputs x ``k`` inputs?"""
    return n > 0 and k > 0 and n % SHAPE_MULTIPLE == 0 and k % SHAPE_MULTIPLE == 0


def token_bucket(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def pad16(m: int) -> int:
    return max(16, -(-m // 16) * 16)


def pow2_ratios(scale: torch.Tensor) -> bool:
    """True when every ``scale / scale.max()`` is an exact power of two (foldable into fp8 codes)."""
    s = scale.detach().float().cpu()
    if s.numel() == 0 or not torch.all(s > 0) or not torch.isfinite(s).all():
        return False
    r = s / s.max()
    mant, _ = torch.frexp(r)
    return bool(torch.all(mant == 0.5))


# -- mode probing (direct binding) -------------------------------------------------------------
_PROBED: dict[tuple, bool] = {}
#: Why a mode was refused, by probe key (for the benchmark's report).
PROBE_ERRORS: dict[tuple, str] = {}
_MODES = {  # name: (orientation, alpha vector)
    "fused": ("weight_b", True),
    "alpha_w": ("weight_a", True),
    "raw": ("weight_a", False),
}


def _probe(lib, kind: str, out_dtype: torch.dtype, mode: str, device: torch.device) -> bool:
    """Does cuSPARSELt accept ``mode`` here, and compute the right numbers with it?"""
    key = (kind, out_dtype, mode, str(device))
    if key in _PROBED:
        return _PROBED[key]
    from . import cusparselt

    ok = False
    orientation, alpha_vec = _MODES[mode]
    n, k, mp = 64, 128, 32
    g = torch.Generator(device="cpu").manual_seed(1234)
    w = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1).argsort(-1) < 2  # random 2 of every 4
    w = (w * keep.reshape(n, k).float())
    x = torch.randn(mp, k, generator=g)
    if kind == "int8":
        wq, xq = (w * 20).round().clamp(-127, 127), (x * 20).round().clamp(-127, 127)
        qt = torch.int8
    else:
        wq, xq = w.to(torch.float8_e4m3fn).float(), x.to(torch.float8_e4m3fn).float()
        qt = torch.float8_e4m3fn
    mm_t = out_dtype if alpha_vec else torch.bfloat16
    alpha = (torch.rand(n if orientation == "weight_a" else mp, generator=g) + 0.5) if alpha_vec else None
    ref = xq.double() @ wq.double().t()
    if alpha is not None:
        ref = ref * (alpha.double()[None, :] if orientation == "weight_a" else alpha.double()[:, None])
    try:
        sm = cusparselt.SparseMatmul(lib, wq.to(qt).to(device), mm_t, orientation, alpha_vec)
        out = torch.full((mp, n), float("nan"), dtype=mm_t, device=device)
        a = alpha.to(device) if alpha is not None else None
        sm.plan(mp).run(xq.to(qt).to(device).contiguous(), out, a)
        torch.cuda.synchronize(device)
        got = out.double().cpu()
        err = ((got - ref).norm() / ref.norm()).item()
        ok = bool(torch.isfinite(got).all()) and err < 2e-2
        if not ok:
            PROBE_ERRORS[key] = f"wrong result: rel. err. {err:.3g}"
    except Exception as exc:  # noqa: BLE001 - refused or failed: this mode is not usable here
        PROBE_ERRORS[key] = f"{type(exc).__name__}: {exc}"
        ok = False
    _PROBED[key] = ok
    return ok


class CsltW8A8:
    """A 2:4 int8/fp8 weight compressed for cuSPARSELt, with per-channel scales.

    ``backend``: "auto" (the direct binding when the library loads, else torch), "lt" or "torch".
    ``modes``: the scale modes to try, in order (direct binding only; see the module docstring).
    """

    def __init__(self, wq: torch.Tensor, wscale: torch.Tensor, kind: str, out_dtype: torch.dtype,
                 backend: str = "auto", modes: tuple[str, ...] | None = None):
        if kind not in ("int8", "fp8"):
            raise W8A8Error(f"kind must be 'int8' or 'fp8', got {kind!r}")
        want = torch.int8 if kind == "int8" else torch.float8_e4m3fn
        if wq.dtype != want or wq.dim() != 2:
            raise W8A8Error(f"{kind} W8A8 needs a 2-D {want} weight, got {wq.dtype} {tuple(wq.shape)}")
        n, k = wq.shape
        if not shape_supported(n, k):
            raise W8A8Error(f"cuSPARSELt takes 8-bit 2:4 weights whose dimensions are multiples of "
                            f"{SHAPE_MULTIPLE}, got {n} x {k} (use the reference path for this layer)")
        if not wq.is_cuda:
            raise W8A8Error(f"the W8A8 weight must be on a CUDA device, got {wq.device}")
        if out_dtype not in (torch.float16, torch.bfloat16):
            raise W8A8Error(f"output dtype must be float16 or bfloat16, got {out_dtype}")
        if wscale.numel() != n:
            raise W8A8Error(f"need one weight scale per output channel ({n}), got {wscale.numel()}")
        if backend not in ("auto", "lt", "torch"):
            raise W8A8Error(f"backend must be 'auto', 'lt' or 'torch', got {backend!r}")
        self.n, self.k, self.kind, self.out_dtype = n, k, kind, out_dtype
        self.device = wq.device
        self.wscale = wscale.to(device=wq.device, dtype=torch.float32).contiguous()
        self.alpha_mul = 1.0
        lib = None
        if backend != "torch":
            from . import cusparselt

            lib = cusparselt.library(warn=True)
            if lib is None and backend == "lt":
                raise W8A8Error(f"cuSPARSELt could not be loaded: {cusparselt.load_error()}")
        if lib is not None:
            self._init_lt(lib, wq, modes, allow_torch=backend == "auto")
        else:
            self._init_torch(wq)

    # -- direct binding ------------------------------------------------------------------------
    def _init_lt(self, lib, wq: torch.Tensor, modes, allow_torch: bool) -> None:
        from . import cusparselt

        self.backend = "lt"
        if modes is None:
            modes = ("fused", "alpha_w", "raw") if self.kind == "fp8" else ("alpha_w", "raw")
            allowed = os.environ.get("SPARSEQUANT_CSLT_MODES")
            if allowed:  # a diagnostic knob: restrict the modes tried
                modes = tuple(m for m in modes if m in allowed.split(","))
        for mode in modes:
            if mode == "fused" and not (self.kind == "fp8" and pow2_ratios(self.wscale)):
                continue
            if _probe(lib, self.kind, self.out_dtype, mode, self.device):
                break
        else:
            msg = (f"cuSPARSELt {'.'.join(map(str, lib.version))} accepts none of the modes {modes} "
                   f"for {self.kind} -> {self.out_dtype} here")
            if not allow_torch:
                raise W8A8Error(msg)
            import warnings

            warnings.warn(msg + "; using torch._cslt_sparse_mm", RuntimeWarning, stacklevel=3)
            self._init_torch(wq)
            return
        self.mode = mode
        orientation, alpha_vec = _MODES[mode]
        w = wq
        if mode == "fused":
            top = self.wscale.max()
            # exact: multiplying fp8 codes by a power of two only moves the exponent (subnormals aside)
            w = (wq.float() * (self.wscale / top)[:, None]).to(torch.float8_e4m3fn)
            self.alpha_mul = float(top)
        self.mm_dtype = self.out_dtype if alpha_vec else torch.bfloat16
        self.sm = cusparselt.SparseMatmul(lib, w, self.mm_dtype, orientation, alpha_vec)
        self._alpha_w = self.wscale if mode == "alpha_w" else None

    def _key(self, mp: int) -> str:
        return (f"lt|{torch.cuda.get_device_name(self.device)}|{self.kind}|{self.n}x{self.k}|{self.out_dtype}|"
                f"{self.mode}|{token_bucket(mp)}")

    def _plan(self, xq: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor | None):
        mp = xq.shape[0]
        p = self.sm._plans.get(mp)
        if p is not None:
            return p
        key = self._key(mp)
        cfg = cached_algorithm(key)
        if isinstance(cfg, dict):
            try:
                return self.sm.plan(mp, cfg)
            except Exception:  # noqa: BLE001 - a config from another library version: search again
                self.sm.drop_plan(mp)
        p = self.sm.plan(mp)
        if not torch.cuda.is_current_stream_capturing() and os.environ.get("SPARSEQUANT_CSLT_SEARCH", "1") != "0":
            store_algorithm(key, p.search(xq, out, alpha))
        return p

    # -- torch fallback ------------------------------------------------------------------------
    def _init_torch(self, wq: torch.Tensor) -> None:
        self.backend, self.mode = "torch", "alpha_w" if self.kind == "int8" else "raw"
        self.compressed = torch._cslt_compress(wq.contiguous())
        # torch's _cslt_sparse_mm takes a per-channel alpha vector for int8 but not for fp8 (0.8, H100)
        self._alpha_w = self.wscale if self.kind == "int8" else None
        self.mm_dtype = self.out_dtype if self.kind == "int8" else torch.bfloat16

    def _torch_algorithm(self, xq_t: torch.Tensor) -> int:
        key = f"{torch.cuda.get_device_name()}|{self.kind}|{self.n}x{self.k}|{self.out_dtype}|{token_bucket(xq_t.shape[1])}"
        alg = cached_algorithm(key)
        if isinstance(alg, int):
            return alg
        if torch.cuda.is_current_stream_capturing():
            return 0
        alg = int(torch._cslt_sparse_mm_search(self.compressed, xq_t, alpha=self._alpha_w,
                                               out_dtype=self.mm_dtype, transpose_result=True))
        store_algorithm(key, alg)
        return alg

    # -- the op ----------------------------------------------------------------------------------
    def quantize(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token codes padded to a multiple of 16 rows, and their scales (times ``alpha_mul``)."""
        return quantize_per_token(x2d, self.kind, pad_to=16, scale_mul=self.alpha_mul)

    def product(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """cuSPARSELt's output alone: fully scaled (fused), scaled by wscale (alpha_w) or raw bf16."""
        mp = xq.shape[0]
        if self.backend == "torch":
            xq_t = xq.t()
            return torch._cslt_sparse_mm(self.compressed, xq_t, alpha=self._alpha_w, out_dtype=self.mm_dtype,
                                         transpose_result=True, alg_id=self._torch_algorithm(xq_t))
        out = torch.empty(mp, self.n, dtype=self.mm_dtype, device=xq.device)
        alpha = xs if self.mode == "fused" else self._alpha_w
        return self._plan(xq, out, alpha).run(xq, out, alpha)

    def mm(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """``(xq @ wq^T) * xscale[:, None] * wscale[None, :]``: [Mp, N] in out_dtype, from ``quantize``'s output."""
        y = self.product(xq, xs)
        if self.mode == "fused":
            return y
        return scale_epilogue(y, xs, None if self.mode == "alpha_w" else self.wscale, self.out_dtype)

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.dim() != 2 or x2d.shape[-1] != self.k:
            raise W8A8Error(f"input must be [tokens, {self.k}], got {tuple(x2d.shape)}")
        if x2d.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x2d.device != self.device:
            raise W8A8Error(f"input must be a float tensor on {self.device}, got {x2d.dtype} on {x2d.device}")
        m = x2d.shape[0]
        if m == 0:
            return torch.empty(0, self.n, dtype=self.out_dtype, device=self.device)
        xq, xs = self.quantize(x2d.contiguous())
        y = self.product(xq, xs)[:m]
        if self.mode == "fused":
            return y
        # the per-token pass touches only the real rows
        return scale_epilogue(y, xs, None if self.mode == "alpha_w" else self.wscale, self.out_dtype)


def weight_from_dense(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8/fp8 codes ``[N, K]`` and scales ``[N]`` of a dense (2:4) float weight.

    fp8 scales are rounded up to the largest scale times a power of two (``pow2_ratios``), so the
    cuSPARSELt op can fold them into the codes and fuse every scale into one product. e4m3 keeps
    the same relative precision at any power-of-two scale, so this costs nothing but the top
    code's range (the largest |w| of a row maps to 224-448 instead of 448).
    """
    w = w.float()
    amax = w.abs().amax(dim=1)
    top = 127.0 if kind == "int8" else 448.0
    if kind == "int8":
        scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale
    if kind != "fp8":
        raise W8A8Error(f"kind must be 'int8' or 'fp8', got {kind!r}")
    ideal = amax / top
    biggest = ideal.max() if ideal.numel() and ideal.max() > 0 else torch.tensor(1.0, device=w.device)
    ideal = torch.where(ideal > 0, ideal, biggest)
    # smallest j >= 0 with biggest * 2^-j >= ideal: the scale never clips the row's largest value
    j = torch.floor(torch.log2(biggest / ideal)).clamp_(min=0)
    scale = biggest * torch.exp2(-j)
    scale = torch.where(scale >= ideal, scale, scale * 2)
    q = (w / scale[:, None]).clamp_(-448, 448).to(torch.float8_e4m3fn)
    return q, scale
