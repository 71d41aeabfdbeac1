"""What the OBS solvers (SparseGPT, GPTQ) share: a checked Hessian, the factor of its inverse, and
the column sweep that fixes one input column at a time and compensates the rest.

Conventions. ``H = (2/n) X X^T`` is the Hessian of the layer loss ``||W X - W' X||^2 / n`` per
output row. Solvers factor the damped inverse once: ``U`` upper triangular with
``U^T U = (H + damp*I)^-1``. Row ``j`` of ``U`` divided by ``U[j, j]`` is the OBS compensation
direction after fixing column ``j`` (for the inverse Hessian of the columns not fixed yet) and
``U[j, j]^2`` is that inverse's diagonal entry, so no re-inversion is needed as columns are fixed.

The sweep works on the transposed weight ``WT[in, out]`` so a column of ``W`` is one contiguous
vector: on a GPU each per-column step is a handful of launches over contiguous memory and never
waits on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DataError, NonFiniteWeightError, RecipeError, SolverError
from .base import LayerStats

DEFAULT_PERCDAMP = 0.01
# 1% -> 10% -> 100% -> 1000% of the mean diagonal. Past that the damped matrix is essentially a
# scaled identity and the "second-order" solver would be a plain rounding/pruning in disguise.
DEFAULT_DAMP_RAISES = 3


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 like the papers; float64 when the caller hands in float64 (tests compare against
    a float64 reference, and exact mask/code agreement needs both sides in the same precision)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def check_solver_options(
    blocksize: object = 128, percdamp: object = DEFAULT_PERCDAMP, **flags: object
) -> None:
    """Validate option values that arrive from recipes (so a bad value fails before any work)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise RecipeError(f"blocksize must be a positive integer, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (
        math.isfinite(percdamp) and percdamp >= 0
    ):
        raise RecipeError(f"percdamp must be a finite number >= 0 (0.01 = 1% of the mean diagonal), got {percdamp!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise RecipeError(f"{name} must be true or false, got {value!r}")


def hessian_for(weight: torch.Tensor, stats: LayerStats | None, solver: str) -> torch.Tensor:
    """``H = (2/n) X X^T`` checked against ``weight[out, in]``, on its device, in the compute dtype."""
    if weight.dim() != 2:
        raise ValueError(f"{solver} expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if stats is None or stats.hessian is None:
        raise ValueError(
            f"{solver} needs the input Hessian X X^T of this layer; collect statistics with the "
            "Hessian (the pipeline does when the solver is registered with needs_hessian=True)"
        )
    if stats.n_tokens <= 0:
        raise DataError(f"{solver} got statistics over {stats.n_tokens} calibration tokens; it needs at least one")
    k = weight.shape[1]
    if tuple(stats.hessian.shape) != (k, k):
        raise ValueError(
            f"Hessian shape {tuple(stats.hessian.shape)} does not match the weight's {k} input features"
        )
    h = stats.hessian_matrix().to(device=weight.device, dtype=compute_dtype(weight))
    if not torch.isfinite(h).all():
        bad = int((~torch.isfinite(h)).sum())
        raise NonFiniteWeightError(
            f"the Hessian of {solver}'s layer holds {bad} NaN/Inf values; the calibration activations "
            "overflowed or contain NaN (check the model in float32, or the calibration data)"
        )
    return h


@dataclass
class InverseFactor:
    """Upper Cholesky factor of the damped inverse Hessian and how it was obtained."""

    U: torch.Tensor  # [in, in], U^T U = (H + damp*I)^-1 with dead diagonal entries set to 1
    dead: torch.Tensor  # bool [in]: inputs that were always zero in calibration
    percdamp: float  # damping actually used, as a fraction of the mean diagonal
    damp: float  # the same in absolute units (what was added to the diagonal)
    tries: int  # Cholesky attempts it took

    def report(self, info: dict | None) -> None:
        if info is not None:
            info["damp"] = self.percdamp
            info["damp_abs"] = self.damp
            info["dead"] = int(self.dead.sum())
            info["damp_tries"] = self.tries


def inverse_cholesky(
    h: torch.Tensor,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    max_raises: int = DEFAULT_DAMP_RAISES,
) -> InverseFactor:
    """Dead-input fix, damping and the upper Cholesky factor of the inverse.

    Dead inputs (``H[j, j] == 0``) get ``H[j, j] = 1`` so the matrix stays invertible; callers zero
    the matching weight columns (they never saw a nonzero input, so calibration cannot tell what
    they should be). ``percdamp`` times the mean diagonal is added to the diagonal; when the
    factorization fails (a Hessian that is singular or slightly indefinite in floating point) the
    damping is raised tenfold, at most ``max_raises`` times. ``h`` is not modified.
    """
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"a Hessian must be square, got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise NonFiniteWeightError("the Hessian holds NaN or Inf")
    h = h.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    mean_diag = float(diag.mean())
    if not mean_diag > 0:
        raise SolverError(
            f"the Hessian's mean diagonal is {mean_diag:g}: it cannot be a sum of x x^T over real "
            "inputs (those have a nonnegative diagonal); check how the statistics were accumulated"
        )
    levels = [float(percdamp)] + [max(float(percdamp), 1e-3) * 10**k for k in range(1, max_raises + 1)]
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    # Factor the reversed matrix instead of inverting: if J H J = L L^T (J reverses the order),
    # then H = R R^T with R = J L J upper, and U = R^-1 = J L^-1 J is upper with U^T U = H^-1.
    # One Cholesky and one triangular inverse; no explicit H^-1 to form and factor again (which
    # costs twice as much and is where float32 loses positive definiteness first).
    flipped = h.flip(0, 1)
    failures = []
    for tries, level in enumerate(levels, 1):
        damp = level * mean_diag
        low, err = torch.linalg.cholesky_ex(flipped + eye * damp)
        if int(err) != 0:
            failures.append(f"{level:g} (H + damp*I is not positive definite)")
            continue
        u = torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
        if not bool(torch.isfinite(u).all()):
            failures.append(f"{level:g} (the inverse overflows {h.dtype})")
            continue
        return InverseFactor(U=u, dead=dead, percdamp=level, damp=damp, tries=tries)
    raise SolverError(
        "Cholesky factorization of the damped Hessian failed at every damping tried, as a fraction "
        f"of the mean diagonal: {'; '.join(failures)}. The Hessian is far from positive "
        "semi-definite, so it is not X X^T of real activations; check the statistics collection"
    )


@dataclass
class QuantGrid:
    """Per-group quantization grid for the sweep, indexed by original group, rows last.

    ``scale``/``zero`` are ``[n_groups, out]``; a weight ``w`` of column ``p`` (in processing
    order) in group ``g = group_of[p]`` becomes ``clamp(round(w / scale[g]), -zero[g],
    maxq - zero[g]) * scale[g]``, i.e. exactly ``dequantize_with(quantize_with(...))``.
    When ``refit`` is given, group ``refit[p]`` is fitted by ``fit`` from the current (already
    compensated) values of its columns, ``group_pos[g]``, just before column ``p`` is quantized.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int
    group_of: list[int]
    refit: dict[int, int] | None = None
    group_pos: list[torch.Tensor] | None = None
    fit: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self):
        self.lo = -self.zero
        self.hi = self.maxq - self.zero

    def set_group(self, g: int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scale[g] = scale
        self.zero[g] = zero
        self.lo[g] = -zero
        self.hi[g] = self.maxq - zero

    def codes(self, qt: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[in, out]`` (processing order) of grid values ``qt`` from the sweep."""
        idx = torch.as_tensor(self.group_of, device=qt.device)
        s, z = self.scale[idx], self.zero[idx]
        # qt = k * s with k an integer of magnitude <= 255, so qt / s rounds back to k exactly.
        return (torch.round(qt / s) + z).clamp_(0, self.maxq).to(torch.uint8)


@dataclass
class SweepResult:
    wt: torch.Tensor  # [in, out] final values (processing order); pruned entries exactly 0
    keep: torch.Tensor | None  # bool [in, out] or None when nothing was pruned
    loss: torch.Tensor  # 0-d: sum over rows of the OBS error = ||(W - W') X||^2 / n on damped H


def obs_sweep(
    wt: torch.Tensor,
    u: torch.Tensor,
    *,
    blocksize: int,
    keep: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    unstructured: tuple[float, bool] | None = None,
    grid: QuantGrid | None = None,
    nm_rows: torch.Tensor | None = None,
) -> SweepResult:
    """Fix the columns of ``W`` (rows of ``wt[in, out]``, modified in place) one by one.

    Column ``p`` becomes its target (0 where pruned, otherwise its grid value when ``grid`` is
    given, otherwise itself) and the error is spread over the columns after it along
    ``U[p, p+1:] / U[p, p]``: within a block of ``blocksize`` columns immediately, beyond the
    block once per block with one matrix product (the lazy batch update of GPTQ/SparseGPT).

    Pruning: a fixed ``keep`` mask ([in, out], processing order); or ``nm=(n, m)``: every ``m``
    columns keep the ``n`` largest OBS scores ``w^2 / [H^-1]_jj`` per row, on values already
    compensated (blocksize must be a multiple of m); or ``unstructured=(sparsity, per_row)``: at
    each block start drop the lowest scores of the block, per row or over the block, in counts that
    add up exactly to ``int(sparsity * in)`` per row (``int(sparsity * in * out)`` in total).
    ``nm_rows`` (bool ``[in / m, out]``) restricts the N:M choice to the groups and rows it marks;
    the others keep all ``m`` weights (hybrid tiles: only the rows of 2:4 tiles are pruned).
    """
    k, rows = wt.shape
    d = u.diagonal()
    hn = u / d.unsqueeze(1)
    d2 = (d * d).unsqueeze(1)
    pruning = keep is not None or nm is not None or unstructured is not None
    if keep is not None:
        keept = keep
    elif pruning:
        keept = torch.ones(k, rows, dtype=torch.bool, device=wt.device)
    else:
        keept = None
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]} for N:M pruning")
    loss = torch.zeros((), dtype=wt.dtype, device=wt.device)
    errs = torch.empty(min(blocksize, k), rows, dtype=wt.dtype, device=wt.device)
    q = torch.empty(rows, dtype=wt.dtype, device=wt.device)
    refit = grid.refit if grid is not None and grid.refit else {}
    # Two levels of lazy updates: rank-1 updates only within sub-blocks of ``sub`` columns, one
    # matrix product per sub-block for the rest of the block, one per block for the rest of the
    # matrix. The per-column work then stays small (cheap launches on a GPU, no thread fan-out on
    # a CPU) and the bulk of the arithmetic runs as matrix products.
    sub = 16 if nm is None else nm[1] * -(-16 // nm[1])
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        count = i2 - i1
        w1 = wt[i1:i2].clone()
        e1 = errs[:count]
        if refit:
            e1.zero_()  # the refit formula below reads the not-yet-written rows as zero
        h1 = hn[i1:i2, i1:i2]
        if unstructured is not None:
            _drop_block(w1, d2[i1:i2], keept[i1:i2], unstructured, i1, i2)
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                p = i1 + i
                w = w1[i]
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    scores = w1[i : i + m].square() / d2[p : p + m]
                    drop = torch.topk(scores, m - n, dim=0, largest=False).indices
                    if nm_rows is None:
                        keept[p : p + m].scatter_(0, drop, False)
                    else:
                        dropped = torch.zeros_like(keept[p : p + m]).scatter_(0, drop, True)
                        keept[p : p + m] &= ~(dropped & nm_rows[p // m])
                if grid is not None:
                    g = grid.group_of[p]
                    if p in refit:
                        gp = grid.group_pos[refit[p]]
                        # Current values of the group's columns: block-start values minus what
                        # this block's fixed columns have pushed into them so far.
                        cur = wt[gp] - hn[i1:i2][:, gp].T @ e1
                        grid.set_group(refit[p], *grid.fit(cur, None if keept is None else keept[gp]))
                    s = grid.scale[g]
                    torch.div(w, s, out=q)
                    q.round_()
                    torch.clamp(q, grid.lo[g], grid.hi[g], out=q)
                    q.mul_(s)
                else:
                    q.copy_(w)
                if keept is not None:
                    q.mul_(keept[p])
                torch.sub(w, q, out=e1[i])
                if i + 1 < j2:
                    w1[i + 1 : j2].addr_(h1[i, i + 1 : j2], e1[i], alpha=-1)
                w.copy_(q)
            if j2 < count:
                w1[j2:].addmm_(h1[j1:j2, j2:].T, e1[j1:j2], alpha=-1)
        wt[i1:i2] = w1
        if i2 < k:
            wt[i2:].addmm_(hn[i1:i2, i2:].T, e1, alpha=-1)
        loss += 0.5 * (e1 / d[i1:i2].unsqueeze(1)).square().sum()
    return SweepResult(wt=wt, keep=keept if pruning else None, loss=loss)


def _drop_block(
    w1: torch.Tensor,
    d2: torch.Tensor,
    keep1: torch.Tensor,
    spec: tuple[float, bool],
    i1: int,
    i2: int,
) -> None:
    sparsity, per_row = spec
    scores = w1.square() / d2
    if per_row:
        # Cumulative counts so the per-row total is exactly int(sparsity * in), as validate_mask
        # demands, however the blocks divide the width.
        n_drop = int(i2 * sparsity) - int(i1 * sparsity)
        if n_drop:
            drop = torch.topk(scores, n_drop, dim=0, largest=False).indices
            keep1.scatter_(0, drop, False)
    else:
        rows = w1.shape[1]
        n_drop = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
        if n_drop:
            drop = torch.topk(scores.reshape(-1), n_drop, largest=False).indices
            keep1.view(-1)[drop] = False
