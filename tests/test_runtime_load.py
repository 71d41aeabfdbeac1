"""sparsequant.load: a meta-device skeleton, packed weights only, and per-device placement."""
import pytest
import torch

import sparsequant as sq
from sparsequant.nn.convert import place_on_device
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe
from sparsequant.runtime.generate import generate

from conftest import random_ids, tiny_model

RECIPE = Recipe(method="magnitude", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                calibration=CalibrationConfig(samples=2, seq_len=16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    result = sq.compress(model, RECIPE, calibration=random_ids(2, 16), progress=False)
    path = tmp_path_factory.mktemp("ck") / "ck"
    sq.save(result, path)
    return path, result


def _dense_shaped(model, names):
    """Floating tensors anywhere in the model shaped like a compressed linear's dense weight."""
    shapes = {tuple(m.packed.shape) for n, m in model.named_modules() if n in names}
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and t.dim() == 2 and tuple(t.shape) in shapes and "embed" not in n
            and "lm_head" not in n]


def test_load_holds_only_packed_weights_and_reproduces_logits(checkpoint):
    path, result = checkpoint
    model, _ = sq.load(path, fuse=False)  # the stored linears one for one (fused loads: test_fuse.py)
    names = set(result.packed)
    assert {n for n, m in model.named_modules() if isinstance(m, SparseQuantLinear)} == names
    assert _dense_shaped(model, names) == []
    assert all(m._dense_cache is None for m in model.modules() if isinstance(m, SparseQuantLinear))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay one tensor
    ids = random_ids(2, 9, seed=5)
    torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)


def test_load_with_another_dtype(checkpoint):
    path, result = checkpoint
    model, _ = sq.load(path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = random_ids(1, 6, seed=2)
    ref = result.model(ids).logits
    got = model(ids).logits.float()
    assert (got - ref).norm() / ref.norm() < 3e-2


def test_place_on_device_keeps_packed_bits_off_the_device_when_a_kernel_takes_them(checkpoint, monkeypatch):
    """The GPU placement logic, exercised on the meta device with a stand-in kernel."""
    from sparsequant import kernels

    path, _ = checkpoint
    model, _ = sq.load(path)
    made = []
    monkeypatch.setattr(kernels, "prepare", lambda packed, device, dtype, act_quant=None: made.append(device) or "state")
    assert place_on_device(model, "meta", torch.float16) == []
    lins = [m for m in model.modules() if isinstance(m, SparseQuantLinear)]
    assert len(made) == len(lins) and all(m._kernel_state == "state" for m in lins)
    assert all(getattr(m, f"packed_{t}").device.type == "cpu" for m in lins for t in m._names)
    others = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if ".packed_" not in n]
    assert all(t.is_meta for t in others)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_place_on_device_without_a_kernel_moves_the_packed_tensors_and_warns(checkpoint, monkeypatch):
    from sparsequant import kernels

    path, _ = checkpoint
    model, _ = sq.load(path)
    monkeypatch.setattr(kernels, "prepare", lambda *a, **k: None)
    with pytest.warns(UserWarning, match="reference path"):
        missing = place_on_device(model, "meta", torch.float16)
    lins = [m for m in model.modules() if isinstance(m, SparseQuantLinear)]
    assert len(missing) == len(lins)
    assert all(getattr(m, f"packed_{t}").is_meta for m in lins for t in m._names)


@pytest.mark.gpu
def test_gpu_load_generates_like_the_cpu_reference(tmp_path):
    import transformers as tf

    from sparsequant.runtime.synthetic import compress_model_nm24

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    result = compress_model_nm24(model, bits=4, group_size=128)
    sq.save(result, tmp_path / "ck")
    ref, _ = sq.load(tmp_path / "ck", dtype=torch.float16)
    before = torch.cuda.memory_allocated()
    fast, _ = sq.load(tmp_path / "ck", device="cuda")
    held = torch.cuda.memory_allocated() - before
    lins = [m for m in fast.modules() if isinstance(m, SparseQuantLinear)]
    assert all(m._kernel_state is not None for m in lins)
    packed = sum(m.packed.nbytes() for m in lins)
    other = sum(t.numel() * t.element_size() for n, t in fast.state_dict().items() if ".packed_" not in n)
    assert held < 1.15 * (packed + other) + (1 << 20), (held, packed, other)
    rows = [[1, 2, 3, 4], [7, 8]]
    want = generate(ref, rows, max_new_tokens=32, eos_token_id=[]).tokens
    got = generate(fast, rows, max_new_tokens=32, eos_token_id=[]).tokens
    assert got == want
    ids = random_ids(2, 16, vocab=512)
    a = ref(ids).logits.double()
    b = fast(ids.cuda()).logits.double().cpu()
    assert (a - b).norm() / a.norm() < 1e-2
