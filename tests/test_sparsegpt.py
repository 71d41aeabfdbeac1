"""SparseGPT pruning, joint prune+quantize, and the shared Hessian helpers.

The solver (lazy blocks, Cholesky trick, transposed working copy) is checked against a slow
float64 reference written here from the OBS formulas: after fixing column j to its target, every
later column moves by ``-(w_j - t_j) / [Hr^-1]_00 * [Hr^-1]_0,:`` where ``Hr = H[j:, j:]``. The
inverses of the shrinking ``Hr`` come from one explicit inversion followed by the OBS elimination
step (removing a fixed variable from an inverse), which test_trailing_inverses_are_reinversions
checks against inverting every ``Hr`` afresh.
"""
from __future__ import annotations

import math

import pytest
import torch

from sparsequant.errors import DataError, NonFiniteWeightError, PatternError, RecipeError, SolverError
from sparsequant.patterns import SparsitySpec, validate_mask
from sparsequant.quant import QuantSpec, fit_params
from sparsequant.solvers import JOINT, PRUNERS, CompressedWeight, LayerStats, sparsegpt_joint, sparsegpt_prune
from sparsequant.solvers.hessian import inverse_cholesky
from sparsequant.solvers.rtn import rtn_quantize
from sparsequant.solvers.wanda import wanda_prune


def problem(seed: int, out: int = 16, k: int = 64, tokens: int = 256, dtype=torch.float64):
    """Weights and correlated inputs with uneven channel scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    x = x + 0.1 * torch.randn(tokens, k, generator=g, dtype=torch.float64)
    x = x * torch.exp(0.5 * torch.randn(k, generator=g, dtype=torch.float64))
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    return w.to(dtype), x


def stats_of(x: torch.Tensor, dtype=torch.float64) -> LayerStats:
    x = x.to(dtype)
    return LayerStats(n_tokens=x.shape[0], sq_sum=(x * x).sum(0), abs_max=x.abs().amax(0), hessian=x.T @ x)


def damped(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = h.clone()
    d = h.diagonal()
    d[d == 0] = 1.0
    return h + percdamp * d.mean() * torch.eye(h.shape[0], dtype=h.dtype)


def trailing_inverse_rows(h: torch.Tensor) -> list[torch.Tensor]:
    """``rows[j] = inv(H[j:, j:])[0]``: fixing variable j turns inv(Hr) into
    ``inv(Hr)[1:, 1:] - inv(Hr)[1:, 0] inv(Hr)[0, 1:] / inv(Hr)[0, 0]``."""
    hinv = torch.linalg.inv(h)
    rows = []
    for _ in range(h.shape[0]):
        rows.append(hinv[0].clone())
        hinv = hinv[1:, 1:] - torch.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]
    return rows


def test_trailing_inverses_are_reinversions():
    _, x = problem(0, k=24)
    h = damped(stats_of(x).hessian_matrix())
    for j, row in enumerate(trailing_inverse_rows(h)):
        torch.testing.assert_close(row, torch.linalg.inv(h[j:, j:])[0], rtol=1e-10, atol=1e-12)


def ref_sparsegpt(w, h, spec: SparsitySpec, blocksize: int, qspec: QuantSpec | None, within=None):
    """Column-by-column OBS in float64 with explicit re-inversion. Returns (weight, keep, codes).

    ``within`` (bool [out, in], N:M only) limits the N:M choice to those weights (hybrid tiles);
    everything outside is quantized and compensated but never pruned."""
    w = w.clone()
    out, k = w.shape
    keep = torch.ones(out, k, dtype=torch.bool)
    codes = None
    if qspec is not None:
        params = fit_params(w.float(), qspec)
        s, z = (t.double() for t in params.expand())
        codes = torch.zeros(out, k, dtype=torch.uint8)

    hrows = trailing_inverse_rows(h)

    def inv_diag(c):
        return hrows[c][0]

    for j in range(k):
        if spec.kind == "unstructured" and j % blocksize == 0:
            j2 = min(j + blocksize, k)
            scores = w[:, j:j2] ** 2 / torch.stack([inv_diag(c) for c in range(j, j2)])
            if spec.per_row:
                n_drop = int(j2 * spec.sparsity) - int(j * spec.sparsity)
                drop = scores.argsort(dim=1)[:, :n_drop]
                keep[:, j:j2].scatter_(1, drop, False)
            else:
                n_drop = int(out * j2 * spec.sparsity) - int(out * j * spec.sparsity)
                flat = keep[:, j:j2].clone().reshape(-1)
                flat[scores.reshape(-1).argsort()[:n_drop]] = False
                keep[:, j:j2] = flat.reshape(out, j2 - j)
        if spec.kind == "nm" and j % spec.m == 0:
            scores = w[:, j : j + spec.m] ** 2 / torch.stack([inv_diag(c) for c in range(j, j + spec.m)])
            drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argsort(dim=1)[:, : spec.m - spec.n], True)
            if within is not None:
                drop &= within[:, j : j + spec.m]
            keep[:, j : j + spec.m] &= ~drop
        hinv0 = hrows[j]
        target = w[:, j].clone()
        if qspec is not None:
            c = torch.clamp(torch.round(target / s[:, j]) + z[:, j], 0, qspec.levels - 1)
            codes[:, j] = c.to(torch.uint8)
            target = (c - z[:, j]) * s[:, j]
        target = torch.where(keep[:, j], target, torch.zeros_like(target))
        err = w[:, j] - target
        w[:, j:] -= torch.outer(err / hinv0[0], hinv0)
        w[:, j] = target
    if codes is not None:
        codes = torch.where(keep, codes, z.to(torch.uint8))
    return w, keep, codes


PATTERNS = ["2:4", "4:8", "50%", "30%", "50%-matrix"]
QUANTS = [None, QuantSpec(4, 16, True), QuantSpec(3, 24, False)]  # 64 = 24 + 24 + 16: ragged


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("qspec", QUANTS, ids=str)
def test_matches_float64_reference(pattern, qspec):
    seed = PATTERNS.index(pattern) + 5 * QUANTS.index(qspec)  # a different problem for each case
    w, x = problem(seed)
    st = stats_of(x)
    spec = SparsitySpec.parse(pattern)
    blocksize = 24  # < K and not a divisor of it: lazy updates across uneven blocks
    ref_w, ref_keep, ref_codes = ref_sparsegpt(w, damped(st.hessian_matrix()), spec, blocksize, qspec)
    if qspec is None:
        got_w, mask = sparsegpt_prune(w, st, spec, blocksize=blocksize)
    else:
        codes, params, mask = sparsegpt_joint(w, st, spec, qspec, blocksize=blocksize)
        assert torch.equal(codes, ref_codes)
        cw = CompressedWeight.from_quantized(codes, params, spec, mask).validate()
        got_w = cw.weight.double()
    assert torch.equal(mask, ref_keep)
    validate_mask(mask, spec, tuple(w.shape))
    assert bool((got_w[~mask] == 0).all())
    tol = 1e-9 if qspec is None else 1e-6  # the stored weight is the float32 dequantization
    torch.testing.assert_close(got_w, ref_w, rtol=tol, atol=tol)


def test_float32_path_matches_reference():
    w, x = problem(7)
    st = stats_of(x, torch.float32)
    spec = SparsitySpec.parse("2:4")
    ref_w, ref_keep, _ = ref_sparsegpt(w, damped(st.hessian_matrix().double()), spec, 128, None)
    got_w, mask = sparsegpt_prune(w.float(), st, spec, blocksize=16)
    assert got_w.dtype == torch.float32
    assert torch.equal(mask, ref_keep)
    torch.testing.assert_close(got_w.double(), ref_w, rtol=1e-4, atol=1e-4)


def test_nm_blocksize_not_multiple_of_m_is_rounded_down():
    w, x = problem(3)
    st = stats_of(x)
    spec = SparsitySpec.parse("4:8")
    ref_w, ref_keep, _ = ref_sparsegpt(w, damped(st.hessian_matrix()), spec, 0, None)
    for bs in (5, 13, 1):
        got_w, mask = sparsegpt_prune(w, st, spec, blocksize=bs)
        assert torch.equal(mask, ref_keep)
        torch.testing.assert_close(got_w, ref_w, rtol=1e-9, atol=1e-9)


def layer_error(w, w2, x):
    return float(((w - w2.to(w.dtype)) @ x.T).pow(2).sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_lower_output_error_than_wanda_and_rtn(seed, pattern):
    w, x = problem(seed, out=64, k=128, tokens=512, dtype=torch.float32)
    st = stats_of(x, torch.float32)
    x = x.float()
    spec = SparsitySpec.parse(pattern)
    ours, _ = sparsegpt_prune(w, st, spec)
    wanda, wmask = wanda_prune(w, st, spec)
    assert layer_error(w, ours, x) < 0.85 * layer_error(w, wanda, x)

    qspec = QuantSpec(4, 32, True)
    codes, params, mask = sparsegpt_joint(w, st, spec, qspec)
    joint = CompressedWeight.from_quantized(codes, params, spec, mask).validate().weight
    rcodes, rparams = rtn_quantize(wanda, st, qspec, wmask)
    wanda_rtn = CompressedWeight.from_quantized(rcodes, rparams, spec, wmask).weight
    assert layer_error(w, joint, x) < 0.85 * layer_error(w, wanda_rtn, x)


@pytest.mark.parametrize("qspec", [None, QuantSpec(3, 16, False)], ids=str)
def test_info_loss_is_the_damped_output_error(qspec):
    """The OBS losses telescope: their sum is exactly 1/2 dW (H + damp I) dW^T over rows."""
    w, x = problem(11)
    st = stats_of(x)
    spec = SparsitySpec.parse("2:4")
    info = {}
    if qspec is None:
        w2, _ = sparsegpt_prune(w, st, spec, percdamp=0.05, info=info)
    else:
        codes, params, mask = sparsegpt_joint(w, st, spec, qspec, percdamp=0.05, info=info)
        w2 = params.dequantize(codes).double() * mask
    dw = w - w2
    h = st.hessian_matrix() + info["damp_abs"] * torch.eye(w.shape[1], dtype=torch.float64)
    expected = 0.5 * float((dw @ h * dw).sum())
    assert info["damp"] == 0.05 and info["dead"] == 0 and info["damp_tries"] == 1
    assert info["loss"] == pytest.approx(expected, rel=1e-6)
    # and without damping it is the output error per token
    assert 0.5 * float((dw @ st.hessian_matrix() * dw).sum()) == pytest.approx(layer_error(w, w2, x) / x.shape[0])


def test_ragged_groups_576_wide_g128():
    w, x = problem(5, out=24, k=576, tokens=700, dtype=torch.float32)
    st = stats_of(x, torch.float32)
    spec = SparsitySpec.parse("2:4")
    qspecs = (QuantSpec(4, 128, True), QuantSpec(4, 128, False), QuantSpec(8, None, True), QuantSpec(2, 128, False))
    for qspec in qspecs:
        codes, params, mask = sparsegpt_joint(w, st, spec, qspec)
        assert params.scale.shape == (24, qspec.n_groups(576)) == params.zero.shape
        cw = CompressedWeight.from_quantized(codes, params, spec, mask).validate()
        assert bool((cw.weight[~mask] == 0).all())
        # parameters are the dense weight's (fitted before pruning)
        dense = fit_params(w, qspec)
        assert torch.equal(params.scale, dense.scale) and torch.equal(params.zero, dense.zero)


def test_dead_inputs_are_zeroed_and_pruned_first():
    w, x = problem(4)
    x[:, [3, 17, 40]] = 0
    st = stats_of(x)
    info = {}
    w2, mask = sparsegpt_prune(w, st, SparsitySpec.parse("50%"), info=info)
    assert info["dead"] == 3
    assert not mask[:, [3, 17, 40]].any()
    assert bool(torch.isfinite(w2).all())


def test_dense_spec_leaves_weight_alone():
    w, x = problem(2)
    w2, mask = sparsegpt_prune(w, stats_of(x), SparsitySpec())
    assert mask is None and torch.equal(w2, w)


def test_bad_inputs_raise_clear_errors():
    w, x = problem(0)
    st = stats_of(x)
    with pytest.raises(PatternError, match="divisible by M=8"):
        sparsegpt_prune(w[:, :60], stats_of(x[:, :60]), SparsitySpec.parse("4:8"))
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        sparsegpt_prune(bad, st, SparsitySpec.parse("2:4"))
    hbad = stats_of(x)
    hbad.hessian[1, 2] = float("inf")
    with pytest.raises(NonFiniteWeightError, match="Hessian"):
        sparsegpt_joint(w, hbad, SparsitySpec.parse("2:4"), QuantSpec())
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt_prune(w[:, :32], st, SparsitySpec.parse("2:4"))
    with pytest.raises(ValueError, match="needs the input Hessian"):
        sparsegpt_prune(w, LayerStats.from_inputs(x), SparsitySpec.parse("2:4"))
    with pytest.raises(DataError):
        sparsegpt_prune(w, LayerStats(0, st.sq_sum, st.abs_max, st.hessian), SparsitySpec.parse("2:4"))
    with pytest.raises(RecipeError, match="blocksze"):
        sparsegpt_prune(w, st, SparsitySpec.parse("2:4"), blocksze=64)
    with pytest.raises(RecipeError, match="percdamp"):
        sparsegpt_joint(w, st, SparsitySpec.parse("2:4"), QuantSpec(), percdamp=-1)
    with pytest.raises(RecipeError, match="blocksize"):
        sparsegpt_prune(w, st, SparsitySpec.parse("2:4"), blocksize=0)


def test_registered():
    assert PRUNERS["sparsegpt"].fn is sparsegpt_prune and PRUNERS["sparsegpt"].needs_hessian
    assert JOINT["sparsegpt"].fn is sparsegpt_joint and JOINT["sparsegpt"].needs_hessian


# ---- Hessian helpers: damping, its escalation, and failure ----


def indefinite(k: int, neg: float, rest: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Symmetric matrix with eigenvalues ``rest`` except one equal to ``neg``."""
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    lam = torch.full((k,), rest, dtype=torch.float64)
    lam[0] = neg
    return q @ torch.diag(lam) @ q.T


def test_inverse_cholesky_factor_is_of_the_damped_inverse():
    _, x = problem(1)
    h = stats_of(x).hessian_matrix()
    f = inverse_cholesky(h, percdamp=0.02)
    assert f.percdamp == 0.02 and f.tries == 1
    assert torch.equal(f.U, f.U.triu())
    torch.testing.assert_close(f.U.T @ f.U, torch.linalg.inv(h + f.damp * torch.eye(h.shape[0], dtype=h.dtype)))


def test_damping_is_raised_when_cholesky_fails_and_reported():
    # Mean diagonal is ~1, so 1% damping leaves the -0.03 eigenvalue negative and 10% fixes it.
    h = indefinite(64, -0.03)
    f = inverse_cholesky(h, percdamp=0.01)
    assert f.percdamp == pytest.approx(0.1) and f.tries == 2
    torch.testing.assert_close(f.U.T @ f.U, torch.linalg.inv(h + f.damp * torch.eye(64, dtype=h.dtype)))

    w = torch.randn(8, 64, dtype=torch.float64)
    st = LayerStats(n_tokens=2, sq_sum=torch.ones(64), abs_max=torch.ones(64), hessian=h)  # H = h
    info = {}
    sparsegpt_prune(w, st, SparsitySpec.parse("2:4"), info=info)
    assert info["damp"] == pytest.approx(0.1) and info["damp_tries"] == 2


def test_singular_hessian_without_damping_reports_what_it_used():
    x = torch.randn(10, 64, dtype=torch.float64)  # rank 10 < 64: singular
    h = x.T @ x
    f = inverse_cholesky(h, percdamp=0.0)
    assert f.percdamp in (0.0, 0.01, 0.1, 1.0)
    torch.testing.assert_close(
        f.U.T @ f.U, torch.linalg.inv(h + f.damp * torch.eye(64, dtype=h.dtype)), rtol=1e-6, atol=1e-6
    )


def test_hopeless_hessian_raises_solver_error():
    with pytest.raises(SolverError, match="failed at every damping"):
        # mean diagonal (63 * 100 - 5000) / 64 ~ 20: even 1000% damping (~200) leaves -4800
        inverse_cholesky(indefinite(64, -5000.0, rest=100.0))
    with pytest.raises(SolverError, match="mean diagonal"):
        inverse_cholesky(-torch.eye(8, dtype=torch.float64))
    with pytest.raises(NonFiniteWeightError):
        inverse_cholesky(torch.full((4, 4), float("nan")))
