"""Synthetic models, the bench engine and the generate/bench/export commands, on the CPU with tiny sizes."""
import json

import pytest
import torch

import sparsequant as sq
from sparsequant.cli import main
from sparsequant.errors import SparseQuantError
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe
from sparsequant.runtime import synthetic as syn
from sparsequant.runtime.bench import BenchSettings, run_bench

from conftest import random_ids, tiny_model


def test_synthetic_configs_have_the_real_shapes():
    c = syn.synthetic_config("llama-2-7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == \
        (4096, 11008, 32, 32, 32000)
    c = syn.synthetic_config("llama-3-8b", layers=4)
    assert (c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (14336, 4, 8, 128256)
    with pytest.raises(SparseQuantError, match="layers"):
        syn.synthetic_config("llama-2-7b", layers=33)
    with pytest.raises(SparseQuantError, match="unknown synthetic config"):
        syn.synthetic_config("llama-9")
    with pytest.raises(SparseQuantError, match="unknown synthetic scheme"):
        syn.get_scheme("3:4")


def test_build_dense_is_seeded_and_finite():
    cfg = syn.synthetic_config("tiny-llama")
    a, b = syn.build_dense(cfg, device="cpu", seed=1), syn.build_dense(cfg, device="cpu", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(p.dtype == torch.float16 and not p.is_meta for p in a.parameters())
    logits = a(random_ids(1, 8, vocab=512)).logits
    assert torch.isfinite(logits).all()


def test_sparse_twin_shares_the_uncompressed_tensors_and_packs_like_the_cpu_path():
    from sparsequant.patterns import SparsitySpec
    from sparsequant.quant import QuantSpec
    from sparsequant.solvers import LinearPlan, compress_weight

    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cpu", seed=2)
    twin, _ = syn.sparse_twin(dense, "2:4-w4a16")
    assert twin.model.embed_tokens.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    assert twin.lm_head.weight.data_ptr() == dense.lm_head.weight.data_ptr()
    lin = twin.model.layers[1].mlp.down_proj
    assert isinstance(lin, SparseQuantLinear) and lin.quant == QuantSpec(4, 128, True)
    w = dense.model.layers[1].mlp.down_proj.weight
    plan = LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse("2:4"), quant=QuantSpec(4, 128, True))
    want = compress_weight(w.float(), None, plan).weight
    assert torch.equal(lin.packed.to_compressed().weight, want)
    back = syn.dense_twin(twin)
    assert torch.equal(back.model.layers[1].mlp.down_proj.weight, want.half())
    ids = random_ids(1, 6, vocab=512)
    torch.testing.assert_close(back(ids).logits, twin(ids).logits, rtol=0, atol=0)


def test_compress_model_nm24_saves_a_loadable_checkpoint(tmp_path):
    model = tiny_model("llama")
    result = syn.compress_model_nm24(model, bits=4, group_size=32)
    assert len(result.packed) == 14
    sq.save(result, tmp_path / "ck")
    loaded, _ = sq.load(tmp_path / "ck")
    ids = random_ids(2, 8)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_run_bench_reports_every_engine_and_configuration():
    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cpu")
    sparse, _ = syn.sparse_twin(dense)
    s = BenchSettings(batches=(1, 2), prompt_lens=(4,), steps=2, repeats=1, warmup=1, hf_tokens=2)
    rep = run_bench({"sparse": sparse, "dense": dense, "transformers": dense}, s, log=lambda m: None)
    assert {(r.engine, r.batch) for r in rep.rows} == {(e, b) for e in ("sparse", "dense", "transformers")
                                                       for b in (1, 2)}
    assert all(r.prefill_tok_s > 0 and r.decode_tok_s > 0 for r in rep.rows)
    assert "x dense" in rep.table()
    over = run_bench({"dense": dense}, BenchSettings(batches=(1,), prompt_lens=(5000,), steps=1, repeats=1),
                     log=lambda m: None)
    assert "longer than" in over.rows[0].note
    late = run_bench({"dense": dense}, BenchSettings(batches=(1,), prompt_lens=(4,), budget_s=-1), log=lambda m: None)
    assert late.rows[0].note == "skipped: time budget"


def test_bench_command_on_a_checkpoint_writes_json_table_and_plot(tmp_path, capsys):
    model = tiny_model("llama")
    result = syn.compress_model_nm24(model, bits=4, group_size=32)
    sq.save(result, tmp_path / "ck")
    rc = main(["bench", str(tmp_path / "ck"), "--device", "cpu", "--batch", "1", "--prompt-len", "4", "--steps", "1",
               "--repeats", "1", "--engines", "sparse,dense", "--out", str(tmp_path / "b")])
    assert rc == 0
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert {r["engine"] for r in data["rows"]} == {"sparse", "dense"}
    assert data["meta"]["compressed_linears"] == 8  # per layer: qkv, o, gate_up, down (fused by default)
    assert data["meta"]["fused"] is True
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0
    assert "decode tok/s" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "nothing"), "--device", "cpu"]) == 2


def test_generate_and_export_commands(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2")
    model = tiny_model("llama")
    recipe = Recipe(method="magnitude", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                    calibration=CalibrationConfig(samples=2, seq_len=16))
    result = sq.compress(model, recipe, calibration=random_ids(2, 16), progress=False)
    sq.save(result, tmp_path / "ck", tokenizer=tokenizer)
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "w5 w6 w7", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w5 w6 w7") and len(out.split()) > 3
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "w5", "--prompt", "w9 w9", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("---") == 2
    if pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed"):
        assert main(["export", str(tmp_path / "ck"), "--out", str(tmp_path / "ct")]) == 0
        assert (tmp_path / "ct" / "tokenizer.json").is_file()


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_equals_eager_and_bench_runs():
    from sparsequant.runtime.generate import generate

    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cuda", seed=4)
    sparse, _ = syn.sparse_twin(dense)
    assert all(m._kernel_state is not None for m in sparse.modules() if isinstance(m, SparseQuantLinear))
    rows = [[1, 2, 3, 4], [5, 6]]
    for m in (dense, sparse):
        graphed = generate(m, rows, max_new_tokens=16, eos_token_id=[]).tokens
        assert graphed == generate(m, rows, max_new_tokens=16, eos_token_id=[], cuda_graph=False).tokens
    rep = run_bench({"sparse": sparse, "dense": dense},
                    BenchSettings(batches=(1, 4), prompt_lens=(16,), steps=2, repeats=1), log=lambda m: None)
    assert all(r.decode_tok_s and r.prefill_tok_s and r.peak_mem_gb for r in rep.rows)
