"""SLiM-style low-rank adapters (Mozaffari et al., 2024, arXiv 2410.09615): a rank-r correction of
the compression error, fitted in closed form, stored beside the sparse/quantized weight.

The model computes ``y = W_c x + up (down x)``. The adapter approximates the error
``E = W - W_c`` under SLiM's saliency metric: with ``D = diag(activation RMS)`` the error that
matters for the layer output is ``E D`` (a column of ``E`` meets inputs of that size), and its best
rank-r approximation is the truncated SVD ``(E D)_r``; ``D^-1`` folds it back to weight space. The
saliency is additive and invertible, which is what lets SLiM compute the adapter without training.

Folding back. ``(E D)_r D^-1 = U_r U_r^T E D D^-1 = U_r (U_r^T E)`` with ``U_r`` the top-r left
singular vectors of ``E D``. We compute the right-hand form: the same matrix in exact arithmetic,
but it never divides by an activation RMS, so inputs that were (almost) never active cannot blow
the adapter up. The same identity gives the optional ``saliency="hessian"`` variant: with any
square root ``S`` of ``X^T X / n`` in place of ``D`` the adapter minimizes the layer's mean
squared output error ``||(E - A) X||^2 / n`` exactly (SLiM keeps only the diagonal).

Quantized adapters (``bits``): both factors are quantized symmetrically with groups of
``group_size`` along their reduction dimension (``down [r, K]`` along K, ``up [N, r]`` along r;
an r shorter than a group gives one scale per row), float16 scales, each group's range
clip-searched (``quant/clip_search.py``) under the saliency metric. ``down`` is quantized first,
then ``up`` is refitted by least squares against the quantized ``down`` under the same metric (so
it absorbs most of ``down``'s rounding error) and quantized in turn.

Alternation (``iterations``). SLiM compresses once and fits the adapter once (``iterations=1``,
the default). With more iterations the compressor runs again on ``W - adapter`` (so the
sparse/quantized part no longer spends its capacity on what the adapter captures) and the adapter
is refitted on the new error; the iterate with the lowest saliency-weighted error is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CheckpointError, DataError, NonFiniteWeightError, RecipeError
from ..patterns.bits import pack_bits, unpack_bits
from ..quant import QuantParams, QuantSpec
from ..quant.clip_search import fit_params_searched
from .base import CompressedWeight, LayerStats, check_finite

SALIENCIES = ("rms", "hessian")
DEFAULT_ITERATIONS = 1  # SLiM: one compression, one adapter


@dataclass(frozen=True)
class AdapterSpec:
    """How to fit a low-rank adapter.

    rank: a float in (0, 1] is a ratio of ``min(out, in)`` (rounded down, at least 1; SLiM uses
    0.1); an int >= 1 is an absolute rank. bits: None stores the factors in the checkpoint's
    float dtype; 2..8 quantizes them (symmetric, ``group_size`` along each factor's reduction
    dimension, None = per row). iterations: compress/fit rounds (see module doc).
    saliency: "rms" (SLiM: diagonal activation RMS) or "hessian" (full X^T X).
    """

    rank: float | int = 0.1
    bits: int | None = None
    group_size: int | None = 128
    iterations: int = DEFAULT_ITERATIONS
    saliency: str = "rms"

    def __post_init__(self):
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise RecipeError(f"adapter rank must be a number (0.1 = 10% of min(out, in), 64 = rank 64), got {r!r}")
        if isinstance(r, float):
            if not (math.isfinite(r) and 0.0 < r <= 1.0):
                raise RecipeError(
                    f"adapter rank ratio must be in (0, 1] (a fraction of min(out, in)); got {r!r}. "
                    "Give an integer for an absolute rank"
                )
        elif r < 1:
            raise RecipeError(f"adapter rank must be >= 1 (or a ratio in (0, 1]), got {r!r}")
        if self.bits is not None:
            QuantSpec(bits=self.bits, group_size=self.group_size)  # raises QuantizationError
        elif self.group_size is not None and (isinstance(self.group_size, bool) or
                                              not isinstance(self.group_size, int) or self.group_size < 1):
            raise RecipeError(f"adapter group_size must be a positive integer or None, got {self.group_size!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise RecipeError(f"adapter iterations must be an integer >= 1, got {self.iterations!r}")
        if self.saliency not in SALIENCIES:
            raise RecipeError(f"adapter saliency must be one of {', '.join(SALIENCIES)}, got {self.saliency!r}")

    @property
    def quant(self) -> QuantSpec | None:
        return None if self.bits is None else QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=True)

    @property
    def needs_hessian(self) -> bool:
        return self.saliency == "hessian"

    def rank_for(self, shape: tuple[int, int]) -> int:
        """The rank used for a weight of ``shape`` [out, in]; RecipeError when it does not fit."""
        limit = min(shape)
        if isinstance(self.rank, float):
            # The epsilon keeps 0.29 * 100 at 29 (the product is 28.999999999999996 in binary).
            return max(1, int(self.rank * limit + 1e-9))
        if self.rank > limit:
            raise RecipeError(
                f"adapter rank {self.rank} exceeds min(out, in) = {limit} of a {shape[0]}x{shape[1]} weight; "
                "use a smaller rank or a ratio (e.g. 0.1)"
            )
        return self.rank

    def __str__(self) -> str:
        r = f"r={self.rank:g}" if isinstance(self.rank, float) else f"r={self.rank}"
        q = "" if self.bits is None else f" int{self.bits}" + (f" g{self.group_size}" if self.group_size else "")
        extra = "" if self.iterations == 1 else f" x{self.iterations}"
        return f"lowrank {r}{q}{extra}" + ("" if self.saliency == "rms" else f" {self.saliency}")


@dataclass
class LowRankAdapter:
    """``up [N, r] @ down [r, K]`` added to a compressed weight.

    ``down``/``up`` are float32 and hold exactly the values the checkpoint stores: rounded to
    ``dtype`` when unquantized, the dequantized codes when quantized (``codes``/``params`` set).
    """

    down: torch.Tensor
    up: torch.Tensor
    dtype: torch.dtype = torch.float16
    down_codes: torch.Tensor | None = None
    down_params: QuantParams | None = None
    up_codes: torch.Tensor | None = None
    up_params: QuantParams | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def quant(self) -> QuantSpec | None:
        return None if self.down_params is None else self.down_params.spec

    def dense(self) -> torch.Tensor:
        """``up @ down`` as float32, the single definition the engine and the loader both use.

        The factors are float16/bfloat16 values or small integers times float16 scales, so every
        product is exact in float64; summing there and rounding once to float32 makes the result
        independent of how a BLAS orders the sum, up to float64 rounding, which decides the float32
        result only in rare ties.
        """
        return (self.up.double() @ self.down.double()).float()

    def validate(self, shape: tuple[int, int]) -> "LowRankAdapter":
        n, k = shape
        r = self.rank
        if tuple(self.down.shape) != (r, k) or tuple(self.up.shape) != (n, r):
            raise ValueError(f"adapter factors {tuple(self.up.shape)} @ {tuple(self.down.shape)} do not fit {shape}")
        if not (torch.isfinite(self.down).all() and torch.isfinite(self.up).all()):
            raise NonFiniteWeightError("low-rank adapter holds NaN or Inf")
        for codes, params, factor in ((self.down_codes, self.down_params, self.down),
                                      (self.up_codes, self.up_params, self.up)):
            if (codes is None) != (params is None):
                raise ValueError("a quantized adapter factor needs both codes and params")
            if codes is not None and not torch.equal(params.dequantize(codes), factor):
                raise ValueError("adapter factor differs from its dequantized codes")
        return self

    def scale_rows(self, scale: torch.Tensor) -> "LowRankAdapter":
        """``diag(scale) @ up @ down`` in stored form: output row i of the adapter is row i of ``up``,
        so only ``up`` changes - its float16 group scales when quantized (codes kept), else its
        values, rounded to ``dtype``. Variance correction uses this to scale whole output channels."""
        scale = scale.float().to(self.up.device)
        if self.up_params is None:
            up, params = _round(self.up * scale[:, None], self.dtype), None
        else:
            params = self.up_params.scale_rows(scale)
            up = params.dequantize(self.up_codes)
        return LowRankAdapter(self.down, up, self.dtype, self.down_codes, self.down_params, self.up_codes, params)

    # -- storage ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """What the checkpoint stores (names without the ``adapter_`` prefix the packer adds)."""
        if self.down_codes is None:
            return {"down": self.down.to(self.dtype), "up": self.up.to(self.dtype)}
        bits = self.quant.bits
        return {
            "down": pack_bits(self.down_codes, bits),
            "down_scales": self.down_params.scale.to(torch.float16),
            "up": pack_bits(self.up_codes, bits),
            "up_scales": self.up_params.scale.to(torch.float16),
        }

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def describe(self) -> dict:
        return {"rank": self.rank, "quant": None if self.quant is None else self.quant.to_dict(),
                "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_tensors(cls, desc: dict, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> "LowRankAdapter":
        """Inverse of :meth:`tensors` given :meth:`describe`'s dict; CheckpointError when they disagree."""
        n, k = shape
        try:
            r = int(desc["rank"])
            quant = None if desc.get("quant") is None else QuantSpec.from_dict(desc["quant"])
            dtype = getattr(torch, desc.get("dtype", "float16"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"adapter description is malformed: {exc}") from exc

        def need(name):
            if name not in tensors:
                raise CheckpointError(f"low-rank adapter is missing tensor 'adapter_{name}'")
            return tensors[name]

        try:
            if quant is None:
                down, up = need("down").float(), need("up").float()
                if tuple(down.shape) != (r, k) or tuple(up.shape) != (n, r):
                    raise CheckpointError(f"adapter factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit "
                                          f"rank {r} and weight {shape}")
                return cls(down=down, up=up, dtype=dtype)
            d_params = _params(need("down_scales"), quant, r, k, "down")
            u_params = _params(need("up_scales"), quant, n, r, "up")
            d_codes = unpack_bits(need("down"), quant.bits, r * k).reshape(r, k)
            u_codes = unpack_bits(need("up"), quant.bits, n * r).reshape(n, r)
        except CheckpointError:
            raise
        except Exception as exc:  # a short stream deep inside unpacking means a corrupt file
            raise CheckpointError(f"low-rank adapter of rank {r} for weight {shape} is corrupt: {exc}") from exc
        return cls(down=d_params.dequantize(d_codes), up=u_params.dequantize(u_codes), dtype=dtype,
                   down_codes=d_codes, down_params=d_params, up_codes=u_codes, up_params=u_params)


def _params(scales: torch.Tensor, spec: QuantSpec, rows: int, cols: int, name: str) -> QuantParams:
    if tuple(scales.shape) != (rows, spec.n_groups(cols)):
        raise CheckpointError(f"adapter {name} scales have shape {tuple(scales.shape)}, expected "
                              f"{(rows, spec.n_groups(cols))}")
    scale = scales.float()
    return QuantParams(scale=scale, zero=torch.full_like(scale, float(spec.sym_zero)), spec=spec, in_features=cols)


# -- the math -------------------------------------------------------------------------------
def saliency_root(stats: LayerStats, in_features: int, saliency: str, device, dtype=torch.float64) -> torch.Tensor:
    """``S`` with ``S S^T`` the saliency metric: the vector of activation RMS (``rms``), or a
    symmetric square root of ``X^T X / n`` (``hessian``)."""
    if stats is None:
        raise DataError("low-rank adapters need calibration statistics of the layer's inputs")
    if stats.n_tokens <= 0:
        raise DataError(f"low-rank adapters got statistics over {stats.n_tokens} calibration tokens; need at least one")
    if tuple(stats.sq_sum.shape) != (in_features,):
        raise ValueError(f"statistics cover {tuple(stats.sq_sum.shape)} inputs, the weight has {in_features}")
    if saliency == "rms":
        sq = stats.sq_sum.to(device=device, dtype=dtype)
        if not torch.isfinite(sq).all():
            raise NonFiniteWeightError("calibration activations contain NaN or Inf")
        return (sq.clamp_min(0) / stats.n_tokens).sqrt()
    if stats.hessian is None:
        raise ValueError("saliency 'hessian' needs the input Hessian X^T X, which was not collected")
    h = stats.hessian.to(device=device, dtype=dtype) / stats.n_tokens
    if not torch.isfinite(h).all():
        raise NonFiniteWeightError("the input Hessian holds NaN or Inf")
    h = (h + h.T) / 2
    # A Cholesky factor is a square root too (L L^T = H) and costs a fraction of an eigensolver; the
    # tiny ridge only makes inputs that were never active factorizable.
    ridge = 1e-9 * float(h.diagonal().mean().clamp_min(1e-30))
    low, err = torch.linalg.cholesky_ex(h + ridge * torch.eye(in_features, dtype=dtype, device=device))
    if int(err) == 0:
        return low
    evals, evecs = torch.linalg.eigh(h)  # not positive definite in floating point: the exact root
    return evecs * evals.clamp_min(0).sqrt()


def _weigh(m: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``m S`` for a diagonal (vector) or full root."""
    return m * root if root.dim() == 1 else m @ root


def weighted_error(error: torch.Tensor, root: torch.Tensor) -> float:
    """``||E S||_F^2``: the saliency-weighted squared error (the layer's mean squared output error
    for the Hessian root; its diagonal approximation for the RMS root)."""
    return float(_weigh(error.to(root.dtype), root).square().sum())


def fit_adapter(
    error: torch.Tensor,
    stats: LayerStats,
    spec: AdapterSpec,
    dtype: torch.dtype = torch.float16,
) -> LowRankAdapter:
    """The adapter approximating ``error [N, K]`` (= W - compressed W) under the saliency metric."""
    check_finite(error, "compression error")
    n, k = error.shape
    r = spec.rank_for((n, k))
    root = saliency_root(stats, k, spec.saliency, error.device)
    e = error.to(torch.float64)
    u, s, _ = torch.linalg.svd(_weigh(e, root), full_matrices=False)
    u, s = u[:, :r], s[:r]
    # Split the singular values evenly between the factors so both have similar ranges (what the
    # float16 rounding and the quantizer see); directions with no error get zero factors.
    live = s > s[0] * 1e-12 if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    sq = torch.where(live, s.sqrt(), torch.ones_like(s))
    up = u * torch.where(live, sq, torch.zeros_like(s))
    down = (u.T @ e) / sq.unsqueeze(1) * live.unsqueeze(1)
    quant = spec.quant
    if quant is None:
        a = LowRankAdapter(down=_round(down, dtype), up=_round(up, dtype), dtype=dtype)
        return a.validate((n, k))
    # Each factor's rounding error reaches the output through the saliency metric, so its ranges
    # are clip-searched with that metric's weights: for down the mean squared activation of each
    # input column, for up the mean square of each adapter channel (down x).
    col = root.square() if root.dim() == 1 else root.square().sum(1)
    d_params = fit_params_searched(down.float(), quant, None, col.float())
    d_codes = d_params.quantize(down.float())
    down_q = d_params.dequantize(d_codes)
    up = _refit_up(e, down_q.double(), root)
    chan = _weigh(down_q.double(), root).square().sum(1)
    u_params = fit_params_searched(up.float(), quant, None, chan.float())
    u_codes = u_params.quantize(up.float())
    a = LowRankAdapter(down=down_q, up=u_params.dequantize(u_codes), dtype=dtype, down_codes=d_codes,
                       down_params=d_params, up_codes=u_codes, up_params=u_params)
    return a.validate((n, k))


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    if not torch.isfinite(y).all():
        raise NonFiniteWeightError(f"low-rank adapter overflows {dtype}; store the model in float32 or bfloat16")
    return y.float()


def _refit_up(e: torch.Tensor, down: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """``argmin_U ||(E - U down) S||_F``: least squares, so ``up`` compensates ``down``'s rounding."""
    a = _weigh(down, root)  # [r, K]
    b = _weigh(e, root)  # [N, K]
    # The pseudo-inverse (not a plain solve): rows of down that are zero leave a rank-deficient system.
    return (b @ torch.linalg.pinv(a)).contiguous()


def sparse_plus_lowrank(
    weight: torch.Tensor,
    stats: LayerStats,
    spec: AdapterSpec,
    compress: Callable[[torch.Tensor], CompressedWeight],
    dtype: torch.dtype = torch.float16,
    info: dict | None = None,
) -> CompressedWeight:
    """Compress ``weight`` with ``compress`` and add an adapter fitted on the remaining error;
    with ``spec.iterations > 1`` alternate (compress ``W - adapter``, refit the adapter).

    ``info``, when given, receives ``rank``, ``error_none`` (the relative saliency-weighted error
    ``||(W - W_c) S|| / ||W S||`` of the first compression without an adapter), ``error`` (the same
    with the kept adapter), ``iteration`` (which iterate was kept, from 1) and ``bytes``.
    """
    w = weight.float()
    n, k = w.shape
    spec.rank_for((n, k))  # a rank that does not fit fails before any compression work
    root = saliency_root(stats, k, spec.saliency, w.device)
    norm = weighted_error(w, root)
    best = None
    adapter = None
    for it in range(spec.iterations):
        cw = compress(w if adapter is None else w - adapter.dense().to(w.device))
        err = w - cw.weight.float()
        if it == 0 and info is not None:
            info["error_none"] = math.sqrt(weighted_error(err, root) / max(norm, 1e-300))
        adapter = fit_adapter(err, stats, spec, dtype)
        total = weighted_error(err - adapter.dense().to(w.device), root)
        if best is None or total < best[0]:
            best = (total, cw, adapter, it + 1)
    total, cw, adapter, it = best
    cw.adapter = adapter
    if info is not None:
        info.update(rank=adapter.rank, error=math.sqrt(total / max(norm, 1e-300)), iteration=it,
                    bytes=adapter.nbytes())
    return cw
