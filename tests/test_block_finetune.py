"""Blockwise fine-tuning: lower block error, masks and codes unchanged, exact checkpoint."""
import pytest
import torch

import sparsequant as sq
from sparsequant.checkpoint.io import load_checkpoint
from sparsequant.models.families import decoder_layers, layer_linears
from sparsequant.patterns import SparsitySpec
from sparsequant.pipeline.block_finetune import _slice_kwargs, finetune_block
from sparsequant.pipeline.capture import capture_layer_inputs, layer_output
from sparsequant.quant import QuantSpec
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe, RecoveryConfig
from sparsequant.solvers import LinearPlan, compress_weight
from sparsequant.solvers.base import LayerStats

from conftest import random_ids, tiny_model


def _compressed_layer(quant):
    """Layer 0 of a tiny LLaMA with its linears 2:4-compressed in place; dense outputs as targets."""
    model = tiny_model("llama")
    inputs = capture_layer_inputs(model, random_ids(8, 16), batch_size=4)
    layer = decoder_layers(model)[0]
    kwargs = inputs.kwargs[0]
    with torch.no_grad():
        targets = [layer_output(layer, h, kw) for h, kw in zip(inputs.hidden, kwargs)]
    linears = layer_linears(layer)
    plan = LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4"), quant=quant)
    weights = {}
    for name, lin in linears.items():
        weights[name] = compress_weight(lin.weight.detach(), LayerStats.from_inputs(torch.randn(4, lin.in_features)),
                                        plan)
        lin.weight.data.copy_(weights[name].effective_weight())
    return layer, linears, weights, inputs.hidden, targets, kwargs


@pytest.mark.parametrize("quant", [QuantSpec(4, 32), None])
def test_finetune_lowers_block_error_keeps_masks_and_codes(quant):
    layer, linears, weights, hidden, targets, kwargs = _compressed_layer(quant)
    res = finetune_block(layer, linears, weights, hidden, targets, kwargs, steps=25, lr=1e-2, windows_per_step=2,
                         storage_dtype=torch.float16, device="cpu", progress=False)
    assert res.kept and res.loss_after < 0.9 * res.loss_before
    assert len(res.history) == 25
    for name, new in res.weights.items():
        old = weights[name]
        new.validate()
        assert torch.equal(new.mask, old.mask)
        if quant is not None:
            assert torch.equal(new.codes, old.codes)
            assert torch.equal(new.qparams.scale, new.qparams.scale.half().float())
        else:
            assert torch.equal(new.weight, new.weight.half().float())
        # the layer holds exactly the stored (rounded) weights
        assert torch.equal(linears[name].weight, new.effective_weight())
    # the reported loss is the loss of what the layer now computes
    with torch.no_grad():
        num = sum(float((layer_output(layer, h, kw) - t).pow(2).sum()) for h, t, kw in zip(hidden, targets, kwargs))
    assert num / sum(t.numel() for t in targets) == pytest.approx(res.loss_after, rel=1e-5)


def test_finetune_that_does_not_help_leaves_the_layer_unchanged():
    layer, linears, weights, hidden, targets, kwargs = _compressed_layer(QuantSpec(4, 32))
    before = {n: lin.weight.clone() for n, lin in linears.items()}
    # targets equal to the compressed outputs: the loss is already zero, nothing can improve it
    targets = [layer_output(layer, h, kw) for h, kw in zip(hidden, kwargs)]
    res = finetune_block(layer, linears, weights, hidden, targets, kwargs, steps=3, lr=1e-2, windows_per_step=4,
                         storage_dtype=torch.float16, device="cpu", progress=False)
    assert not res.kept
    assert all(torch.equal(linears[n].weight, before[n]) for n in linears)
    assert res.weights[next(iter(weights))] is weights[next(iter(weights))]


def test_slicing_windows_slices_kwargs_consistently():
    model = tiny_model("gemma2")  # sliding-window masks per layer
    inputs = capture_layer_inputs(model, random_ids(4, 16), batch_size=4)
    layer = decoder_layers(model)[0]
    h, kw = inputs.hidden[0], inputs.kwargs[0][0]
    full = layer_output(layer, h, kw)
    part = layer_output(layer, h[1:3], _slice_kwargs(kw, slice(1, 3), 4))
    assert torch.allclose(part, full[1:3], atol=1e-5)


def test_engine_finetune_round_trip_and_codes_unchanged(tmp_path):
    recipe = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                    calibration=CalibrationConfig(samples=8, seq_len=16, batch_size=4))
    ids, x = random_ids(8, 16), random_ids(2, 16, seed=9)
    plain = sq.compress(tiny_model("llama"), recipe, calibration=ids, progress=False)
    model = tiny_model("llama")
    tuned_recipe = recipe.with_(recovery=RecoveryConfig(variance_correction=True, finetune_steps=20,
                                                        finetune_lr=1e-2, finetune_batch=2))
    result = sq.compress(model, tuned_recipe, calibration=ids, progress=False)
    rec = result.layers[0].recovery
    assert rec["finetune_steps"] == 20 and rec["finetune_mse_after"] < rec["finetune_mse_before"]
    # first layer: same inputs in both runs, so the same masks and codes; only scales moved
    name = "model.layers.0.mlp.up_proj"
    a, b = plain.packed[name].tensors, result.packed[name].tensors
    assert torch.equal(a["qweight"], b["qweight"]) and torch.equal(a["meta"], b["meta"])
    assert not torch.equal(a["scales"], b["scales"])
    logits = model(x).logits
    sq.save(result, tmp_path / "ck")
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded(x).logits, logits)


def test_finetune_float_sparse_weights_through_engine():
    recipe = Recipe(method="wanda", pattern="2:4", quant=None, calibration=CalibrationConfig(samples=4, seq_len=16,
                    batch_size=4), recovery=RecoveryConfig(finetune_steps=10, finetune_lr=1e-2))
    model = tiny_model("llama")
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    for pw in result.packed.values():
        cw = pw.to_compressed().validate()
        assert cw.mask.float().mean() == 0.5
