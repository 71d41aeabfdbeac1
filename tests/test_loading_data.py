import pytest
import torch

from sparsequant.data.windows import calibration_windows, evaluation_windows, token_stream
from sparsequant.errors import DataError, SparseQuantError, UnsupportedModelError
from sparsequant.models.loading import load_model

from conftest import tiny_model


class CharTokenizer:
    """A byte-level stand-in so data tests need no model."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode())}


def test_text_file_split_and_windows(tmp_path):
    f = tmp_path / "corpus.txt"
    import random

    rng = random.Random(0)
    f.write_text("".join(chr(97 + rng.randrange(26)) for _ in range(10_000)))
    tok = CharTokenizer()
    cal, ev = token_stream(tok, str(f), "calibration"), token_stream(tok, str(f), "evaluation")
    assert len(cal) == 5000 and len(ev) == 5000
    w = calibration_windows(tok, 10, 100, seed=1, source=str(f))
    assert w.shape == (10, 100)
    starts = {int(torch.nonzero((cal.unfold(0, 100, 100) == row).all(1))[0]) for row in w}
    assert len(starts) == 10  # distinct, non-overlapping chunks of the calibration half
    e = evaluation_windows(tok, 100, 3, source=str(f))
    assert torch.equal(e.flatten(), ev[:300])
    with pytest.raises(DataError, match="room for 50 windows"):
        calibration_windows(tok, 60, 100, source=str(f))
    with pytest.raises(DataError, match="does not exist"):
        token_stream(tok, str(tmp_path / "missing.txt"))


def test_local_folder_and_bad_sources(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "tiny"
    original = tiny_model("qwen2")
    original.save_pretrained(folder)
    try:
        model, _ = load_model(str(folder))
    except Exception as exc:  # no tokenizer files in the folder: acceptable only as a clear error
        assert "tokenizer" in str(exc).lower() or "Can't load" in str(exc)
    else:
        ids = torch.randint(0, 256, (1, 8))
        assert torch.equal(model(ids).logits, original(ids).logits)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        load_model(str(gpt2))
    with pytest.raises(SparseQuantError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(SparseQuantError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparseQuantError, match="could not load"):
        load_model("no-such-org/no-such-model")
