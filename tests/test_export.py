"""compressed-tensors export: the real library (when installed) loads our export back to our weights."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.checkpoint.export_compressed_tensors import export_compressed_tensors, pack_int32_rows
from sparsequant.errors import CheckpointError
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe

from conftest import random_ids, tiny_model


def _ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed "
                               "(pip install compressed-tensors) - the round trip needs the real library")


def _checkpoint(tmp_path, bits=4, group=32, sym=True, pattern="2:4", name="ck"):
    model = tiny_model("llama")
    recipe = Recipe(method="magnitude", pattern=pattern, quant=QuantConfig(bits=bits, group_size=group, symmetric=sym),
                    calibration=CalibrationConfig(samples=2, seq_len=16))
    result = sq.compress(model, recipe, calibration=random_ids(2, 16), progress=False)
    sq.save(result, tmp_path / name)
    return tmp_path / name, result


def _ours(result):
    return {f"{n}.weight": result.packed[n].to_compressed().weight for n in result.packed}


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 80), seed=st.integers(0, 999))
def test_pack_int32_rows_is_a_per_row_lsb_first_stream(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    words = pack_int32_rows(codes, bits)
    assert words.shape == (rows, -(-cols * bits // 32)) and words.dtype == torch.int32
    for r in range(rows):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r].tolist()))
        got = sum((int(w) & 0xFFFFFFFF) << (32 * j) for j, w in enumerate(words[r].tolist()))
        assert got == stream


def test_pack_int32_rows_matches_the_library():
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for bits, cols in ((4, 64), (4, 40), (3, 70), (8, 33), (2, 96)):
        codes = torch.randint(0, 2**bits, (6, cols), dtype=torch.int32)
        signed = (codes - 2 ** (bits - 1)).to(torch.int8)
        assert torch.equal(pack_int32_rows(codes, bits), pack_to_int32(signed, bits))


def test_w4a16_round_trip_through_transformers_and_the_library(tmp_path):
    _ct()
    from transformers import AutoModelForCausalLM

    ck, result = _checkpoint(tmp_path)
    summary = export_compressed_tensors(ck, tmp_path / "ct")
    assert summary["quantized_linears"] == len(result.packed)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["sparsity_config"] == {} and cfg["ignore"] == ["lm_head"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)
    ids = random_ids(2, 8, seed=4)
    logits = model(ids).logits  # the first forward decompresses
    state = model.state_dict()
    for name, w in _ours(result).items():
        assert torch.equal(state[name], w.to(torch.float16)), name
        assert torch.equal(state[name] == 0, w == 0)  # the 2:4 zeros survive, stored dense
    want = result.model(ids).logits
    assert (logits.float() - want).norm() / want.norm() < 1e-2


def test_asymmetric_pack_quantized_decompresses_to_our_weights(tmp_path):
    _ct()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    ck, result = _checkpoint(tmp_path, bits=4, group=32, sym=False)
    export_compressed_tensors(ck, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    for name, w in _ours(result).items():
        mod = name[: -len(".weight")]
        own = {k[len(mod) + 1:]: v for k, v in tensors.items() if k.startswith(mod + ".")}
        assert set(own) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
        back = PackedQuantizationCompressor.decompress(own, scheme)["weight"]
        assert torch.equal(back, w.to(torch.float16)), name


def test_w8a8_int_quantized_round_trip(tmp_path):
    _ct()
    from transformers import AutoModelForCausalLM

    ck, result = _checkpoint(tmp_path, bits=8, group=None)
    export_compressed_tensors(ck, tmp_path / "ct", fmt="int-quantized")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    assert cfg["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)
    model(random_ids(1, 4))
    state = model.state_dict()
    for name, w in _ours(result).items():
        assert torch.equal(state[name], w.to(torch.float16)), name


def test_unexportable_checkpoints_are_clear_errors(tmp_path):
    ck4, _ = _checkpoint(tmp_path, bits=4, group=32, name="w4")
    with pytest.raises(CheckpointError, match="8-bit symmetric per-channel"):
        export_compressed_tensors(ck4, tmp_path / "a", fmt="int-quantized")
    ragged, _ = _checkpoint(tmp_path, bits=4, group=48, pattern="dense", name="ragged")
    with pytest.raises(CheckpointError, match="whole groups"):
        export_compressed_tensors(ragged, tmp_path / "b")
    with pytest.raises(CheckpointError, match="format"):
        export_compressed_tensors(ck4, tmp_path / "c", fmt="sparse-24")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
