"""The values solvers exchange: calibration statistics in, a CompressedWeight out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import NonFiniteWeightError, PatternError, RecipeError
from ..patterns import SparsitySpec, validate_mask
from ..quant import QuantParams, QuantSpec


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs over the calibration tokens (float32).

    sq_sum[j] = sum_t x_tj^2, abs_max[j] = max_t |x_tj|, hessian = sum_t x_t x_t^T (only when a
    solver asked for it). ``n_tokens`` counts the rows summed.
    """

    n_tokens: int
    sq_sum: torch.Tensor
    abs_max: torch.Tensor
    hessian: torch.Tensor | None = None

    @property
    def col_norm(self) -> torch.Tensor:
        """||X_j||_2 of every input feature j over the calibration tokens (Wanda's activation term)."""
        return self.sq_sum.clamp_min(0).sqrt()

    def hessian_matrix(self) -> torch.Tensor:
        """H = (2/n) X X^T as in SparseGPT/GPTQ."""
        if self.hessian is None:
            raise ValueError("this solver needs the Hessian, which was not collected")
        return self.hessian * (2.0 / max(self.n_tokens, 1))

    @classmethod
    def from_inputs(cls, x: torch.Tensor, with_hessian: bool = False) -> "LayerStats":
        """Statistics of an explicit input matrix ``x[tokens, in]`` (tests and small problems)."""
        x = x.reshape(-1, x.shape[-1]).float()
        return cls(
            n_tokens=x.shape[0],
            sq_sum=(x * x).sum(0),
            abs_max=x.abs().amax(0),
            hessian=(x.T @ x) if with_hessian else None,
        )


@dataclass
class CompressedWeight:
    """One compressed weight matrix ``W[out, in]``.

    ``weight`` is the float32 matrix the model computes with: pruned entries are exactly zero and,
    when quantized, every kept entry equals ``(code - zero) * scale``. ``codes``/``qparams`` are
    present when quantized; ``mask`` when sparse. Together they are everything a checkpoint stores.
    """

    weight: torch.Tensor
    sparsity: SparsitySpec
    mask: torch.Tensor | None = None
    quant: QuantSpec | None = None
    codes: torch.Tensor | None = None
    qparams: QuantParams | None = None
    # Recovery terms stored beside the sparse/quantized part (see effective_weight).
    adapter: object | None = None  # low-rank adapter (solvers/lowrank.py): adds up @ down
    outliers: object | None = None  # structured outliers (patterns/outliers.py): adds their values

    def effective_weight(self) -> torch.Tensor:
        """The float32 matrix the model computes with: ``weight`` plus the recovery terms.

        This is the single definition: the engine writes it into the model and the reference
        path of SparseQuantLinear rebuilds it from the checkpoint, so both agree bit for bit.
        """
        w = self.weight.float()
        if self.outliers is not None:
            w = w + self.outliers.dense(w.shape)
        if self.adapter is not None:
            w = w + self.adapter.dense()
        return w

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def validate(self) -> "CompressedWeight":
        """Prove the invariants; raise on any violation. Returns self."""
        if not torch.isfinite(self.weight).all():
            raise NonFiniteWeightError("compressed weight contains NaN or Inf")
        validate_mask(self.mask, self.sparsity, self.shape)
        if self.mask is not None and bool((self.weight[~self.mask] != 0).any()):
            raise PatternError("pruned positions of the compressed weight are not zero")
        if self.quant is not None:
            if self.codes is None or self.qparams is None:
                raise ValueError("a quantized weight needs codes and qparams")
            rebuilt = self.qparams.dequantize(self.codes)
            if self.mask is not None:
                rebuilt = rebuilt * self.mask
            if not torch.equal(rebuilt, self.weight.float()):
                raise ValueError("weight differs from its dequantized codes")
        if self.adapter is not None:
            self.adapter.validate(self.shape)
        if self.sparsity.outliers:
            if self.outliers is None or self.outliers.k != self.sparsity.outliers:
                raise PatternError(f"spec {self.sparsity} needs {self.sparsity.outliers} outliers per 256 inputs")
            self.outliers.validate(self.shape)
        elif self.outliers is not None:
            raise PatternError(f"spec {self.sparsity} has no outliers, but the weight carries some")
        return self

    @classmethod
    def from_quantized(
        cls,
        codes: torch.Tensor,
        qparams: QuantParams,
        sparsity: SparsitySpec,
        mask: torch.Tensor | None,
    ) -> "CompressedWeight":
        """Build from codes and params; the weight is their dequantization (exact by construction)."""
        if mask is not None:
            codes = torch.where(mask, codes, qparams.expand()[1].to(torch.uint8))
        weight = qparams.dequantize(codes)
        if mask is not None:
            weight = weight * mask
        return cls(weight=weight, sparsity=sparsity, mask=mask, quant=qparams.spec, codes=codes, qparams=qparams)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, sparsity: SparsitySpec, mask: torch.Tensor | None, storage_dtype: torch.dtype
    ) -> "CompressedWeight":
        """An unquantized (dense or sparse) weight, rounded to the dtype the checkpoint stores."""
        w = weight.float()
        if mask is not None:
            w = w * mask
        w = w.to(storage_dtype).float()
        return cls(weight=w, sparsity=sparsity, mask=mask)


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise NonFiniteWeightError(f"{name} holds {bad} NaN/Inf values; refusing to compress it")


def check_options(solver: str, options: dict, allowed: Iterable[str] = ()) -> None:
    """Raise RecipeError for option names ``solver`` does not take (catches typos in recipes)."""
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) if allowed else "no options"
        raise RecipeError(f"{solver} does not take option(s) {', '.join(map(repr, unknown))}; it takes {takes}")
