"""Variance correction: exact output statistics, the correction itself, folding into stored weights,
the engine and the checkpoint round trip."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.checkpoint.io import load_checkpoint
from sparsequant.errors import NonFiniteWeightError, RecipeError
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.patterns import SparsitySpec
from sparsequant.pipeline.variance_correction import (InputMoments, MomentHooks, OutputStats, correct, correction,
                                                      output_stats)
from sparsequant.quant import QuantSpec
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe, RecoveryConfig
from sparsequant.solvers import LinearPlan, compress_weight
from sparsequant.solvers.base import LayerStats

from conftest import random_ids, tiny_model


def _inputs(n, k, seed):
    """Activations with correlated features and a few large-mean channels, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    x[:, :3] += 20.0
    return x


def _direct(w, x, b=None):
    y = x @ w.double().T + (0 if b is None else b.double())
    return y.mean(0), y.var(0, unbiased=False), y


@settings(max_examples=15, deadline=None)
@given(n=st.integers(8, 64), k=st.integers(4, 24), out=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_output_stats_exact_against_float64_outputs(n, k, out, seed):
    x = _inputs(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w, wc = torch.randn(out, k, generator=g), torch.randn(out, k, generator=g)
    b = torch.randn(out, generator=g)
    s = output_stats(w, wc, x.mean(0), torch.cov(x.T, correction=0).reshape(k, k), b, b)
    md, vd, yd = _direct(w, x, b)
    mc, vc, yc = _direct(wc, x, b)
    cov = ((yd - md) * (yc - mc)).mean(0)
    for got, want in [(s.mean_dense, md), (s.var_dense, vd), (s.mean_comp, mc), (s.var_comp, vc), (s.cov, cov)]:
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * (1 + want.abs().max()))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["std", "mean", "lsq"]))
def test_correction_matches_mean_and_std_exactly(seed, mode):
    x = _inputs(200, 16, seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g)
    wc = w * (torch.rand(8, 16, generator=g) > 0.5)  # a pruned copy
    s = output_stats(w, wc, x.mean(0), torch.cov(x.T, correction=0))
    scale, shift = correction(s, mode)
    md, vd, yd = _direct(w, x)
    _, _, yc = _direct(wc, x)
    y = yc * scale + shift
    assert torch.allclose(y.mean(0), md, atol=1e-9 * (1 + md.abs().max()))
    if mode == "std":
        ok = (scale > 1 / 4) & (scale < 4)  # unclamped channels match the std exactly
        assert torch.allclose(y.var(0, unbiased=False)[ok], vd[ok], rtol=1e-9)
    if mode == "mean":
        assert torch.equal(scale, torch.ones_like(scale))
    # least squares never raises the mean squared error; the shift alone neither
    mse = lambda z: float((z - yd).pow(2).mean())  # noqa: E731
    _, shift_only = correction(s, "mean")
    assert mse(yc + shift_only) <= mse(yc) + 1e-9
    if mode == "lsq":
        assert mse(y) <= mse(yc + shift_only) + 1e-9


def test_correction_keeps_dead_channels_and_rejects_nan():
    z = torch.zeros(2, dtype=torch.float64)
    s = OutputStats(mean_dense=torch.tensor([1.0, 2.0], dtype=torch.float64), var_dense=torch.tensor([1.0, 4.0],
                    dtype=torch.float64), mean_comp=z, var_comp=torch.tensor([0.0, 1.0], dtype=torch.float64), cov=z)
    scale, shift = correction(s, "std")
    assert scale.tolist() == [1.0, 2.0] and shift.tolist() == [1.0, 2.0]
    s.cov = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    with pytest.raises(NonFiniteWeightError):
        correction(s, "lsq")
    with pytest.raises(RecipeError):
        correction(s, "median")


def test_input_moments_shifted_float32_is_accurate():
    x = _inputs(3000, 24, 3) * 1.0
    x[:, 5] += 1000.0  # a huge mean: naive float32 X^T X / n - mu mu^T loses the variance of channel 5
    m = InputMoments()
    for chunk in x.float().split(700):
        m.add(chunk)
    mean, cov = m.mean_cov()
    assert torch.allclose(mean, x.mean(0), rtol=1e-6, atol=1e-6)
    ref = torch.cov(x.T, correction=0)
    assert torch.allclose(cov, ref, rtol=1e-4, atol=1e-4 * float(ref.diagonal().max()))


def test_moment_hooks_count_a_shared_input_once():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    lins = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
    with MomentHooks(lins) as hooks:
        for seed in range(3):
            h = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(seed))
            for lin in lins.values():
                lin(h)
    assert hooks.moments["q"] is hooks.moments["k"] is hooks.moments["v"]
    assert hooks.moments["q"].n == 3 * 16


@pytest.mark.parametrize("quant", [QuantSpec(4, 16), None])
def test_correct_folds_scale_into_stored_form(quant):
    x = _inputs(500, 64, 1).float()
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g) * 0.1
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quant=quant)
    cw = compress_weight(w, LayerStats.from_inputs(x), plan)
    mean_x, cov_x = x.double().mean(0), torch.cov(x.double().T, correction=0)
    new, bias, info = correct(w, None, cw, mean_x, cov_x, "std", torch.float16)
    assert torch.equal(new.mask, cw.mask)
    if quant is not None:
        assert torch.equal(new.codes, cw.codes) and not torch.equal(new.qparams.scale, cw.qparams.scale)
        assert new.qparams.scale.half().float().equal(new.qparams.scale)  # still float16 scales
    assert bias.half().float().equal(bias)
    md, vd, _ = _direct(w, x.double())
    mc, vc, _ = _direct(new.weight, x.double(), bias)
    # exact up to float16 rounding of the bias and of the folded scales / values
    assert torch.allclose(mc, md, atol=2e-3 * float(md.abs().max()) + 1e-4)
    assert torch.allclose(vc.sqrt(), vd.sqrt(), rtol=3e-3)
    assert info["std_ratio_before"] < 1  # pruning shrank the outputs


def test_adapter_without_row_scaling_is_a_clear_error():
    w = torch.randn(8, 16)
    cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4")))

    class Fixed:  # a recovery term that cannot scale its rows
        def dense(self):
            return torch.zeros(8, 16)

        def validate(self, shape):
            return self

    cw.adapter = Fixed()
    x = torch.randn(40, 16, dtype=torch.float64)
    with pytest.raises(RecipeError, match="variance correction"):
        correct(w, None, cw, x.mean(0), torch.cov(x.T), "std", torch.float16)


RECIPE = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                calibration=CalibrationConfig(samples=8, seq_len=32, batch_size=4))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # without and with biases of their own
def test_engine_reduces_layer_error_and_round_trips(family, tmp_path):
    ids, x = random_ids(8, 32), random_ids(2, 32, seed=7)
    plain = sq.compress(tiny_model(family), RECIPE, calibration=ids, progress=False)
    model = tiny_model(family)
    result = sq.compress(model, RECIPE.with_(recovery=RecoveryConfig(variance_correction=True)), calibration=ids,
                         progress=False)
    assert result.layers[0].rel_error < plain.layers[0].rel_error
    assert sum(r.rel_error for r in result.layers) < sum(r.rel_error for r in plain.layers)
    assert all(model.get_submodule(n).bias is not None for n in result.packed)
    assert any("variance_correction.scale_max" in r.info for r in result.linears)
    logits = model(x).logits
    sq.save(result, tmp_path / "ck")
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    lin = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(lin, SparseQuantLinear) and lin.bias is not None
    assert torch.equal(loaded(x).logits, logits)


def test_recovery_config_errors():
    for bad in [{"variance_correction": "median"}, {"finetune_steps": -1}, {"finetune_lr": 0},
                {"finetune_batch": 0}, {"finetune_steps": 1.5}]:
        with pytest.raises(RecipeError):
            Recipe.from_dict({"recovery": bad})
    with pytest.raises(RecipeError):
        Recipe.from_dict({"recovery": {"variance": True}})
    r = Recipe.from_dict({"recovery": {"variance_correction": "lsq", "finetune_steps": 3}})
    assert Recipe.from_yaml(r.to_yaml()) == r and r.recovery.variance_mode == "lsq"


@pytest.mark.parametrize("term", ["adapter-fp16", "adapter-int4", "outliers"])
def test_std_correction_scales_recovery_terms_with_their_rows(term):
    """std/lsq correction multiplies whole output rows: adapters (fp16 or int4 up-factor) and
    structured outliers scale with the compressed part, so the corrected effective weight is
    diag(scale) @ W_eff up to float16 rounding, and the output std matches the dense layer's."""
    from sparsequant.pipeline.variance_correction import scale_rows
    from sparsequant.solvers.lowrank import AdapterSpec

    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 64, generator=g)
    x = _inputs(400, 64, 3)
    xf = x.float()
    stats = LayerStats(n_tokens=x.shape[0], sq_sum=(xf * xf).sum(0), abs_max=xf.abs().amax(0), hessian=xf.T @ xf)
    q = QuantSpec(4, 32, True)
    if term == "outliers":
        plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4+8/256"), quant=q, joint=False)
    else:
        bits = 4 if term == "adapter-int4" else None
        plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quant=q, joint=False,
                          adapter=AdapterSpec(rank=4, bits=bits, group_size=4 if bits else None))
    cw = compress_weight(w, stats, plan)
    assert getattr(cw, "outliers" if term == "outliers" else "adapter") is not None
    scale = torch.linspace(0.7, 1.4, 24)
    scaled = scale_rows(cw, scale, torch.float16)
    ref = cw.effective_weight().double() * scale.double()[:, None]
    rel = (scaled.effective_weight().double() - ref).norm() / ref.norm()
    assert rel < 2e-3
    new, bias, info = correct(w, None, cw, x.mean(0), torch.cov(x.T, correction=0), "std", torch.float16)
    _, var_dense, _ = _direct(w, x)
    _, var_before, _ = _direct(cw.effective_weight(), x)
    _, var_after, _ = _direct(new.effective_weight(), x, bias)
    err_before = (var_before.sqrt() / var_dense.sqrt() - 1).abs().max()
    err_after = (var_after.sqrt() / var_dense.sqrt() - 1).abs().max()
    assert err_after < 0.01 and err_after < err_before
