import pytest

from sparsequant.errors import PatternError, QuantizationError, RecipeError
from sparsequant.recipe import PRESETS, QuantConfig, Recipe, get_recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_round_trip_yaml(name):
    r = get_recipe(name)
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_yaml_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: magnitude\npattern: '4:8'\nquant:\n  bits: 3\n  group_size: 64\n  symmetric: false\n"
                 "skip: ['*.down_proj']\n")
    r = get_recipe(str(f))
    assert r.method == "magnitude" and r.sparsity.m == 8 and r.quant.bits == 3 and not r.quant.symmetric
    assert r.plan_for("model.layers.3.mlp.down_proj") is None
    assert r.plan_for("model.layers.3.mlp.up_proj").quant.group_size == 64


def test_bad_recipes():
    with pytest.raises(RecipeError, match="unknown recipe keys"):
        Recipe.from_dict({"metod": "wanda"})
    with pytest.raises(RecipeError, match="unknown pruning method"):
        Recipe(method="nonsense")
    with pytest.raises(PatternError):
        Recipe(pattern="5:4")
    with pytest.raises(QuantizationError):
        Recipe(quant=QuantConfig(bits=1))
    with pytest.raises(RecipeError, match="neither prunes nor quantizes"):
        Recipe(pattern="dense", quant=None)
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("no-such-preset")
    with pytest.raises(RecipeError, match="does not exist"):
        get_recipe("missing.yaml")
