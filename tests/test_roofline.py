"""Roofline model: hand-computed times, the ANCHORS figures, memory, KV cache, bad input."""
import json
import types

import pytest

from sparsequant.eval import roofline as rl
from sparsequant.eval.roofline import RooflineError

BW_H100 = 3.35e12
FP16_DENSE, FP16_SPARSE, FP8_SPARSE = 989e12, 1979e12, 3958e12


def test_hand_computed_4096_square_on_h100_batch_1():
    n = k = 4096
    # fp16: weights 4096*4096*2 B, activations in 1*4096*2 B, outputs 1*4096*2 B.
    fp16_bytes = 4096 * 4096 * 2 + 4096 * 2 + 4096 * 2  # 33,570,816
    fp16 = rl.layer_time(n, k, 1, "fp16", "h100")
    assert fp16.bytes == fp16_bytes
    assert fp16.memory_s == pytest.approx(fp16_bytes / BW_H100)  # 10.02 us
    assert fp16.compute_s == pytest.approx(2 * 4096 * 4096 / FP16_DENSE)  # 0.034 us
    assert fp16.bound == "memory"
    # 2:4 int4 g128: 2048 kept codes x 4 bits + 2048 x 2 metadata bits + 32 groups x 16 scale bits per row
    # = 8192 + 4096 + 512 = 12,800 bits = 1600 B per row (3.125 bits/weight).
    w24 = 4096 * 1600
    b24 = w24 + 4096 * 2 + 4096 * 2
    t24 = rl.layer_time(n, k, 1, "2:4-int4-g128", "h100")
    assert t24.bytes == b24
    assert t24.time_s == pytest.approx(b24 / BW_H100)
    assert fp16.time_s / t24.time_s == pytest.approx(33_570_816 / 6_569_984)  # 5.110
    # 2:4 fp8: 2048 B values + 512 B metadata + 2 B per-row scale = 2562 B per row; A8 input 4096 B.
    b8 = 4096 * 2562 + 4096 + 4096 * 2
    assert rl.layer_time(n, k, 1, "2:4-fp8", "h100").bytes == b8
    assert rl.speedup(n, k, 1, "2:4-fp8", "h100") == pytest.approx(33_570_816 / b8)  # 3.195


def test_hand_computed_4096_square_on_h100_batch_2048():
    n = k = 4096
    m = 2048
    flops = 2 * 2048 * 4096 * 4096  # 68.72 GFLOP
    fp16 = rl.layer_time(n, k, m, "fp16", "h100")
    assert fp16.flops == flops
    # bytes: 33.5 MB weights + 16.8 MB in + 16.8 MB out = 67.1 MB -> 20.0 us < 69.5 us of compute
    assert fp16.bytes == 4096 * 4096 * 2 + 2048 * 4096 * 2 + 2048 * 4096 * 2
    assert fp16.memory_s == pytest.approx(67_108_864 / BW_H100)
    assert fp16.time_s == pytest.approx(flops / FP16_DENSE)  # 69.49 us
    assert fp16.bound == "compute"
    fp8 = rl.layer_time(n, k, m, "2:4-fp8", "h100")
    assert fp8.bytes == 4096 * 2562 + 2048 * 4096 * 1 + 2048 * 4096 * 2  # 35.7 MB -> 10.7 us
    assert fp8.time_s == pytest.approx(flops / FP8_SPARSE)  # 17.36 us, compute-bound
    assert fp16.time_s / fp8.time_s == pytest.approx(3958 / 989)
    # 2:4 W4A16 multiplies in fp16: dense tensor cores by default, the sparse rate only when asked.
    w4 = rl.layer_time(n, k, m, "2:4-int4-g128", "h100")
    assert not w4.sparse_tensor_cores and w4.time_s == pytest.approx(flops / FP16_DENSE)
    w4s = rl.layer_time(n, k, m, "2:4-int4-g128", "h100", sparse_tensor_cores=True)
    assert w4s.sparse_tensor_cores and w4s.time_s == pytest.approx(flops / FP16_SPARSE)
    # Native 2:4 formats always get the sparse rate; dense formats never do.
    assert rl.layer_time(n, k, m, "2:4-fp16", "h100").sparse_tensor_cores
    assert not rl.layer_time(n, k, m, "int4-g128", "h100", sparse_tensor_cores=True).sparse_tensor_cores


@pytest.mark.parametrize("fmt,m,sparse_tc,expected", [
    ("2:4-int4-g128", 1, False, 5.1),
    ("int4-g128", 1, False, 3.9),
    ("2:4-fp8", 1, False, 3.2),
    ("2:4-fp8", 2048, False, 4.0),
    ("2:4-int4-g128", 2048, False, 1.0),
    ("2:4-int4-g128", 2048, True, 2.0),
])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_anchors_h100_roofline(fmt, m, sparse_tc, expected, shape):
    assert rl.speedup(*shape, m, fmt, "h100", sparse_tensor_cores=sparse_tc) == pytest.approx(expected, abs=0.1)


def test_anchors_hold_for_a_whole_llama_layer():
    assert rl.model_speedup("llama-2-7b", 1, "2:4-int4-g128") == pytest.approx(5.1, abs=0.1)
    assert rl.model_speedup("llama-2-7b", 2048, "2:4-fp8") == pytest.approx(4.0, abs=0.1)


def test_h200_and_a100():
    # H200: same tensor cores, 4.8 TB/s, so the memory-bound fp16 time scales by 3.35/4.8.
    h100, h200 = rl.layer_time(4096, 4096, 1, "fp16", "h100"), rl.layer_time(4096, 4096, 1, "fp16", "h200")
    assert h200.time_s == pytest.approx(h100.time_s * 3.35 / 4.8)
    a100 = rl.layer_time(4096, 4096, 2048, "2:4-int8", "a100")
    assert a100.compute_s == pytest.approx(2 * 2048 * 4096 * 4096 / 1248e12)
    assert rl.layer_time(4096, 4096, 2048, "fp16", "a100").time_s == pytest.approx(2 * 2048 * 4096**2 / 312e12)
    with pytest.raises(RooflineError, match="no 2:4 sparse fp8.*fp16, int8"):
        rl.layer_time(4096, 4096, 1, "2:4-fp8", "a100")


def test_bits_per_weight_and_ragged_groups():
    assert rl.get_format("2:4-int4-g128").bits_per_weight() == 3.125
    assert rl.get_format("int4-g128").bits_per_weight() == 4.125
    assert rl.get_format("2:4-fp16").bits_per_weight() == 9.0
    # 576 = 4*128 + 64: five groups, the last one short, each with its own fp16 scale.
    assert rl.get_format("int4-g128").weight_bits_total(1, 576) == 576 * 4 + 5 * 16
    assert rl.get_format("2:4-int4-g128").weight_bits_total(1, 576) == 288 * 4 + 288 * 2 + 5 * 16
    assert rl.get_format("int8").weight_bits_total(3, 100) == 3 * (800 + 16)
    with pytest.raises(RooflineError, match="multiple of 4"):
        rl.get_format("2:4-fp16").weight_bits_total(1, 6)


@pytest.mark.parametrize("pattern,bits,group,fmt", [
    ("dense", None, None, "fp16"), ("dense", 4, 128, "int4-g128"), ("dense", 8, None, "w8a16"),
    ("2:4", None, None, "2:4-fp16"), ("2:4", 4, 128, "2:4-int4-g128"), ("2:4", 8, None, "2:4-int8"),
])
def test_weight_bytes_match_the_real_checkpoint_format(pattern, bits, group, fmt):
    torch = pytest.importorskip("torch")
    from sparsequant.checkpoint.packed import PackedWeight
    from sparsequant.patterns import SparsitySpec
    from sparsequant.quant import QuantSpec
    from sparsequant.solvers import LinearPlan, compress_weight

    n, k = 24, 576
    quant = None if bits is None else QuantSpec(bits, group, True)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    if pattern == "dense" and quant is None:
        nbytes = n * k * 2  # fp16 is not a compression plan; it is the stored float16 weight
    else:
        cw = compress_weight(w, None, LinearPlan(prune="magnitude", sparsity=SparsitySpec.parse(pattern), quant=quant))
        nbytes = PackedWeight.from_compressed(cw).nbytes()
    assert rl.get_format(fmt).weight_bits_total(n, k) == 8 * nbytes


def test_presets_parameter_counts_and_kv_cache():
    assert rl.PRESETS["llama-2-7b"].params == 6_738_415_616
    assert rl.PRESETS["llama-3-8b"].params == 8_030_261_248
    assert rl.PRESETS["smollm2-135m"].params == 134_515_008
    assert rl.PRESETS["llama-2-70b"].params == pytest.approx(68.98e9, rel=1e-3)
    assert rl.kv_cache_bytes_per_token("llama-2-7b") == 2 * 32 * 32 * 128 * 2  # 512 KiB: no GQA
    assert rl.kv_cache_bytes_per_token("llama-3-8b") == 2 * 32 * 8 * 128 * 2
    assert rl.kv_cache_bytes_per_token("llama-2-70b", bytes_per_value=1) == 2 * 80 * 8 * 128
    assert rl.kv_cache_bytes_per_token("smollm2-135m") == 2 * 30 * 3 * 64 * 2


def test_weight_memory_of_a_model():
    s = rl.PRESETS["llama-2-7b"]
    fp16, w4 = rl.weight_memory(s, "fp16"), rl.weight_memory(s, "2:4-int4-g128")
    assert fp16.total_bytes == 2 * s.params
    assert w4.linear_bytes == s.linear_params * 3.125 / 8
    assert w4.other_bytes == 2 * (2 * 32000 * 4096 + 65 * 4096)  # embeddings + lm_head + norms stay fp16
    assert w4.bits_per_weight == 3.125
    # Tied embeddings are stored once.
    sm = rl.PRESETS["smollm2-135m"]
    assert rl.weight_memory(sm, "fp16").other_bytes == 2 * (49152 * 576 + 61 * 576)
    pm = rl.params_memory(7_000_000_000, "int4-g128")
    assert pm.total_bytes == 7e9 * 4.125 / 8


def test_shape_from_config_object_dict_and_file(tmp_path):
    # The keys of a LlamaConfig; an attribute object stands in for it (importing transformers costs ~10 s here).
    d = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, head_dim=16, tie_word_embeddings=False)
    s = rl.load_shape(types.SimpleNamespace(**d))
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.vocab, s.hd) == (64, 176, 3, 4, 2, 300, 16)
    assert dict(((nm, (n, k)) for nm, n, k in s.linear_shapes()))["k_proj"] == (32, 64)
    assert s.params == 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 176 * 64 + 2 * 64) + 2 * 300 * 64 + 64
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert rl.load_shape(str(tmp_path)).params == s.params
    assert rl.load_shape({"text_config": d}).params == s.params
    # No num_key_value_heads: plain multi-head attention. Wider head_dim than hidden/heads (Gemma, Qwen3).
    assert rl.load_shape({**d, "num_key_value_heads": None}).kv_heads == 4
    assert rl.load_shape({**d, "head_dim": 32}).linear_shapes()[0] == ("q_proj", 128, 64)
    with pytest.raises(RooflineError, match="lacks num_hidden_layers, vocab_size"):
        rl.load_shape({"hidden_size": 8, "num_attention_heads": 2})


def test_bad_input_lists_what_is_known():
    with pytest.raises(RooflineError, match="known: h100, h200, a100"):
        rl.get_gpu("b200")
    assert rl.get_gpu("H100-SXM").name == "H100 SXM" and rl.get_gpu("a100 80GB").bandwidth == 2.039e12
    with pytest.raises(RooflineError, match="llama-2-7b, llama-3-8b, llama-2-70b, smollm2-135m"):
        rl.load_shape("llama-9b")
    with pytest.raises(RooflineError, match="known: fp16.*2:4-int8"):
        rl.get_format("int3")
    with pytest.raises(RooflineError, match="M must be a positive integer"):
        rl.layer_time(16, 16, 0, "fp16")
    assert rl.parse_count("6.7B") == 6_700_000_000 and rl.parse_count("135M") == 135_000_000
    assert rl.parse_count("7e9") == 7_000_000_000
    with pytest.raises(RooflineError):
        rl.parse_count("seven")
    assert rl.parse_batches("1, 16,2048") == [1, 16, 2048]
    with pytest.raises(RooflineError):
        rl.parse_batches("1,0")


def test_plan_command_prints_memory_and_speedup(capsys):
    import argparse

    from sparsequant.commands import plan

    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["plan", "--config", "llama-2-7b", "--batch", "1,2048", "--gpu", "a100"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "6.738B parameters" in out and "524.29 KB fp16" in out
    assert "n/a (no fp8)" in out  # A100 has no fp8 tensor cores
    assert "| q/k/v/o" in out and "| all linears" in out
    args = parser.parse_args(["plan", "--params", "7B", "--shape", "4096x4096", "--formats", "2:4-int4-g128"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "5.11x m" in out and "3.125" in out
    with pytest.raises(RooflineError, match="not both"):
        args = parser.parse_args(["plan", "--params", "7B", "--config", "llama-2-7b"])
        args.func(args)
