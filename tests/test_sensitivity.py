"""Layer sensitivity on a tiny model, selective recipes, and the command."""
import copy
import json

import pytest
import torch

import sparsequant as sq
from sparsequant.cli import main
from sparsequant.errors import RecipeError
from sparsequant.eval.perplexity import perplexity
from sparsequant.pipeline.sensitivity import SensitivityResult, UnitRow, bar_chart, layer_sensitivity, selective_recipe
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe, RecoveryConfig

from conftest import random_ids, tiny_model

RECIPE = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2))


def test_layer_units_equal_compressing_that_layer_alone():
    model = tiny_model("llama")
    calib, ev = random_ids(4, 16), random_ids(4, 16, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = RECIPE.with_(recovery=RecoveryConfig(variance_correction=True))
    res = layer_sensitivity(model, recipe, calib, ev, eval_batch=2, progress=False)
    # the model is left dense, biases and all
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert res.dense_ppl == pytest.approx(perplexity(model, ev, batch_size=2, progress=False), rel=1e-6)
    layers = [r for r in res.rows if r.kind == "layer"]
    types = [r for r in res.rows if r.kind == "type"]
    assert [r.unit for r in layers] == ["0", "1"] and len(types) == 7
    assert types[0].unit == "self_attn.q_proj" and types[-1].unit == "mlp.down_proj"
    for row in layers:
        alone = recipe.with_(overrides=[{"match": "*", "pattern": "dense", "quant": None},
                                        {"match": row.match, "pattern": "2:4", "quant": {"bits": 4, "group_size": 32}}])
        m = copy.deepcopy(model)
        sq.compress(m, alone, calibration=calib, progress=False)
        # the engine also rounds embeddings and norms to float16, hence not bit-equal
        assert row.ppl == pytest.approx(perplexity(m, ev, batch_size=2, progress=False), rel=2e-3)
        assert row.zeros * 2 == row.params and row.delta_ppl == pytest.approx(row.ppl - res.dense_ppl)
    assert sum(r.params for r in types) == sum(r.params for r in layers)


def _table(deltas, zeros_per=50, params=100, nbytes=40):
    rows = [UnitRow("layer", str(i), f"model.layers.{i}.*", 10 + d, d, params, zeros_per, nbytes, 0.0, [[10, 10]])
            for i, d in enumerate(deltas)]
    return SensitivityResult(10.0, rows, RECIPE.to_dict(), {})


def test_selective_keeps_most_sensitive_under_target_sparsity():
    res = _table([5.0, 0.5, 9.0, 1.0, -0.2, 3.0])
    new, summary = selective_recipe(res, RECIPE, target_sparsity=0.33)
    # 6 layers of 50% sparsity: 0.33 allows keeping 2 (4 x 50 / 600 = 0.333)
    assert summary["kept"] == ["2", "0"] and summary["predicted"]["sparsity"] >= 0.33
    assert [o["match"] for o in new.overrides] == ["model.layers.2.*", "model.layers.0.*"]
    assert new.plan_for("model.layers.2.mlp.up_proj").sparsity.is_dense
    assert new.plan_for("model.layers.2.mlp.up_proj").quant.bits == 4  # kept dense with the recipe's quant
    assert str(new.plan_for("model.layers.1.mlp.up_proj").sparsity) == "2:4"
    assert Recipe.from_yaml(new.to_yaml()) == new


def test_selective_under_target_bits_and_keep_as():
    res = _table([5.0, 0.5, 9.0, 1.0])
    # dense int4 g32 of a 10x10 weight: 50 bytes of codes + 10 rows x 1 group x 2 bytes = 70 bytes
    new, summary = selective_recipe(res, RECIPE, target_bits=(3 * 40 + 70) * 8 / 400)
    assert summary["kept"] == ["2"] and summary["predicted"]["bits_per_weight"] <= (3 * 40 + 70) * 8 / 400
    new, summary = selective_recipe(res, RECIPE, target_sparsity=0.25, keep_as="int8")
    assert new.plan_for("model.layers.2.mlp.up_proj").quant.bits == 8
    new, _ = selective_recipe(res, RECIPE, target_sparsity=0.25, keep_as="fp16")
    assert new.plan_for("model.layers.2.mlp.up_proj") is None
    _, summary = selective_recipe(res, RECIPE, target_sparsity=0.5)
    assert summary["kept"] == []


def test_selective_errors():
    res = _table([1.0, 2.0])
    with pytest.raises(RecipeError, match="exactly one"):
        selective_recipe(res, RECIPE)
    with pytest.raises(RecipeError, match="exactly one"):
        selective_recipe(res, RECIPE, target_sparsity=0.4, target_bits=3)
    with pytest.raises(RecipeError, match="only 0.500"):
        selective_recipe(res, RECIPE, target_sparsity=0.6)
    with pytest.raises(RecipeError, match="no 'type' rows"):
        selective_recipe(res, RECIPE, target_sparsity=0.4, kind="type")
    with pytest.raises(RecipeError, match="keep_as"):
        selective_recipe(res, RECIPE, target_sparsity=0.4, keep_as="int3")


def test_command_from_saved_table_writes_recipe_and_chart(tmp_path, capsys):
    res = _table([5.0, 0.5, 9.0, 1.0, 0.1, 3.0])
    res.rows.append(UnitRow("type", "mlp.down_proj", "*.mlp.down_proj", 20.0, 10.0, 600, 300, 240, 0.0, []))
    saved = tmp_path / "in.json"
    saved.write_text(json.dumps(res.to_dict()))
    out = tmp_path / "sens"
    rc = main(["sensitivity", "--from", str(saved), "--out", str(out), "--target-sparsity", "0.4",
               "--write-recipe", str(tmp_path / "sel.yaml"), "--quiet"])
    assert rc == 0
    for ext in ("json", "csv", "md", "png"):
        assert (out / f"sensitivity.{ext}").stat().st_size > 0
    sel = Recipe.from_yaml((tmp_path / "sel.yaml").read_text())
    assert [o["match"] for o in sel.overrides] == ["model.layers.2.*"]
    # the scan's small calibration is not inherited: the recipe calibrates like a normal run
    assert sel.calibration == CalibrationConfig()
    assert "kept as quant" in capsys.readouterr().out
    # --write-recipe without a target is refused
    assert main(["sensitivity", "--from", str(saved), "--write-recipe", str(tmp_path / "x.yaml")]) == 2


def test_bar_chart_writes_png(tmp_path):
    res = _table([5.0, 0.5, 9.0])
    bar_chart(res, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_units_rejected():
    with pytest.raises(RecipeError, match="layer"):
        layer_sensitivity(tiny_model("llama"), RECIPE, random_ids(2, 8), random_ids(2, 8), kinds=("block",),
                          progress=False)
