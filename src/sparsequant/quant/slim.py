"""SLiM-Quant (Mozaffari et al., 2024, arXiv 2410.09615): one symmetric scale per tensor, chosen
to minimize the expected quantization plus clipping error over the weight distribution.

With a clipping value ``alpha`` and step ``delta = alpha / (2^(b-1) - 1)``, a weight inside the
range gets a rounding error that is uniform on ``[-delta/2, delta/2]`` (expected square
``delta^2 / 12``) and a weight outside it is clipped (square error ``(|w| - alpha)^2``):

    E(alpha) = P(|w| <= alpha) * delta(alpha)^2 / 12 + E[(|w| - alpha)^2 ; |w| > alpha]

The distribution is the empirical one of the (kept) weights: the finest histogram of ``|w|``, read
through prefix sums of the sorted values, so E is exact for any alpha. Real weight distributions
fit no textbook density and E is not convex in general, so it is minimized numerically as in the
paper: a coarse grid of 10 points on (0, max|w|], then repeated refinement around the best point.

Storage: the quantizer returns per-output-channel parameters (``group_size=None``) in which every
row holds the same float16 scale. The format, kernels and size accounting stay those of
per-channel quantization, so the stored (and counted) cost is one float16 per output row, not one
per tensor: ``16 / in_features`` bits per weight, 0.03 for a 576-wide layer.
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteWeightError, QuantizationError
from .rtn import _MAX_SCALE, _MIN_SCALE, QuantParams
from .spec import QuantSpec

COARSE_POINTS = 10  # the paper's coarse grid
REFINE_LEVELS = 6  # each level narrows the search interval five-fold


class _Moments:
    """Prefix sums of the sorted |w| for exact tail expectations at any clipping value."""

    def __init__(self, values: torch.Tensor):
        a = values.abs().double().reshape(-1).sort().values
        self.sorted = a
        self.n = a.numel()
        zero = a.new_zeros(1)
        self.s1 = torch.cat([zero, a.cumsum(0)])
        self.s2 = torch.cat([zero, (a * a).cumsum(0)])

    def error(self, alpha: torch.Tensor, qmax: int) -> torch.Tensor:
        """Expected squared error per weight at each clipping value in ``alpha`` (float64)."""
        alpha = alpha.double()
        inside = torch.searchsorted(self.sorted, alpha, right=True)  # count of |w| <= alpha
        n_out = self.n - inside
        s1_out = self.s1[-1] - self.s1[inside]
        s2_out = self.s2[-1] - self.s2[inside]
        clip = s2_out - 2 * alpha * s1_out + alpha * alpha * n_out
        delta = alpha / qmax
        return (inside * delta * delta / 12 + clip) / max(self.n, 1)


def expected_error(values: torch.Tensor, alpha: torch.Tensor | float, bits: int) -> torch.Tensor:
    """SLiM-Quant's objective E(alpha) for the weights ``values`` (any shape) and ``bits``."""
    return _Moments(values).error(torch.as_tensor(alpha, dtype=torch.float64).reshape(-1), 2 ** (bits - 1) - 1)


def slim_clip(values: torch.Tensor, bits: int, coarse: int = COARSE_POINTS, levels: int = REFINE_LEVELS) -> float:
    """The clipping value minimizing E(alpha) (0.0 when every value is zero)."""
    if values.numel() == 0:
        return 0.0
    m = _Moments(values)
    top = float(m.sorted[-1])
    if top == 0.0:
        return 0.0
    qmax = 2 ** (bits - 1) - 1
    lo, hi = 0.0, top
    best_alpha, best_err = top, float(m.error(torch.tensor([top], dtype=torch.float64), qmax)[0])
    for _ in range(levels + 1):
        # 'coarse' points spread over (lo, hi]; lo itself was evaluated before (or is 0).
        grid = torch.linspace(lo, hi, coarse + 1, dtype=torch.float64)[1:]
        errs = m.error(grid, qmax)
        i = int(torch.argmin(errs))
        if float(errs[i]) < best_err:
            best_err, best_alpha = float(errs[i]), float(grid[i])
        step = (hi - lo) / coarse
        lo, hi = max(best_alpha - step, 0.0), min(best_alpha + step, top)
    return best_alpha


def slim_params(w: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None) -> QuantParams:
    """One symmetric scale for the whole tensor, fitted on the kept weights, stored per row."""
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not spec.symmetric or spec.group_size is not None:
        raise QuantizationError(
            f"SLiM-Quant uses one symmetric scale per tensor; got {spec}. Set symmetric: true and "
            "group_size: null (per-channel storage), or use rtn/gptq with clip_search for per-group scales"
        )
    w = w.float()
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError("weight contains NaN or Inf; cannot fit quantization scales")
    kept = w if mask is None else w[mask.bool()]
    alpha = slim_clip(kept, spec.bits)
    qmax = spec.sym_zero - 1
    scale = alpha / qmax if alpha > 0 else 1.0
    scale = torch.full((w.shape[0], 1), scale, dtype=torch.float32).clamp(_MIN_SCALE, _MAX_SCALE).half().float()
    return QuantParams(scale=scale.to(w.device), zero=torch.full_like(scale, float(spec.sym_zero)).to(w.device),
                       spec=spec, in_features=w.shape[1])


def quantize_slim(w: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, QuantParams]:
    """Codes (pruned positions hold the zero point) and the per-tensor parameters."""
    params = slim_params(w, spec, mask)
    return params.quantize_masked(w, mask), params
