"""Per-linear recipe overrides: order, merging, YAML round trip, clear errors, honoured by the engine."""
import pytest
import torch

import sparsequant as sq
from sparsequant.errors import RecipeError
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe

from conftest import random_ids, tiny_model

BASE = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
              calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2))


def test_overrides_apply_in_order_later_wins():
    r = BASE.with_(overrides=[
        {"match": "model.layers.3.*", "pattern": "dense"},
        {"match": "*.down_proj", "quant": {"bits": 8, "group_size": None}},
        {"match": "model.layers.3.mlp.*", "pattern": "4:8"},
    ])
    p = r.plan_for("model.layers.3.mlp.down_proj")
    assert str(p.sparsity) == "4:8" and p.quant.bits == 8 and p.quant.group_size is None
    p = r.plan_for("model.layers.3.self_attn.q_proj")
    assert p.sparsity.is_dense and p.quant.bits == 4 and p.quant.group_size == 32  # quant merged, not replaced
    p = r.plan_for("model.layers.0.mlp.down_proj")
    assert str(p.sparsity) == "2:4" and p.quant.bits == 8
    assert r.plan_for("model.layers.0.mlp.up_proj") == BASE.plan()
    # reversing the order changes the result for the overlapping linear
    rev = BASE.with_(overrides=[r.overrides[2], r.overrides[0]])
    assert rev.plan_for("model.layers.3.mlp.down_proj").sparsity.is_dense


def test_dense_and_unquantized_means_untouched_and_skip_wins():
    r = BASE.with_(overrides=[{"match": "model.layers.1.*", "pattern": "dense", "quant": None},
                              {"match": "*.q_proj", "method": "magnitude", "joint": False}], skip=("*.k_proj",))
    assert r.plan_for("model.layers.1.mlp.up_proj") is None
    assert r.plan_for("model.layers.0.self_attn.k_proj") is None
    assert r.plan_for("model.layers.0.self_attn.q_proj").prune == "magnitude"
    # an override can add quantization to an unquantized recipe (defaults fill the rest)
    r2 = BASE.with_(quant=None, overrides=[{"match": "*.v_proj", "quant": {"bits": 8}}])
    q = r2.plan_for("model.layers.0.self_attn.v_proj").quant
    assert q.bits == 8 and q.group_size == 128
    assert r2.plan_for("model.layers.0.self_attn.q_proj").quant is None


def test_yaml_round_trip():
    r = BASE.with_(overrides=[{"match": "model.layers.3.*", "pattern": "dense"},
                              {"match": "*.down_proj", "quant": {"bits": 8, "group_size": None}},
                              {"match": "*.o_proj", "quant": None, "options": {}}])
    back = Recipe.from_yaml(r.to_yaml())
    assert back == r and back.overrides == r.overrides
    assert Recipe.from_yaml(BASE.to_yaml()).overrides == ()


@pytest.mark.parametrize("bad, message", [
    ({"pattern": "dense"}, "match"),
    ({"match": "*", "patern": "dense"}, "unknown key"),
    ({"match": "*"}, "changes nothing"),
    ({"match": "*", "pattern": "3:4:5"}, "overrides\\[0\\]"),
    ({"match": "*", "method": "nope"}, "unknown pruning method"),
    ({"match": "*", "quant": {"bits": 11}}, "bits"),
    ({"match": "*", "quant": {"bitz": 4}}, "bad quant"),
    ({"match": "*", "quant": {"method": "nope"}}, "unknown quantizer"),
    ({"match": "*", "quant": 8}, "mapping"),
    ({"match": "*", "joint": "yes"}, "joint"),
    ("model.layers.3.*", "mapping"),
])
def test_bad_overrides_are_clear_errors(bad, message):
    with pytest.raises(RecipeError, match=message):
        BASE.with_(overrides=[bad])


def test_overrides_must_be_a_list():
    with pytest.raises(RecipeError, match="list"):
        Recipe.from_dict({"overrides": {"match": "*", "pattern": "dense"}})


def test_engine_honours_overrides():
    recipe = BASE.with_(overrides=[{"match": "model.layers.1.*", "pattern": "dense",
                                    "quant": {"bits": 8, "group_size": None}},
                                   {"match": "*.down_proj", "pattern": "dense", "quant": None}])
    result = sq.compress(tiny_model("llama"), recipe, calibration=random_ids(4, 16), progress=False)
    assert not any(n.endswith("down_proj") for n in result.packed)
    l0 = result.packed["model.layers.0.mlp.up_proj"]
    l1 = result.packed["model.layers.1.mlp.up_proj"]
    assert l0.storage == "nm24" and l0.quant.bits == 4
    assert l1.storage == "dense" and l1.quant.bits == 8 and l1.quant.group_size is None


def test_dense_layer_of_a_joint_sparsegpt_plan_is_quantized_with_compensation():
    """A layer kept dense under joint SparseGPT is GPTQ-quantized (SparseGPT with nothing to prune),
    not rounded to nearest: its output error on the calibration inputs is lower than RTN's."""
    from sparsequant.patterns import SparsitySpec
    from sparsequant.quant import QuantSpec
    from sparsequant.solvers import LinearPlan, compress_weight
    from test_sparsegpt import problem, stats_of

    w, x = problem(3, out=32, k=128, tokens=512, dtype=torch.float32)
    st = stats_of(x, torch.float32)
    q = QuantSpec(4, 32, True)
    joint = LinearPlan(prune="sparsegpt", sparsity=SparsitySpec.parse("dense"), quant=q, joint=True)
    rtn = LinearPlan(prune="sparsegpt", sparsity=SparsitySpec.parse("dense"), quant=q, joint=False)
    assert joint.uses_joint and not rtn.uses_joint
    info: dict = {}
    cw_joint, cw_rtn = compress_weight(w, st, joint, info=info), compress_weight(w, st, rtn)
    assert "joint" in info
    assert cw_joint.mask is None or bool(cw_joint.mask.all())
    err = lambda cw: float(((cw.effective_weight().float() - w) @ x.float().T).pow(2).sum())  # noqa: E731
    assert err(cw_joint) < 0.8 * err(cw_rtn)
