"""Zero-shot multiple-choice evaluation of a Hugging Face causal LM, lm-evaluation-harness style.

Scoring conventions (docs/evaluation.md has the long form):

* A request is a (context, continuation) pair. Its score is the summed log-probability of the
  continuation's tokens given the context and the continuation tokens before them.
* Tokenization follows lm-eval: trailing whitespace of the context moves to the front of the
  continuation, then ``context + continuation`` is encoded as one string and split at the token
  length of the encoded context, so merges across the boundary are attributed the same way.
  No special tokens are added unless ``add_bos_token=True``; an empty context is replaced by the
  BOS token (EOS when there is none).
* ``acc``: 1 when the choice with the highest summed log-likelihood (the first on ties) is the
  gold one, else 0. ``acc_norm``: the same after dividing each log-likelihood by the UTF-8 byte
  length of the answer text without its separating space, as lm-eval does
  (``norm="continuation"`` counts the space too). WinoGrande scores every option through the
  same suffix, so its ``acc_norm`` equals ``acc``. LAMBADA-style greedy items count as correct
  when every target token is the model's argmax; they report ``perplexity`` (exp of minus the
  mean log-likelihood) instead of ``acc_norm``.
* Standard errors are the sample standard deviation (n - 1) over items divided by sqrt(n).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from ..progress import progress_bar

from ..errors import DataError
from .tasks import Task, TaskItem, load_task

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class RequestScore:
    loglikelihood: float
    is_greedy: bool
    num_tokens: int


@dataclass
class TaskResult:
    """Metrics of one task plus what produced them, item by item."""

    name: str
    metrics: dict[str, float | int | None]
    loglikelihoods: list[list[float]] = field(repr=False)
    predictions: list[int] = field(repr=False)
    norm_predictions: list[int] = field(repr=False)
    correct: list[float] = field(repr=False)


# --------------------------------------------------------------------------------------------
# tokenization


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_token(tokenizer) -> int:
    for tok_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    raise DataError("an empty context needs a BOS or EOS token to condition on, and the tokenizer has neither")


def encode_pair(tokenizer, context: str, continuation: str, add_bos_token: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) split the way lm-eval splits them."""
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise DataError(f"context and continuation must be strings, got {type(context).__name__} "
                        f"and {type(continuation).__name__}")
    # "Answer: " + "yes" must tokenize like "Answer:" + " yes": BPE vocabularies attach the
    # space to the following word, so a trailing space left on the context would be a token no
    # training text ever put there.
    stripped = context.rstrip()
    if len(stripped) != len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    if context == "":
        # Nothing to condition on: the first continuation token still needs a predecessor.
        ctx, cont = [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
    else:
        whole = _encode(tokenizer, context + continuation)
        n_ctx = len(_encode(tokenizer, context))
        ctx, cont = whole[:n_ctx], whole[n_ctx:]
        if not ctx:
            raise DataError(f"context {context[-60:]!r} encodes to no tokens")
        if add_bos_token:
            ctx = [_prefix_token(tokenizer)] + ctx
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens after context {context[-60:]!r}")
    return ctx, cont


# --------------------------------------------------------------------------------------------
# batched log-likelihoods


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _max_length(model, tokenizer) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return 2048


@dataclass
class _Row:
    tokens: list[int]
    # (request index, first logit position, continuation token ids)
    requests: list[tuple[int, int, list[int]]] = field(default_factory=list)


@dataclass
class _Group:
    """Requests that share one context, scored off a single pass over that context."""

    context: list[int]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)

    def rows(self) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
        # Continuations fed after the cached context: all but their last token (a target only).
        # One-token continuations need no row: the context's last logits predict them.
        out: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, cont in self.requests:
            if len(cont) > 1:
                out.setdefault(tuple(cont[:-1]), []).append((i, cont))
        return out


def _check_window(i: int, cont: list[int], max_length: int) -> None:
    if len(cont) > max_length:
        raise DataError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's "
                        f"{max_length}-token window")


def _build_rows(entries: Sequence[tuple[int, list[int], list[int]]], max_length: int) -> list[_Row]:
    rows: dict[tuple[int, ...], _Row] = {}
    for i, ctx, cont in entries:
        _check_window(i, cont, max_length)
        full = ctx + cont
        # The last token is only ever a target. Too-long inputs lose context from the left,
        # keeping the continuation and as much context as fits.
        cut = max(0, len(full) - 1 - max_length)
        inp = full[cut:-1]
        start = len(ctx) - 1 - cut
        # Identical inputs (e.g. " yes" and " no" after the same passage, both one token) give
        # identical logits: one forward serves all of them.
        row = rows.setdefault(tuple(inp), _Row(inp))
        row.requests.append((i, start, cont))
    return list(rows.values())


def _batches(rows: list[_Row], batch_size: int, max_batch_tokens: int) -> list[list[_Row]]:
    # Longest first: padding stays small within a batch and an out-of-memory shows up at once.
    order = sorted(rows, key=lambda r: -len(r.tokens))
    batches: list[list[_Row]] = []
    current: list[_Row] = []
    for row in order:
        width = len(current[0].tokens) if current else len(row.tokens)
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def _group_batches(groups: list[_Group], batch_size: int, max_batch_tokens: int) -> list[list[_Group]]:
    # Longest context first, like the rows: similar lengths keep the left padding small.
    order = sorted(groups, key=lambda g: -len(g.context))
    batches: list[list[_Group]] = []
    current: list[_Group] = []
    n_rows = width = 0
    for g in order:
        rows = g.rows()
        g_ctx = len(current[0].context) if current else len(g.context)
        g_rows, g_width = n_rows + len(rows), max([width] + [len(r) for r in rows])
        # Bounds: the contexts' pass, and the answers' pass over copies of the cached contexts.
        if current and (len(current) >= batch_size or (len(current) + 1) * g_ctx > max_batch_tokens
                        or g_rows * (g_ctx + g_width) > max_batch_tokens):
            batches.append(current)
            current, g_rows, g_width = [], len(rows), max([0] + [len(r) for r in rows])
        current.append(g)
        n_rows, width = g_rows, g_width
    if current:
        batches.append(current)
    return batches


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _score(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """Summed log-prob and greediness of ``cont`` given its rows of logits (one per token)."""
    picked = logits.float().log_softmax(-1)
    target = torch.tensor(cont, device=picked.device).unsqueeze(-1)
    token_lp = picked.gather(-1, target).squeeze(-1)
    # A tie with the maximum still counts as greedy: the target is an argmax.
    greedy = bool((token_lp >= picked.max(-1).values).all())
    return float(token_lp.double().sum()), greedy


def _run_rows(model, batch: list[_Row], device, keep_ok: bool, results: list) -> int:
    width = len(batch[0].tokens)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, row in enumerate(batch):
        ids[b, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        mask[b, : len(row.tokens)] = 1
    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if keep_ok:
        # The vocabulary projection of positions before every continuation is wasted work
        # and, at 50k-token vocabularies, most of the memory.
        kwargs["logits_to_keep"] = width - min(start for row in batch for _, start, _ in row.requests)
    logits = _logits(model(**kwargs))
    offset = width - logits.shape[1]
    done = 0
    for b, row in enumerate(batch):
        for i, start, cont in row.requests:
            lo = start - offset
            results[i] = RequestScore(*_score(logits[b, lo: lo + len(cont)], cont), len(cont))
            done += 1
    return done


def _run_groups(model, batch: list[_Group], device, keep_ok: bool, results: list) -> int | None:
    """Score a batch of groups; None (nothing scored) when the model's cache cannot be reused.

    Contexts are padded on the left so that every one ends at the last position: the answers
    then all continue from the same cache length. Positions are passed explicitly so padding
    does not shift them (what ``generate`` does for left-padded prompts).
    """
    n_ctx = max(len(g.context) for g in batch)
    ctx_ids = torch.zeros((len(batch), n_ctx), dtype=torch.long)
    ctx_mask = torch.zeros((len(batch), n_ctx), dtype=torch.long)
    for gi, g in enumerate(batch):
        ctx_ids[gi, n_ctx - len(g.context):] = torch.tensor(g.context, dtype=torch.long)
        ctx_mask[gi, n_ctx - len(g.context):] = 1
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": ctx_ids.to(device), "attention_mask": ctx_mask.to(device),
              "position_ids": ctx_pos.to(device), "use_cache": True}
    if keep_ok:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    first = _logits(out)[:, -1:]  # predicts every continuation's first token
    rows: list[tuple[int, list[int], list[tuple[int, list[int]]]]] = []  # (group, input, requests)
    for gi, g in enumerate(batch):
        for inp, reqs in g.rows().items():
            rows.append((gi, list(inp), reqs))
    later = None
    if rows:
        cache = getattr(out, "past_key_values", None)
        if not hasattr(cache, "reorder_cache"):
            return None
        owner = torch.tensor([gi for gi, _, _ in rows], dtype=torch.long)
        # One copy of each context's cached keys/values per continuation row.
        cache.reorder_cache(owner.to(device))
        width = max(len(inp) for _, inp, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), n_ctx + width), dtype=torch.long)
        mask[:, :n_ctx] = ctx_mask[owner]
        for r, (_, inp, _) in enumerate(rows):
            ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[r, n_ctx: n_ctx + len(inp)] = 1
        pos = ctx_mask[owner].sum(-1, keepdim=True) + torch.arange(width)
        later = _logits(model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                              past_key_values=cache, use_cache=True))
    done = 0
    for gi, g in enumerate(batch):
        for i, cont in g.requests:
            if len(cont) == 1:
                results[i] = RequestScore(*_score(first[gi], cont), 1)
                done += 1
    for r, (gi, inp, reqs) in enumerate(rows):
        for i, cont in reqs:
            logits = torch.cat([first[gi], later[r, : len(cont) - 1].to(first.device)])  # type: ignore[index]
            results[i] = RequestScore(*_score(logits, cont), len(cont))
            done += 1
    return done


@torch.inference_mode()
def score_requests(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_length: int | None = None,
    add_bos_token: bool = False,
    share_context: bool = False,
    progress: bool | str = False,
) -> list[RequestScore]:
    """Summed log-likelihood and greediness of each (context, continuation) request.

    Requests are padded on the right and run ``batch_size`` at a time (fewer when a batch would
    exceed ``max_batch_tokens`` tokens); with a causal mask, right padding never influences the
    positions we read. Requests with identical inputs share one row.

    ``share_context=True`` runs each distinct context once (left-padded, positions passed
    explicitly) and feeds every answer after a copy of its cached keys/values; the model must take
    ``past_key_values`` and ``position_ids``. It processes 3x fewer tokens on 0-shot ARC and far
    fewer on few-shot prompts, but takes two forward passes per batch of questions. On a busy
    2-core CPU, where each forward pass carries a large fixed cost, 64 ARC-Challenge items took
    136 s with it and 139-181 s without: no clear gain there, hence off by default.
    ``progress`` may be a description for the progress bar.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise DataError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
    if max_length is None:
        max_length = _max_length(model, tokenizer)
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    pairs = [encode_pair(tokenizer, c, x, add_bos_token) for c, x in requests]
    params = _forward_params(model)
    keep_ok = "logits_to_keep" in params
    can_share = {"past_key_values", "position_ids"} <= params
    if share_context and not can_share:
        raise DataError(f"share_context=True needs a model whose forward takes past_key_values and "
                        f"position_ids ({type(model).__name__} does not)")
    share = bool(share_context)

    groups: dict[tuple[int, ...], _Group] = {}
    if share:
        for i, (ctx, cont) in enumerate(pairs):
            _check_window(i, cont, max_length)
            if len(ctx) + len(cont) - 1 <= max_length:
                groups.setdefault(tuple(ctx), _Group(ctx)).requests.append((i, cont))
    # A context with a single continuation gains nothing from a separate pass.
    shared = [g for g in groups.values() if len(g.requests) > 1]
    in_group = {i for g in shared for i, _ in g.requests}
    rows = _build_rows([(i, ctx, cont) for i, (ctx, cont) in enumerate(pairs) if i not in in_group], max_length)

    device = model_device(model)
    results: list[RequestScore | None] = [None] * len(pairs)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(pairs), desc=progress if isinstance(progress, str) else "loglikelihood",
               enabled=bool(progress), unit="req", dynamic_ncols=True)
    try:
        unshared: list[_Group] = []
        for gbatch in _group_batches(shared, batch_size, max_batch_tokens):
            done = None if unshared else _run_groups(model, gbatch, device, keep_ok, results)
            if done is None:
                # A legacy cache format: score these requests the plain way.
                unshared += gbatch
            else:
                bar.update(done)
        rows += _build_rows([(i, g.context, cont) for g in unshared for i, cont in g.requests], max_length)
        for batch in _batches(rows, batch_size, max_batch_tokens):
            bar.update(_run_rows(model, batch, device, keep_ok, results))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# metrics


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1) over sqrt(n); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


NORMS = ("answer", "continuation")


def _norm_length(item: TaskItem, choice: int, norm: str) -> int:
    if item.kind == "partial":
        text = item.continuation
    elif norm == "answer":
        text = item.choices[choice]
    else:
        text = item.delimiter + item.choices[choice]
    # An empty answer (with a separator that still gives it tokens) has no length to divide by;
    # count it as one byte rather than divide by zero.
    return max(1, len(text.encode("utf-8")))  # type: ignore[union-attr]


def score_items(
    model,
    tokenizer,
    items: Sequence[TaskItem],
    *,
    name: str = "items",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_length: int | None = None,
    add_bos_token: bool = False,
    share_context: bool = False,
    norm: str = "answer",
    progress: bool = True,
) -> TaskResult:
    """Score task items (all of one kind) and compute their metrics.

    ``norm`` picks the length ``acc_norm`` divides by: ``"answer"`` (lm-eval: the answer text
    without its separating space) or ``"continuation"`` (the scored continuation with the space,
    the ``acc_per_char`` of the OLMES request files), both in UTF-8 bytes.
    """
    if norm not in NORMS:
        raise DataError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    items = list(items)
    if not items:
        raise DataError(f"{name}: no items to evaluate")
    kinds = {it.kind for it in items}
    if len(kinds) != 1:
        raise DataError(f"{name}: items of several kinds {sorted(kinds)}; evaluate them separately")
    kind = kinds.pop()
    requests, owner = [], []
    for k, it in enumerate(items):
        for pair in it.requests():
            requests.append(pair)
            owner.append(k)
    scores = score_requests(model, tokenizer, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                            max_length=max_length, add_bos_token=add_bos_token, share_context=share_context,
                            progress=name if progress else False)
    per_item: list[list[RequestScore]] = [[] for _ in items]
    for k, s in zip(owner, scores):
        per_item[k].append(s)

    lls = [[s.loglikelihood for s in ss] for ss in per_item]
    if kind == "greedy":
        correct = [1.0 if ss[0].is_greedy else 0.0 for ss in per_item]
        total_ll = sum(l[0] for l in lls)
        metrics: dict[str, float | int | None] = {
            "acc": sum(correct) / len(items),
            "acc_stderr": mean_stderr(correct),
            "acc_norm": None,
            "acc_norm_stderr": None,
            "perplexity": math.exp(-total_ll / len(items)),
            "n": len(items),
        }
        preds = [0 if c else -1 for c in correct]
        return TaskResult(name, metrics, lls, preds, preds, correct)

    preds = [_argmax(l) for l in lls]
    norm_preds = [_argmax([v / _norm_length(it, j, norm) for j, v in enumerate(l)]) for it, l in zip(items, lls)]
    correct = [1.0 if p == it.label else 0.0 for p, it in zip(preds, items)]
    correct_norm = [1.0 if p == it.label else 0.0 for p, it in zip(norm_preds, items)]
    metrics = {
        "acc": sum(correct) / len(items),
        "acc_stderr": mean_stderr(correct),
        "acc_norm": sum(correct_norm) / len(items),
        "acc_norm_stderr": mean_stderr(correct_norm),
        "n": len(items),
    }
    return TaskResult(name, metrics, lls, preds, norm_preds, correct)


def evaluate_task(
    model,
    tokenizer,
    task: str | Task,
    *,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_length: int | None = None,
    add_bos_token: bool = False,
    share_context: bool = False,
    norm: str = "answer",
    progress: bool = True,
) -> TaskResult:
    """Evaluate one task (a name for :func:`load_task`, or a loaded :class:`Task`)."""
    if isinstance(task, Task):
        if split is not None and split != task.split:
            raise DataError(f"task {task.name} was loaded from the {task.split} split, not {split!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"limit must be a positive integer or None, got {limit!r}")
        name, items = task.name, task.items[:limit] if limit else task.items
    else:
        loaded = load_task(task, split=split, limit=limit)
        name, items = loaded.name, loaded.items
    return score_items(model, tokenizer, items, name=name, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                       max_length=max_length, add_bos_token=add_bos_token, share_context=share_context,
                       norm=norm, progress=progress)


def evaluate(
    model,
    tokenizer,
    tasks: str | Task | Sequence[str | Task],
    *,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_length: int | None = None,
    add_bos_token: bool = False,
    share_context: bool = False,
    norm: str = "answer",
    progress: bool = True,
) -> dict[str, dict[str, float | int | None]]:
    """Zero-shot accuracy of ``model`` on each task.

    ``tasks`` is a name, a comma-separated list of names, a loaded :class:`Task`, or a sequence
    of these. Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``
    (greedy tasks such as LAMBADA give ``acc_norm`` = None and add ``perplexity``). ``limit``
    keeps the first ``limit`` documents of each task.
    """
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    todo: list[str | Task] = []
    for t in tasks:
        if isinstance(t, str):
            todo += [s.strip() for s in t.split(",") if s.strip()]
        elif isinstance(t, Task):
            todo.append(t)
        else:
            raise DataError(f"a task is a name or a loaded Task, got {type(t).__name__}")
    if not todo:
        raise DataError("no tasks to evaluate")
    out: dict[str, dict[str, float | int | None]] = {}
    for t in todo:
        res = evaluate_task(model, tokenizer, t, split=split, limit=limit, batch_size=batch_size,
                            max_batch_tokens=max_batch_tokens, max_length=max_length,
                            add_bos_token=add_bos_token, share_context=share_context, norm=norm,
                            progress=progress)
        out[res.name] = res.metrics
    return out
