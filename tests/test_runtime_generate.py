"""The decode engine and generate() on the CPU against transformers' own generate, on tiny random models."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsequant as sq
from sparsequant.errors import SparseQuantError
from sparsequant.nn.embedding import Int8Embedding
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe
from sparsequant.runtime.engine import DecodeEngine, left_pad
from sparsequant.runtime.generate import generate
from sparsequant.runtime.sampling import filter_logits, next_tokens
from sparsequant.runtime.synthetic import compress_model_nm24

from conftest import exact_embedding, random_ids, tiny_model

NO_EOS = []  # random models emit the config's EOS id by chance; these tests compare full lengths


def _hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "opt"])
def test_greedy_equals_transformers_generate(family):
    # gemma2 has sliding-window layers (window 8 here): 7 + 12 tokens cross the window
    model = tiny_model(family)
    ids = random_ids(1, 7, seed=3)
    ours = generate(model, ids[0].tolist(), max_new_tokens=12, eos_token_id=NO_EOS)
    assert ours.tokens[0] == _hf_greedy(model, ids, 12)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batch_with_left_padding_equals_one_by_one(family):
    model = tiny_model(family, seed=1)
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 5)]
    batch = generate(model, rows, max_new_tokens=10, eos_token_id=NO_EOS)
    single = [generate(model, r, max_new_tokens=10, eos_token_id=NO_EOS).tokens[0] for r in rows]
    assert batch.tokens == single


def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model = tiny_model("llama")
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=NO_EOS)
    a = generate(model, [1, 2, 3], seed=7, **kw).tokens
    b = generate(model, [1, 2, 3], seed=7, **kw).tokens
    c = generate(model, [1, 2, 3], seed=8, **kw).tokens
    assert a == b
    assert a != c  # 16 draws at temperature 1.5 from a 256-token vocabulary


def test_stops_at_eos_and_streams_every_step():
    model = tiny_model("llama")
    first = generate(model, [5, 6, 7], max_new_tokens=6, eos_token_id=NO_EOS).tokens[0]
    eos = first[2]  # make the third greedy token the end of sequence
    seen = []
    out = generate(model, [[5, 6, 7], [9, 9]], max_new_tokens=6, eos_token_id=eos,
                   on_token=lambda step, toks: seen.append(toks))
    assert out.tokens[0] == first[: first.index(eos) + 1]
    assert [s[0] for s in seen[: len(out.tokens[0])]] == out.tokens[0]
    assert all(s[0] is None for s in seen[len(out.tokens[0]):])


@settings(max_examples=30, deadline=None)
@given(v=st.integers(2, 40), k=st.one_of(st.none(), st.integers(1, 45)), p=st.one_of(st.none(), st.floats(0.05, 1.0)),
       seed=st.integers(0, 10_000))
def test_filter_logits_matches_a_plain_reference(v, k, p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, v, generator=g, dtype=torch.float64) * 3
    got = filter_logits(logits, k, p)
    for row, out in zip(logits, got):
        order = sorted(range(v), key=lambda i: -float(row[i]))
        keep = set(order if k is None else [i for i in order if row[i] >= row[order[min(k, v) - 1]]])
        if p is not None and p < 1:  # top-p over the distribution that top-k left
            probs = torch.softmax(torch.tensor([float(row[i]) if i in keep else float("-inf") for i in order]),
                                  0).tolist()
            mass, kept_p = 0.0, set()
            for rank, i in enumerate(order):
                if rank and mass >= p:
                    break
                kept_p.add(i)
                mass += probs[rank]
            keep &= kept_p | {order[0]}
        assert {i for i in range(v) if torch.isfinite(out[i])} == keep


def test_greedy_is_argmax_and_bad_sampling_args_are_errors():
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0]])
    assert next_tokens(logits).tolist() == [1]
    model = tiny_model("llama")
    with pytest.raises(SparseQuantError, match="temperature"):
        generate(model, [1, 2], temperature=-1)
    with pytest.raises(SparseQuantError, match="top_p"):
        generate(model, [1, 2], temperature=1.0, top_p=1.5)
    with pytest.raises(SparseQuantError, match="max_position_embeddings"):
        generate(model, [1, 2], max_new_tokens=1000)
    with pytest.raises(SparseQuantError, match="token ids"):
        generate(model, [1, 999])
    with pytest.raises(SparseQuantError, match="tokenizer"):
        generate(model, "hello")
    with pytest.raises(SparseQuantError, match="left-padded"):
        DecodeEngine(model, 1, 16).prefill(torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_loaded_checkpoint_generates_like_the_in_memory_compressed_model(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe(method="magnitude", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                    calibration=CalibrationConfig(samples=2, seq_len=16))
    result = sq.compress(model, recipe, calibration=random_ids(2, 16), progress=False)
    sq.save(result, tmp_path / "ck")
    loaded, _ = sq.load(tmp_path / "ck")
    rows = [[3, 1, 4, 1, 5], [9, 2, 6]]
    want = generate(result.model, rows, max_new_tokens=12, eos_token_id=NO_EOS).tokens
    assert generate(loaded, rows, max_new_tokens=12, eos_token_id=NO_EOS).tokens == want
    assert sq.generate(tmp_path / "ck", rows, device="cpu", max_new_tokens=12, eos_token_id=NO_EOS).tokens == want


def test_int8_embedding_engine_greedy_tokens_equal_with_an_exactly_representable_embedding(tmp_path):
    model = exact_embedding(tiny_model("llama", seed=6))
    result = compress_model_nm24(model, bits=4, group_size=32)
    sq.save(result, tmp_path / "ck")
    plain, _ = sq.load(tmp_path / "ck")
    small, _ = sq.load(tmp_path / "ck", embed_int8=True)
    q = small.get_input_embeddings()
    assert isinstance(q, Int8Embedding)  # exact table: int8 lookups give the float table's rows bit for bit
    assert torch.equal(q.dequantize(), plain.get_input_embeddings().weight)
    rows = [[3, 1, 4, 1, 5], [9, 2, 6]]
    want = generate(plain, rows, max_new_tokens=10, eos_token_id=NO_EOS).tokens
    assert generate(small, rows, max_new_tokens=10, eos_token_id=NO_EOS).tokens == want
