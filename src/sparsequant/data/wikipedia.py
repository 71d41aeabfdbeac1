"""Plain-text English Wikipedia articles from the dump that ships in gensim's wheel.

206 pages of a 2017 dump; after dropping redirects and non-article namespaces and stripping the
wiki markup, about 100 articles and 640k SmolLM2 tokens. The articles are split once, by a
fixed seeded shuffle, into a calibration half and an evaluation half that never overlap.
"""
from __future__ import annotations

import bz2
import json
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ET

from .assets import WIKIPEDIA_WHEEL, cache_dir, extract_member
from ..errors import DataError

DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLIT_SEED = 1234  # fixed forever: changing it would mix calibration and evaluation text
MIN_CHARS = 500
_CACHE_NAME = "wikipedia-articles-v1.jsonl"


def _clean(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    # Drop templates, tables, references and files before stripping, so their contents vanish too.
    for node in code.filter_templates(recursive=False):
        try:
            code.remove(node)
        except ValueError:
            pass
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in ("ref", "table", "gallery", "math", "timeline", "references"):
            try:
                code.remove(tag)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if re.match(r"^(thumb|File:|Image:|Category:)", line):
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _parse_dump(path) -> list[dict]:
    articles = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            title = elem.findtext("{*}title") or ""
            redirect = elem.find("{*}redirect") is not None
            text = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            if ns != "0" or redirect or text.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean(text)
            if len(body) >= MIN_CHARS:
                articles.append({"title": title, "text": body})
    return articles


def articles(quiet: bool = False) -> list[dict]:
    """All cleaned articles (title, text), in dump order; cached as JSON lines after the first call."""
    cached = cache_dir() / "data" / _CACHE_NAME
    if cached.is_file():
        with open(cached) as f:
            return [json.loads(line) for line in f]
    dump = extract_member(WIKIPEDIA_WHEEL, DUMP_MEMBER, quiet=quiet)
    result = _parse_dump(dump)
    if not result:
        raise DataError(f"no articles found in {dump}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False) as tmp:
        for a in result:
            tmp.write(json.dumps(a) + "\n")
    os.replace(tmp.name, cached)
    return result


def split_articles(quiet: bool = False) -> dict[str, list[dict]]:
    """{'calibration': [...], 'evaluation': [...]}: a fixed half/half split by article."""
    arts = articles(quiet=quiet)
    order = list(range(len(arts)))
    random.Random(SPLIT_SEED).shuffle(order)
    half = len(order) // 2
    return {
        "calibration": [arts[i] for i in sorted(order[:half])],
        "evaluation": [arts[i] for i in sorted(order[half:])],
    }


def split_text(split: str, quiet: bool = False) -> str:
    parts = split_articles(quiet=quiet)
    if split not in parts:
        raise DataError(f"unknown split {split!r}; use 'calibration' or 'evaluation'")
    return "\n\n".join(f"{a['title']}\n\n{a['text']}" for a in parts[split])
