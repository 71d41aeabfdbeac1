"""SLiM low-rank adapters: the math against a float64 reference, recipes, storage, the engine."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.checkpoint.io import load_checkpoint
from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.errors import CheckpointError, NonFiniteWeightError, RecipeError, SparseQuantError
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.recipe import AdapterConfig, CalibrationConfig, QuantConfig, Recipe
from sparsequant.solvers import LayerStats, LinearPlan, compress_weight
from sparsequant.solvers.lowrank import AdapterSpec, fit_adapter, saliency_root, weighted_error

from conftest import random_ids, tiny_model


def _problem(n, k, seed, tokens=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # Uneven channel scales, as in real activations, so the saliency matters.
    x = torch.randn(tokens, k, generator=g) * torch.rand(k, generator=g).mul(4).add(0.05)
    return w, x, LayerStats.from_inputs(x, with_hessian=True)


def _reference_adapter(e, sq_sum, n_tokens, r):
    """SLiM as written: SVD of E D, keep rank r, multiply by D^-1 (float64, D > 0)."""
    d = (sq_sum.double() / n_tokens).sqrt()
    u, s, vh = torch.linalg.svd(e.double() * d, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r] / d


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 40), k=st.integers(4, 40), rank=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_adapter_matches_float64_reference_svd(n, k, rank, seed):
    rank = min(rank, n, k)
    e, x, stats = _problem(n, k, seed)
    a = fit_adapter(e, stats, AdapterSpec(rank=rank), dtype=torch.float32)
    ref = _reference_adapter(e, stats.sq_sum, stats.n_tokens, rank)
    assert a.rank == rank
    # The adapter equals the reference up to float32 rounding of the factors (relative to E's scale).
    assert (a.dense().double() - ref).abs().max() <= 1e-4 * e.abs().max()
    # Eckart-Young: the weighted error left is the tail of the singular values of E D.
    root = saliency_root(stats, k, "rms", "cpu")
    s = torch.linalg.svdvals(e.double() * root)
    left = weighted_error(e - a.dense(), root)
    assert left == pytest.approx(float(s[rank:].square().sum()), rel=1e-3, abs=1e-6 * float(s.square().sum()))


def test_hessian_saliency_minimizes_the_output_error():
    e, x, stats = _problem(24, 32, 3)
    r = 5
    a = fit_adapter(e, stats, AdapterSpec(rank=r, saliency="hessian"), dtype=torch.float32)
    out_err = float(((e - a.dense()).double() @ x.double().T).square().sum() / x.shape[0])
    # The best rank-r fit of E X (over all rank-r matrices) leaves the tail of E X's singular values.
    s = torch.linalg.svdvals(e.double() @ x.double().T)
    assert out_err == pytest.approx(float(s[r:].square().sum()) / x.shape[0], rel=1e-3)
    # The diagonal saliency cannot do better on that objective.
    a_rms = fit_adapter(e, stats, AdapterSpec(rank=r), dtype=torch.float32)
    assert float(((e - a_rms.dense()).double() @ x.double().T).square().sum() / x.shape[0]) >= out_err * (1 - 1e-4)


@settings(max_examples=12, deadline=None)
@given(pattern=st.sampled_from(["2:4", "4:8", "50%"]), prune=st.sampled_from(["magnitude", "wanda", "sparsegpt"]),
       quantizer=st.sampled_from(["rtn", "gptq"]), bits=st.sampled_from([None, 4]), joint=st.booleans(),
       seed=st.integers(0, 1000))
def test_adapters_reduce_the_saliency_weighted_error(pattern, prune, quantizer, bits, joint, seed):
    w, x, stats = _problem(32, 64, seed)
    base = LinearPlan(prune=prune, sparsity=SparsitySpec.parse(pattern), quantizer=quantizer,
                      quant=QuantSpec(4, 32, True), joint=joint)
    root = saliency_root(stats, 64, "rms", "cpu")
    none = compress_weight(w, stats, base)
    info = {}
    plan = LinearPlan(**{**base.__dict__, "adapter": AdapterSpec(rank=0.25, bits=bits)})
    cw = compress_weight(w, stats, plan, info=info)
    assert cw.adapter is not None and cw.adapter.rank == 8
    # The sparse/quantized part is unchanged by one SLiM pass; the adapter only adds.
    assert torch.equal(cw.weight, none.weight)
    before = weighted_error(w - none.effective_weight(), root)
    after = weighted_error(w - cw.effective_weight(), root)
    assert after < before
    assert info["adapter"]["error"] < info["adapter"]["error_none"]


def test_quantized_adapter_keeps_most_of_the_gain():
    w, x, stats = _problem(64, 128, 7)
    root = saliency_root(stats, 128, "rms", "cpu")
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quant=QuantSpec(4, 32, True))
    errs = {}
    for bits in (None, 8, 4):
        p = LinearPlan(**{**plan.__dict__, "adapter": AdapterSpec(rank=16, bits=bits, group_size=32)})
        cw = compress_weight(w, stats, p)
        errs[bits] = weighted_error(w - cw.effective_weight(), root)
        if bits is not None:
            a = cw.adapter
            assert int(a.down_codes.max()) < 2**bits and a.quant.bits == bits
            assert a.nbytes() < cw.adapter.rank * (64 + 128) * 2 * bits / 8  # far below float16 factors
    none = weighted_error(w - compress_weight(w, stats, plan).weight, root)
    assert errs[None] <= errs[8] <= errs[4] < none
    assert (none - errs[4]) >= 0.9 * (none - errs[None])


def test_alternation_never_worse_than_one_pass():
    w, x, stats = _problem(48, 64, 11)
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), quant=QuantSpec(4, 32, True))
    one, three = {}, {}
    compress_weight(w, stats, LinearPlan(**{**plan.__dict__, "adapter": AdapterSpec(rank=6)}), info=one)
    cw = compress_weight(w, stats, LinearPlan(**{**plan.__dict__, "adapter": AdapterSpec(rank=6, iterations=3)}),
                         info=three)
    assert three["adapter"]["error"] <= one["adapter"]["error"]
    assert three["adapter"]["error_none"] == one["adapter"]["error_none"]
    assert 1 <= three["adapter"]["iteration"] <= 3
    cw.validate()  # pattern, codes and adapter invariants hold for the kept iterate


def test_rank_ratio_and_absolute():
    assert AdapterSpec(rank=0.1).rank_for((1536, 576)) == 57
    assert AdapterSpec(rank=0.1).rank_for((192, 576)) == 19
    assert AdapterSpec(rank=0.29).rank_for((100, 300)) == 29  # not 28 from 28.999999999999996
    assert AdapterSpec(rank=0.001).rank_for((64, 64)) == 1  # at least rank 1
    assert AdapterSpec(rank=1.0).rank_for((64, 32)) == 32
    assert AdapterSpec(rank=12).rank_for((64, 32)) == 12
    with pytest.raises(RecipeError, match="exceeds min"):
        AdapterSpec(rank=33).rank_for((64, 32))


def test_full_rank_adapter_reconstructs_the_error():
    w, x, stats = _problem(16, 24, 5)
    a = fit_adapter(w, stats, AdapterSpec(rank=1.0), dtype=torch.float32)
    assert torch.allclose(a.dense(), w, atol=1e-4)


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, float("nan"), "0.1", True, None])
def test_bad_rank_is_recipe_error(bad):
    with pytest.raises(RecipeError, match="rank"):
        AdapterSpec(rank=bad)


@pytest.mark.parametrize("field,value,match", [("iterations", 0, "iterations"), ("iterations", 1.5, "iterations"),
                                               ("saliency", "l2", "saliency"), ("bits", 9, "bits")])
def test_bad_adapter_fields(field, value, match):
    with pytest.raises(SparseQuantError, match=match):
        AdapterSpec(**{field: value})


def test_rank_above_min_dim_fails_before_compressing():
    w, x, stats = _problem(8, 32, 0)
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), adapter=AdapterSpec(rank=9))
    with pytest.raises(RecipeError, match="exceeds min"):
        compress_weight(w, stats, plan)


def test_nan_inputs_are_clear_errors():
    w, x, stats = _problem(8, 32, 0)
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"), adapter=AdapterSpec(rank=2))
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        compress_weight(bad, stats, plan)
    with pytest.raises(NonFiniteWeightError):
        fit_adapter(bad, stats, AdapterSpec(rank=2))
    nan_stats = LayerStats(stats.n_tokens, stats.sq_sum.clone(), stats.abs_max, None)
    nan_stats.sq_sum[0] = float("inf")
    with pytest.raises(NonFiniteWeightError):
        compress_weight(w, nan_stats, plan)
    with pytest.raises(SparseQuantError, match="statistics"):
        fit_adapter(w, None, AdapterSpec(rank=2))


def test_dead_inputs_do_not_blow_up():
    w, x, _ = _problem(16, 32, 2)
    x[:, :5] = 0  # inputs never active in calibration
    stats = LayerStats.from_inputs(x)
    a = fit_adapter(w, stats, AdapterSpec(rank=4))
    assert torch.isfinite(a.dense()).all()
    assert a.dense().abs().max() <= 2 * w.abs().max()


# -- storage ----------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(pattern=st.sampled_from(["dense", "2:4", "50%"]), bits=st.sampled_from([None, 4, 3]),
       qbits=st.sampled_from([None, 4]), group=st.sampled_from([None, 16]), seed=st.integers(0, 999))
def test_packed_round_trip_with_adapter_is_exact(pattern, bits, qbits, group, seed):
    w, x, stats = _problem(12, 48, seed, tokens=32)
    quant = QuantSpec(qbits, 16, True) if qbits else (QuantSpec(4, 16, True) if pattern == "dense" else None)
    plan = LinearPlan(prune="wanda", sparsity=SparsitySpec.parse(pattern), quant=quant,
                      adapter=AdapterSpec(rank=5, bits=bits, group_size=group))
    cw = compress_weight(w, stats, plan)
    pw = PackedWeight.from_compressed(cw)
    back = PackedWeight.from_description(pw.describe(), dict(pw.tensors)).to_compressed().validate()
    assert torch.equal(back.effective_weight(), cw.effective_weight())
    assert torch.equal(back.adapter.down, cw.adapter.down) and torch.equal(back.adapter.up, cw.adapter.up)
    base = PackedWeight.from_compressed(compress_weight(w, stats, LinearPlan(**{**plan.__dict__, "adapter": None})))
    assert pw.nbytes() == base.nbytes() + cw.adapter.nbytes()
    if bits is None:
        assert cw.adapter.nbytes() == 5 * (12 + 48) * 2
    assert pw.without_adapter().nbytes() == base.nbytes()


def test_missing_adapter_tensor_is_checkpoint_error():
    w, x, stats = _problem(8, 32, 0)
    cw = compress_weight(w, stats, LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"),
                                              adapter=AdapterSpec(rank=2, bits=4)))
    pw = PackedWeight.from_compressed(cw)
    del pw.tensors["adapter_up_scales"]
    with pytest.raises(CheckpointError, match="adapter_up_scales"):
        pw.to_compressed()
    pw = PackedWeight.from_compressed(cw)
    pw.tensors["adapter_down"] = pw.tensors["adapter_down"][:3]
    with pytest.raises(CheckpointError, match="corrupt"):
        pw.to_compressed()


def test_kernel_path_adds_the_adapter(monkeypatch):
    """The GPU path computes the packed part with a kernel and adds up (down x); emulate the kernel."""
    from sparsequant import kernels

    w, x, stats = _problem(16, 32, 4, tokens=64)
    cw = compress_weight(w, stats, LinearPlan(prune="wanda", sparsity=SparsitySpec.parse("2:4"),
                                              quant=QuantSpec(4, 16, True), adapter=AdapterSpec(rank=4, bits=4)))
    lin = SparseQuantLinear(PackedWeight.from_compressed(cw))
    seen = {}

    def prepare(packed, device, dtype):
        seen["tensors"] = set(packed.tensors)
        return packed.to_compressed().weight

    monkeypatch.setattr(kernels, "prepare", prepare)
    monkeypatch.setattr(kernels, "linear", lambda x, state: F.linear(x, state))
    lin._kernel_key = None
    x = torch.randn(3, 5, 32)
    ref = F.linear(x, cw.effective_weight())
    lin._kernel = lambda x: kernels.prepare(lin.packed.without_adapter(), x.device, x.dtype)
    y = lin(x)
    assert not any(t.startswith("adapter_") for t in seen["tensors"])
    assert torch.allclose(y, ref, atol=1e-5)
    lin._kernel = lambda x: None
    assert torch.allclose(lin(x), ref, atol=1e-6)


# -- recipes, CLI, engine -------------------------------------------------------------------
def test_recipe_yaml_round_trip_and_plan():
    r = Recipe(method="sparsegpt", pattern="2:4", quant=QuantConfig(), adapter=AdapterConfig(rank=0.1, bits=4))
    back = Recipe.from_yaml(r.to_yaml())
    assert back == r
    assert back.plan().adapter == AdapterSpec(rank=0.1, bits=4)
    assert back.plan().needs_stats
    assert "lowrank r=0.1 int4" in r.describe()["adapter"]
    r2 = Recipe.from_yaml(Recipe(adapter=AdapterConfig(rank=32, saliency="hessian")).to_yaml())
    assert r2.adapter.rank == 32 and isinstance(r2.adapter.rank, int) and r2.plan().needs_hessian
    assert sq.recipe.get_recipe("2:4-w4a16-sparsegpt-slim").adapter.rank == 0.1
    assert sq.recipe.get_recipe("2:4-w4a16-sparsegpt-slim-q4").adapter.bits == 4


@pytest.mark.parametrize("section,match", [({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"ranks": 1}, "ranks"),
                                           ("0.1", "mapping"), ({"iterations": 0}, "iterations")])
def test_bad_adapter_section_is_recipe_error(section, match):
    d = Recipe().to_dict()
    d["adapter"] = section
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(d)


def test_cli_adapter_flags():
    from sparsequant.cli import build_parser, _recipe_from_args

    args = build_parser().parse_args(["compress", "--recipe", "2:4-w4a16-sparsegpt", "--out", "x",
                                      "--adapter-rank", "0.1", "--adapter-bits", "4"])
    r = _recipe_from_args(args)
    assert r.adapter == AdapterConfig(rank=0.1, bits=4)
    args = build_parser().parse_args(["compress", "--recipe", "2:4-w4a16-sparsegpt-slim-q4", "--out", "x",
                                      "--adapter-rank", "16", "--adapter-bits", "0"])
    assert _recipe_from_args(args).adapter == AdapterConfig(rank=16, bits=None)
    args = build_parser().parse_args(["compress", "--recipe", "2:4-w4a16-sparsegpt-slim", "--out", "x",
                                      "--adapter-rank", "0"])
    assert _recipe_from_args(args).adapter is None
    args = build_parser().parse_args(["compress", "--out", "x", "--adapter-rank", "abc"])
    with pytest.raises(RecipeError, match="adapter-rank"):
        _recipe_from_args(args)


@pytest.mark.parametrize("bits", [None, 4])
def test_tiny_model_with_adapters_reloads_bit_identically(bits, tmp_path):
    recipe = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                    calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2),
                    adapter=AdapterConfig(rank=0.25, bits=bits, group_size=32))
    plain = recipe.with_(adapter=None)
    ids, x = random_ids(4, 16), random_ids(1, 16, seed=5)
    base = sq.compress(tiny_model("llama"), plain, calibration=ids, progress=False)
    model = tiny_model("llama")
    result = sq.compress(model, recipe, calibration=ids, progress=False)
    logits = model(x).logits
    sq.save(result, tmp_path / "ck")
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded(x).logits, logits)
    assert meta["size"]["adapter_bytes"] > 0
    assert meta["size"]["compressed_bytes"] == sum(p.nbytes() for p in base.packed.values()) \
        + meta["size"]["adapter_bytes"]
    # the adapters lower every layer's output error on the calibration data
    for a, b in zip(result.layers, base.layers):
        assert a.rel_error < b.rel_error
    assert all("adapter.rank" in r.info for r in result.linears)
