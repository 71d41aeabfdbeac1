"""Int8Linear (the LM head as int8 rows + one scale per row) and its opt-in paths (load, twin, CLI)."""
import copy

import pytest
import torch
from torch import nn

import sparsequant as sq
from sparsequant.errors import NonFiniteWeightError, SparseQuantError
from sparsequant.nn.int8_linear import Int8Linear, quantize_lm_head
from sparsequant.runtime import synthetic as syn
from sparsequant.runtime.engine import DecodeEngine, left_pad

from conftest import random_ids, runtime_cli, tiny_config, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_a_float64_product_with_the_dequantized_weight(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 70, bias=bias)
    q = Int8Linear.from_linear(lin.to(dtype))
    assert (q.in_features, q.out_features, q.compute_dtype) == (48, 70, dtype)
    w = q.codes.double() * q.scales.double()[:, None]
    # every weight within half a step of its float value
    assert bool(((lin.weight.double() - w).abs() <= q.scales.double()[:, None] / 2 + 1e-12).all())
    x = torch.randn(3, 5, 48).to(dtype)
    want = x.double() @ w.T + (lin.bias.double() if bias else 0)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 5, 70)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * (want.abs().max().item() + 1)
    assert (y.double() - want).abs().max().item() < tol


def test_to_changes_the_compute_dtype_and_keeps_int8_codes():
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    h = q.half()
    assert h.compute_dtype == torch.float16 and h.codes.dtype == torch.int8 and h.bias.dtype == torch.float16
    assert h.scales.dtype == torch.float16
    assert h(torch.randn(2, 16).half()).dtype == torch.float16
    assert q.nbytes() == 8 * 16 + 2 * 8 + 2 * 8


def test_bad_heads_are_clear_errors():
    bad = nn.Linear(8, 4)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        Int8Linear.from_linear(bad)
    with pytest.raises(SparseQuantError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Embedding(4, 8))
    with pytest.raises(SparseQuantError, match="int8"):
        Int8Linear(torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(SparseQuantError, match="scales"):
        Int8Linear(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def test_quantize_lm_head_keeps_logits_close_and_halves_the_head():
    model = tiny_model("llama", seed=1)
    ids = random_ids(2, 10, seed=2)
    with torch.no_grad():
        want = model(ids).logits
        small = copy.deepcopy(model)
        q = quantize_lm_head(small)
        assert isinstance(small.get_output_embeddings(), Int8Linear) and quantize_lm_head(small) is q
        got = small(ids).logits
        exact = model.model(ids).last_hidden_state @ q.dequantize().T
    assert torch.allclose(got, exact, atol=1e-5, rtol=1e-5)  # the module computes its own weight exactly
    assert float((got - want).norm() / want.norm()) < 1e-2  # and per-row int8 is close to the float head


def test_a_tied_head_gets_its_own_int8_table_and_the_config_is_untied():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    table = model.get_input_embeddings().weight
    q = quantize_lm_head(model)
    assert model.config.tie_word_embeddings is False
    assert model.get_input_embeddings().weight is table  # the lookup keeps the float table
    model.tie_weights()  # must not undo the int8 head
    assert model.get_output_embeddings() is q
    assert torch.allclose(q.dequantize(), table, atol=float(q.scales.max()) / 2 + 1e-7)
    # with the head int8, the embedding may be int8 too (its own copy of the same codes)
    from sparsequant.nn.embedding import quantize_input_embedding

    e = quantize_input_embedding(model)
    assert torch.equal(e.codes, q.codes) and torch.equal(e.scales, q.scales)
    ids = random_ids(1, 5, seed=1)
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids).logits).all())


def test_twin_load_and_dense_twin_with_an_int8_head(tmp_path):
    cfg = syn.synthetic_config("tiny-llama")
    dense = syn.build_dense(cfg, device="cpu", dtype=torch.float16)
    plain, _ = syn.sparse_twin(dense)
    small, _ = syn.sparse_twin(dense, head_int8=True)
    head = small.get_output_embeddings()
    assert isinstance(head, Int8Linear) and isinstance(dense.get_output_embeddings(), nn.Linear)
    v, d = cfg.vocab_size, cfg.hidden_size
    assert syn.weight_bytes_on(plain, "cpu") - syn.weight_bytes_on(small, "cpu") == 2 * v * d - head.nbytes()
    back = syn.dense_twin(small)
    assert torch.equal(back.get_output_embeddings().weight, head.dequantize())

    model = tiny_model("llama", seed=4)
    sq.save(syn.compress_model_nm24(model, bits=4, group_size=32), tmp_path / "ck")
    ref, _ = sq.load(tmp_path / "ck")
    loaded, _ = sq.load(tmp_path / "ck", head_int8=True, embed_int8=True)
    assert isinstance(loaded.get_output_embeddings(), Int8Linear)
    ids, mask = left_pad([random_ids(1, 6, seed=8)[0].tolist()], 0)
    with torch.no_grad():
        a, b = ref(ids).logits, loaded(ids).logits
    assert float((a - b).norm() / a.norm()) < 2e-2
    eng = DecodeEngine(loaded, 1, 32)  # the engine runs it (CPU: the reference path)
    logits = eng.prefill(ids, mask)
    assert logits.shape == (1, model.config.vocab_size) and bool(torch.isfinite(logits).all())


def test_commands_take_the_head_int8_flag():
    root = runtime_cli()
    assert root.parse_args(["generate", "--prompt", "x", "--head-int8"]).head_int8 is True
    assert root.parse_args(["generate", "--prompt", "x"]).head_int8 is False
    assert root.parse_args(["bench", "llama-2-7b", "--head-int8"]).head_int8 is True


@pytest.mark.gpu
def test_gpu_kernel_path_equals_the_reference_and_compiles():
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(4096, 1000)).half().cuda()
    x = torch.randn(3, 1, 4096, device="cuda").half()
    ref = q.cpu().float()(x.cpu().float()).cuda()
    q = q.cuda().half()
    y = q(x)
    assert y.dtype == torch.float16
    assert float((y.float() - ref).abs().max()) < 2e-3 * float(ref.abs().max()) + 1e-3
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), y)
