"""Variance correction: give each compressed linear the per-channel output mean and std of the dense one.

Pruning and quantization shift every output channel's mean and shrink its variance (pruning drops
terms of each output's sum; the surviving ones no longer add up to the same spread), and the
layers after it see inputs of the wrong scale. The correction is an affine map per output channel,
``y'' = a * y' + s``: the scale folds into the weight (for quantized weights into its float16 group
scales, so the stored codes stay valid) and the shift becomes the linear's bias.

Where the statistics come from. For inputs with mean ``mu`` and covariance ``Sigma`` over the
calibration tokens, a linear ``y = W x + b`` has per-channel mean ``W mu + b`` and variance
``diag(W Sigma W^T)``; dense and compressed outputs have covariance ``diag(W Sigma W'^T)``. So one
pass of input moments gives the dense and the compressed statistics on the *same* tokens, exactly,
with no second forward pass and with the corrected weight's realized statistics available after
float16 rounding (the shift is computed from the rounded weight, so the mean matches exactly).
Hooks summing ``y`` and ``y^2`` would need the compressed weight during the dense pass (it does
not exist yet) or a second pass on inputs that differ.

Modes: ``std`` (the default; ``a = std_dense / std_comp``, ``s`` matches the means), ``mean``
(``a = 1``: only the shift), ``lsq`` (``a = cov(y, y') / var(y')``: the least-squares fit of the
dense output, which can never raise a linear's mean squared error on the calibration data; matching
the std can, when the error is uncorrelated with what was kept, but it restores the spread the next
layer's nonlinearity sees).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NonFiniteWeightError, RecipeError
from ..solvers.base import CompressedWeight

MODES = ("std", "mean", "lsq")
MAX_SCALE = 4.0  # a channel whose spread changed more than this much is not a variance-collapse case
DEAD = 1e-12  # relative variance below which a compressed channel is treated as constant


@dataclass
class OutputStats:
    """Per output channel (float64, shape [out]): means and variances of the dense and the
    compressed outputs and their covariance, over the same calibration tokens."""

    mean_dense: torch.Tensor
    var_dense: torch.Tensor
    mean_comp: torch.Tensor
    var_comp: torch.Tensor
    cov: torch.Tensor


def output_stats(w_dense: torch.Tensor, w_comp: torch.Tensor, mean_x: torch.Tensor, cov_x: torch.Tensor,
                 bias_dense: torch.Tensor | None = None, bias_comp: torch.Tensor | None = None) -> OutputStats:
    """Exact output statistics of ``y = W x + b`` from the input mean and (population) covariance."""
    wd, wc = w_dense.double(), w_comp.double()
    mu, sigma = mean_x.double(), cov_x.double()
    mean_d, mean_c = wd @ mu, wc @ mu
    if bias_dense is not None:
        mean_d = mean_d + bias_dense.double()
    if bias_comp is not None:
        mean_c = mean_c + bias_comp.double()
    sd, sc = wd @ sigma, wc @ sigma
    return OutputStats(mean_dense=mean_d, var_dense=(sd * wd).sum(1).clamp_min(0), mean_comp=mean_c,
                       var_comp=(sc * wc).sum(1).clamp_min(0), cov=(sd * wc).sum(1))


def correction(stats: OutputStats, mode: str = "std", max_scale: float = MAX_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` so that ``scale * y_comp + shift`` has the dense statistics.

    ``std``: equal mean and std; ``mean``: equal mean; ``lsq``: least-squares fit of the dense
    output. Channels whose compressed output is (nearly) constant keep scale 1, and scales are
    clamped to ``[1/max_scale, max_scale]``; the shift always matches the means exactly.
    """
    if mode not in MODES:
        raise RecipeError(f"unknown variance-correction mode {mode!r}; available: {', '.join(MODES)}")
    for name in ("mean_dense", "var_dense", "mean_comp", "var_comp", "cov"):
        if not torch.isfinite(getattr(stats, name)).all():
            raise NonFiniteWeightError(f"output statistic {name} holds NaN or Inf; cannot correct the variance")
    var_c = stats.var_comp
    live = var_c > DEAD * torch.maximum(stats.var_dense, var_c).clamp_min(1e-300)
    safe = torch.where(live, var_c, torch.ones_like(var_c))
    if mode == "std":
        scale = (stats.var_dense / safe).sqrt()
    elif mode == "lsq":
        scale = stats.cov / safe
    else:
        scale = torch.ones_like(var_c)
    scale = torch.where(live, scale, torch.ones_like(scale)).clamp(1.0 / max_scale, max_scale)
    shift = stats.mean_dense - scale * stats.mean_comp
    return scale, shift


def scale_rows(cw: CompressedWeight, scale: torch.Tensor, storage_dtype: torch.dtype) -> CompressedWeight:
    """``diag(scale) @ cw`` in its stored form: quantized weights scale their float16 group scales
    (codes and mask unchanged), others their kept values (rounded to the storage dtype). Recovery
    terms must offer ``scale_rows(scale)`` too. The result is validated."""
    scale = scale.float().to(cw.weight.device)
    if cw.quant is not None:
        out = CompressedWeight.from_quantized(cw.codes, cw.qparams.scale_rows(scale), cw.sparsity, cw.mask)
    else:
        out = CompressedWeight.from_float(cw.weight * scale[:, None], cw.sparsity, cw.mask, storage_dtype)
    for term in ("adapter", "outliers"):
        value = getattr(cw, term)
        if value is None:
            continue
        if not hasattr(value, "scale_rows"):
            raise RecipeError(f"variance correction cannot yet scale a {type(value).__name__} ({term}); "
                              "use variance_correction: mean, or no correction, with it")
        setattr(out, term, value.scale_rows(scale))
    return out.validate()


def correct(w_dense: torch.Tensor, bias: torch.Tensor | None, cw: CompressedWeight, mean_x: torch.Tensor,
            cov_x: torch.Tensor, mode: str, storage_dtype: torch.dtype) -> tuple[CompressedWeight, torch.Tensor, dict]:
    """Variance-correct one compressed linear: ``(new CompressedWeight, new bias, diagnostics)``.

    ``bias`` is the linear's current bias (None when it has none); the new bias is rounded to the
    storage dtype, and computed from the rounded corrected weight so the means match exactly.
    """
    before = output_stats(w_dense, cw.effective_weight(), mean_x, cov_x, bias, bias)
    scale, _ = correction(before, mode)
    new = cw if mode == "mean" else scale_rows(cw, scale, storage_dtype)
    w_new = new.effective_weight().double()
    new_bias = before.mean_dense - w_new @ mean_x.double()
    new_bias = new_bias.to(storage_dtype).float()
    info = {
        "scale_min": float(scale.min()), "scale_max": float(scale.max()),
        "std_ratio_before": float((before.var_comp.sum() / before.var_dense.sum().clamp_min(1e-300)).sqrt()),
        "mean_shift_rms": float((before.mean_dense - before.mean_comp).pow(2).mean().sqrt()),
    }
    return new, new_bias, info


def set_bias(lin: nn.Linear, bias: torch.Tensor) -> None:
    """Give ``lin`` this bias, creating the parameter when the linear had none (LLaMA's have none)."""
    bias = bias.to(device=lin.weight.device, dtype=lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    else:
        lin.bias.data.copy_(bias)


class InputMoments:
    """Mean and covariance of one linear's inputs, accumulated in float32 around a shift.

    The raw second moment ``X^T X / n`` minus ``mu mu^T`` cancels catastrophically for channels
    with a large mean (LLM activations have them); summing ``(x - c)`` with ``c`` the first batch's
    mean keeps the accumulated terms centred, so float32 sums stay accurate.
    """

    def __init__(self):
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise NonFiniteWeightError("a linear layer received NaN/Inf activations during calibration")
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = torch.zeros_like(self.shift, dtype=torch.float64)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        d = x - self.shift
        self.s1 += d.sum(0, dtype=torch.float64)
        self.s2.addmm_(d.T, d)
        self.n += x.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, population covariance)`` in float64."""
        if self.n == 0:
            raise ValueError("no inputs were recorded for this linear")
        m = self.s1 / self.n
        return self.shift.double() + m, self.s2.double() / self.n - torch.outer(m, m)


class MomentHooks:
    """Context manager: InputMoments of every given linear's inputs (q/k/v, which share one input
    tensor, accumulate it once)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.moments: dict[str, InputMoments] = {}
        self._current: tuple[torch.Tensor, set, str] | None = None  # input, accumulators fed with it, first user
        self._handles = []

    def _hook(self, name):
        def hook(mod, inp, out):
            x = inp[0]
            if self._current is None or self._current[0] is not x:
                self._current = (x, set(), name)
            elif name not in self.moments:
                self.moments[name] = self.moments[self._current[2]]  # shares the input of the linear before
            m = self.moments.setdefault(name, InputMoments())
            if id(m) not in self._current[1]:
                m.add(x)
                self._current[1].add(id(m))

        return hook

    def __enter__(self):
        self._handles = [lin.register_forward_hook(self._hook(n)) for n, lin in self.linears.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None

    def mean_cov(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.moments:
            raise ValueError(f"linear {name} received no input during calibration; cannot correct its variance")
        return self.moments[name].mean_cov()
