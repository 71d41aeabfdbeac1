"""The calibration engine, checkpoint round trip and bad inputs, on tiny random models of every family."""
import json

import pytest
import torch

import sparsequant as sq
from sparsequant.checkpoint.io import TENSOR_FILE, load_checkpoint
from sparsequant.errors import CheckpointError, OutputExistsError, UnsupportedModelError, PatternError
from sparsequant.models.families import decoder_layers, family_of, layer_linears
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.patterns import validate_nm
from sparsequant.pipeline.capture import capture_layer_inputs
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe

from conftest import FAMILIES, random_ids, tiny_model

RECIPE = Recipe(method="wanda", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_every_family(family, tmp_path):
    model = tiny_model(family)
    layers = decoder_layers(model)
    assert len(layers) == 2
    linears = layer_linears(layers[0])
    assert len(linears) >= 4
    ids = random_ids(4, 16)
    x = random_ids(1, 16, seed=5)
    dense_logits = model(x).logits
    result = sq.compress(model, RECIPE, calibration=ids, progress=False)
    assert len(result.packed) == 2 * len(linears)
    for name, pw in result.packed.items():
        cw = pw.to_compressed()
        validate_nm(cw.mask, 2, 4)
    for rep in result.layers:
        assert 0 < rep.rel_error < 2
    comp_logits = model(x).logits
    assert not torch.allclose(dense_logits, comp_logits)  # something really changed
    # the checkpoint reproduces the in-memory compressed model bit for bit
    sq.save(result, tmp_path / "ck")
    loaded, _, meta = load_checkpoint(tmp_path / "ck")
    assert sum(isinstance(m, SparseQuantLinear) for m in loaded.modules()) == len(result.packed)
    assert torch.equal(loaded(x).logits, comp_logits)
    assert meta["size"]["bits_per_weight"] < 4


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_layer_kwargs_captured_per_layer(family):
    model = tiny_model(family)
    inputs = capture_layer_inputs(model, random_ids(2, 16), batch_size=1)
    assert len(inputs.hidden) == 2 and inputs.hidden[0].shape == (1, 16, 64)
    assert len(inputs.kwargs) == 2 and all(len(k) == 2 for k in inputs.kwargs)
    assert "position_embeddings" in inputs.kwargs[0][0]
    # the layers' forward methods are restored
    assert "forward" not in decoder_layers(model)[0].__dict__


def test_engine_outputs_feed_next_layer_exactly():
    """Replaying the compressed layers on captured inputs equals the compressed model's hidden states."""
    model = tiny_model("llama")
    ids = random_ids(2, 16)
    sq.compress(model, RECIPE.with_(calibration=CalibrationConfig(samples=2, seq_len=16, batch_size=2)),
                calibration=ids, progress=False)
    out = model(ids, output_hidden_states=True)
    inputs = capture_layer_inputs(model, ids, batch_size=2)
    h = inputs.hidden[0]
    for i, layer in enumerate(decoder_layers(model)):
        h = layer(h, **inputs.kwargs[i][0])
        h = h[0] if isinstance(h, tuple) else h
    assert torch.allclose(model.model.norm(h), out.hidden_states[-1], atol=1e-5)


def test_true_sequential_groups_and_differs():
    ids = random_ids(4, 16)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = sq.compress(a, RECIPE, calibration=ids, progress=False)
    rb = sq.compress(b, RECIPE.with_(true_sequential=True), calibration=ids, progress=False)
    assert set(ra.packed) == set(rb.packed)
    # the first layer's q/k/v see the same inputs either way; later linears see compressed inputs
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(ra.packed[q].to_compressed().weight, rb.packed[q].to_compressed().weight)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(ra.packed[down].to_compressed().mask, rb.packed[down].to_compressed().mask)


def test_skip_leaves_layers_dense():
    model = tiny_model("llama")
    recipe = RECIPE.with_(skip=("*.mlp.down_proj", "model.layers.1.*"))
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    assert all("down_proj" not in n and ".layers.1." not in n for n in result.packed)
    assert len(result.packed) == 6


def test_unknown_architecture_is_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="LLaMA"):
        family_of(model)
    with pytest.raises(UnsupportedModelError):
        sq.compress(model, RECIPE, calibration=random_ids(2, 8, vocab=64), progress=False)


def test_input_dim_not_divisible_is_clear_error():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=36, intermediate_size=72, num_hidden_layers=1, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=64, head_dim=12)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(PatternError, match="not divisible by M=8"):
        sq.compress(model, RECIPE.with_(pattern="4:8"), calibration=random_ids(2, 8, vocab=64), progress=False)


def test_nan_weights_rejected_and_model_untouched():
    model = tiny_model("llama")
    lin = decoder_layers(model)[0].self_attn.k_proj
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    before = decoder_layers(model)[0].self_attn.q_proj.weight.clone()
    with pytest.raises(sq.SparseQuantError, match="NaN"):
        sq.compress(model, RECIPE, calibration=random_ids(2, 8), progress=False)
    # q_proj comes before k_proj: it may be compressed, but no exception leaves half a file anywhere
    assert before.shape == decoder_layers(model)[0].self_attn.q_proj.weight.shape


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_model("llama")
    result = sq.compress(model, RECIPE, calibration=random_ids(4, 16), progress=False)
    sq.save(result, tmp_path / "ck")
    return tmp_path / "ck"


def test_output_folder_with_files_is_kept(checkpoint, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    model = tiny_model("llama")
    result = sq.compress(model, RECIPE, calibration=random_ids(4, 16), progress=False)
    with pytest.raises(OutputExistsError, match="already holds files"):
        sq.save(result, user)
    assert (user / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]  # no temp left behind
    sq.save(result, user, overwrite=True)  # asked for explicitly
    assert (user / TENSOR_FILE).is_file() and not (user / "notes.txt").exists()


def test_truncated_checkpoint_is_clear_error(checkpoint):
    f = checkpoint / TENSOR_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(checkpoint, verify=False)


def test_corrupt_byte_detected(checkpoint):
    f = checkpoint / TENSOR_FILE
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(checkpoint)


def test_format_version_mismatch(checkpoint):
    meta_file = checkpoint / "sparsequant.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(checkpoint)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a sparsequant checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "phi", "phi3"])
def test_smoothing_keeps_the_function(family):
    """Equalization alone (8-bit per-channel quantization of a dense model is nearly lossless) must
    not change the model's output beyond quantization noise, and must change the norm weights."""
    from sparsequant.pipeline.equalize import equalize_layer
    from sparsequant.pipeline.capture import capture_layer_inputs

    model = tiny_model(family)
    ids = random_ids(2, 16)
    ref = model(ids).logits
    inputs = capture_layer_inputs(model, ids, batch_size=2)
    layer = decoder_layers(model)[0]
    norms = [p.detach().clone() for n, p in layer.named_parameters() if "norm" in n]
    equalize_layer(layer, family_of(model), inputs.hidden, inputs.kwargs[0], 0.5, "cpu")
    after = [p.detach() for n, p in layer.named_parameters() if "norm" in n]
    assert any(not torch.equal(a, b) for a, b in zip(norms, after))
    assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_smoothing_recipe_runs():
    model = tiny_model("llama")
    recipe = RECIPE.with_(smoothing=0.5, pattern="dense", quant=QuantConfig(bits=8, group_size=None))
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    assert all(r.rel_error < 0.05 for r in result.layers)


@pytest.mark.parametrize("recipe", [
    Recipe(method="sparsegpt", pattern="2:4", quant=QuantConfig(bits=4, group_size=32), joint=True,
           calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2)),
    Recipe(method="wanda", pattern="4:8", quant=QuantConfig(method="gptq", bits=3, group_size=32), true_sequential=True,
           calibration=CalibrationConfig(samples=4, seq_len=16, batch_size=2)),
])
def test_hessian_solvers_through_the_engine(recipe, tmp_path):
    model = tiny_model("qwen2")
    x = random_ids(1, 16, seed=9)
    result = sq.compress(model, recipe, calibration=random_ids(4, 16), progress=False)
    assert any(k.endswith("damp") for r in result.linears for k in r.info)  # diagnostics reach the log
    sq.save(result, tmp_path / "ck")
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded(x).logits, model(x).logits)
    for pw in result.packed.values():
        cw = pw.to_compressed()
        validate_nm(cw.mask, recipe.sparsity.n, recipe.sparsity.m)
