"""Int8Embedding (int8 rows + one scale per row) against plain-PyTorch references, and its opt-in paths."""
import pytest
import torch
from torch import nn

import sparsequant as sq
from sparsequant.errors import NonFiniteWeightError, QuantizationError, SparseQuantError
from sparsequant.nn.embedding import Int8Embedding, quantize_input_embedding, quantize_rows
from sparsequant.runtime import synthetic as syn

from conftest import random_ids, runtime_cli, tiny_config, tiny_model


def _reference_rows(w: torch.Tensor):
    """Plain per-row symmetric absmax int8 in float64: (codes, float16 scales)."""
    w = w.double()
    s = (w.abs().amax(1) / 127).half().double()
    q = torch.round(w / torch.where(s > 0, s, 1.0)[:, None]).clamp(-127, 127)
    return q.to(torch.int8), s.half()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_is_within_half_a_scale_and_matches_a_plain_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(97, 40, generator=g) * torch.rand(97, 1, generator=g) * 3).to(dtype)
    w[5] = 0  # a zero row: scale 0, codes 0, exact
    codes, scales = quantize_rows(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and codes.shape == w.shape
    deq = codes.double() * scales.double()[:, None]
    assert bool(((w.double() - deq).abs() <= scales.double()[:, None] / 2).all())
    assert bool((deq[5] == 0).all()) and float(scales[5]) == 0
    want_codes, want_scales = _reference_rows(w)
    assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes)
    assert int(codes.abs().max()) <= 127


def test_scales_fall_back_to_float32_when_float16_cannot_hold_them():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    w[2] *= 1e-7  # its scale ~ 1e-9: a float16 subnormal would break the half-scale bound
    codes, scales = quantize_rows(w)
    assert scales.dtype == torch.float32
    deq = codes.double() * scales.double()[:, None]
    assert bool(((w.double() - deq).abs() <= scales.double()[:, None] / 2).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_equals_the_dequantized_table_and_has_embedding_semantics(dtype):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 24, padding_idx=-1).to(dtype)
    q = Int8Embedding.from_embedding(emb)
    assert q.compute_dtype == dtype and q.padding_idx == emb.padding_idx == 49
    assert (q.num_embeddings, q.embedding_dim) == (50, 24)
    ids = random_ids(3, 7, vocab=50, seed=1)
    ref = (q.codes.double() * q.scales.double()[:, None]).to(dtype)  # plain-PyTorch dequantization
    out = q(ids)
    assert out.dtype == dtype and out.shape == (3, 7, 24)
    assert torch.equal(out, ref[ids]) and torch.equal(q.dequantize(), ref)
    assert torch.equal(q(ids[0, 0]), ref[ids[0, 0]])  # a 0-d id, like nn.Embedding
    assert bool((q(torch.tensor([49])) == 0).all())  # the padding row (zeros) stays exactly zero
    with pytest.raises(IndexError):
        q(torch.tensor([50]))
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))
    q.to(torch.float32)  # a dtype change moves the output dtype; codes and scales keep theirs
    assert q(ids).dtype == torch.float32 and q.codes.dtype == torch.int8 and q.scales.dtype == torch.float16
    assert torch.equal(q(ids), (q.codes.double() * q.scales.double()[:, None]).float()[ids])


def test_bad_tables_and_modules_are_clear_errors():
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_rows(torch.randn(10))
    with pytest.raises(QuantizationError, match="floating"):
        quantize_rows(torch.ones(3, 4, dtype=torch.int32))
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 8)
        w[2, 3] = bad
        with pytest.raises(NonFiniteWeightError, match="row 2"):
            quantize_rows(w)
    with pytest.raises(SparseQuantError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(4, 8, max_norm=1.0))

    class Scaled(nn.Embedding):
        pass

    with pytest.raises(SparseQuantError, match="plain nn.Embedding"):
        Int8Embedding.from_embedding(Scaled(4, 8))
    with pytest.raises(SparseQuantError, match="padding_idx"):
        Int8Embedding(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.float16), padding_idx=4)
    with pytest.raises(SparseQuantError, match="scales"):
        Int8Embedding(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3, dtype=torch.float16))


def test_tied_embeddings_are_refused():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with pytest.raises(SparseQuantError, match="tie_word_embeddings"):
        quantize_input_embedding(model)
    assert type(model.get_input_embeddings()) is nn.Embedding  # untouched


def test_bytes_counted_are_codes_plus_scales():
    cfg = syn.synthetic_config("tiny-llama")  # untied, vocab 512 x hidden 256
    dense = syn.build_dense(cfg, device="cpu", dtype=torch.float16)
    plain, _ = syn.sparse_twin(dense)
    small, _ = syn.sparse_twin(dense, embed_int8=True)
    q = small.get_input_embeddings()
    assert isinstance(q, Int8Embedding) and q.compute_dtype == torch.float16
    assert q.nbytes() == 512 * 256 + 2 * 512
    before, after = syn.weight_bytes_on(plain, "cpu"), syn.weight_bytes_on(small, "cpu")
    assert before - after == 2 * 512 * 256 - q.nbytes()
    assert type(dense.get_input_embeddings()) is nn.Embedding  # the dense model keeps its table
    # the dense twin of an int8-embedding model holds the dequantized table as a plain embedding
    back = syn.dense_twin(small)
    assert torch.equal(back.get_input_embeddings().weight, q.dequantize())


def test_load_with_int8_embedding_equals_the_dequantized_table(tmp_path):
    model = tiny_model("llama", seed=4)
    result = syn.compress_model_nm24(model, bits=4, group_size=32)
    sq.save(result, tmp_path / "ck")
    plain, _ = sq.load(tmp_path / "ck")
    small, _ = sq.load(tmp_path / "ck", embed_int8=True)
    q = small.get_input_embeddings()
    assert isinstance(q, Int8Embedding) and q.compute_dtype == torch.float32
    with torch.no_grad():
        plain.get_input_embeddings().weight.copy_(q.dequantize())
        ids = random_ids(2, 12, seed=5)
        assert torch.equal(small(ids).logits, plain(ids).logits)


def test_commands_take_the_embed_int8_flag():
    root = runtime_cli()
    assert root.parse_args(["generate", "--prompt", "x", "--embed-int8"]).embed_int8 is True
    assert root.parse_args(["generate", "--prompt", "x"]).embed_int8 is False
    assert root.parse_args(["bench", "llama-2-7b", "--embed-int8"]).embed_int8 is True
