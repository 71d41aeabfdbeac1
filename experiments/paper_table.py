"""Reproduce, on the default model, the shape of the LLaMA-2-7B results table in ANCHORS.md.

Rows: dense; int4 (GPTQ g128); 2-bit (GPTQ g64, about 8x smaller linears, and g16, which costs
as many bits per weight as 2:4 + int4 g128 once metadata is counted); 50% unstructured + 4-bit
(SparseGPT joint); 2:4 + 4-bit (SparseGPT joint); then the recovery rows (SLiM low-rank adapters
in float16 and 4-bit). Each row is compressed with the CLI into ``<out>/<row>``, evaluated on
perplexity and the four zero-shot tasks, and the report (Markdown, CSV, Pareto plot) is written to
``<out>/report``. Rows already present are skipped, so the script can be resumed. On 2 CPU cores a
row takes roughly 10-40 minutes depending on --limit; on an H100 (``--device cuda``) about a minute
with whole validation splits.

    python experiments/paper_table.py --out runs/paper --limit 500
    python experiments/paper_table.py --out runs/paper --device cuda --rows all
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparsequant.cli import main as cli

TASKS = "arc_challenge,arc_easy,piqa,winogrande"
R = "experiments/recipes/"
ROWS = {  # in the order a time-limited run takes them
    "24-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt"],
    "w4-gptq-g128": ["--recipe", "w4a16-gptq"],
    "w2-gptq-g64": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "64"],
    "50pct-w4-sparsegpt": ["--recipe", "50%-w4a16-sparsegpt"],
    "24-w4-sparsegpt-slim": ["--recipe", "2:4-w4a16-sparsegpt-slim"],
    "24-w4-sparsegpt-slim-q4": ["--recipe", "2:4-w4a16-sparsegpt-slim-q4"],
    # equal bits: 2:4 + int4 per channel (3.02 bits) against 2-bit GPTQ at 2.75-3.5 bits
    "24-w4pc-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--group-size", "0"],
    "w2-gptq-g16": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "16"],
    "w2a-gptq-g16": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "16", "--asym"],
    "w2a-gptq-g32": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "32", "--asym"],
    # equal size (~3.24 bits): three sensitive layers kept dense vs uniform 2:4 at int4 g64 (3.25)
    "selective45-w4-sparsegpt": ["--recipe", R + "selective45-sgpt24w4.yaml"],
    "24-w4g64-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--group-size", "64"],
    "24-w4g32-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--group-size", "32"],  # 3.5 bits
    "hybrid45-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--pattern", "hybrid:45%"],
    "24-w4-sparsegpt-vcft": ["--recipe", R + "24-w4-sparsegpt-vcft.yaml"],
    "24-w4pc-sparsegpt-vcft": ["--recipe", R + "24-w4pc-sparsegpt-vcft.yaml"],
    "hybrid35-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--pattern", "hybrid:35%"],
    "hybrid25-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--pattern", "hybrid:25%"],
    "24o8-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt", "--pattern", "2:4+8/256"],
    "24-w4-sparsegpt-slim-q4-vcft": ["--recipe", R + "24-w4-sparsegpt-slim-q4-vcft.yaml"],
    "w2-gptq-g128": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "128"],
}
CORE_ROWS = ["w4-gptq-g128", "w2-gptq-g64", "50pct-w4-sparsegpt", "24-w4-sparsegpt"]


def _run(argv: list[str]) -> None:
    code = cli(argv)
    if code:
        raise RuntimeError(f"sparsequant {' '.join(argv)} exited with {code}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: whole validation split)")
    ap.add_argument("--rows", default=",".join(CORE_ROWS),
                    help=f"comma-separated rows, or 'all' ({', '.join(ROWS)})")
    ap.add_argument("--recipe-row", action="append", default=[], metavar="NAME=RECIPE",
                    help="an extra row compressed with a preset or YAML recipe (repeatable)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new row after this many seconds (the report covers the rows done)")
    ap.add_argument("--keep-going", action="store_true", help="record a failing row and go on")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(args.out)
    limit = [] if args.limit is None else ["--limit", str(args.limit)]
    cli_flags = [] if args.threads is None else ["--threads", str(args.threads)]
    cli_flags += [] if args.device is None else ["--device", args.device]
    cli_flags += ["--dtype", "float32"]  # the CPU's numbers on a GPU too (the reference path, not the fp16 kernels)
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    for spec in args.recipe_row:
        name, _, recipe = spec.partition("=")
        if not name or not recipe:
            raise SystemExit(f"--recipe-row wants NAME=RECIPE, got {spec!r}")
        ROWS[name] = ["--recipe", recipe]
        rows.append(name)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dense = out / "dense"
    if not (dense / "eval.json").is_file():
        # the uncompressed model: evaluated as is, results saved as a pseudo run folder
        from sparsequant.cli import DEFAULT_EVAL_SEQ_LEN, DEFAULT_EVAL_WINDOWS
        from sparsequant.data.windows import evaluation_windows
        from sparsequant.eval.perplexity import perplexity
        from sparsequant.eval.zeroshot import evaluate
        from sparsequant.models.loading import load_model

        import torch

        model, tok = load_model(quiet=True)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        dense.mkdir(parents=True, exist_ok=True)
        ppl = perplexity(model, evaluation_windows(tok, DEFAULT_EVAL_SEQ_LEN, DEFAULT_EVAL_WINDOWS))
        results = {"ppl": {"value": ppl, "data": "wikipedia", "seq_len": DEFAULT_EVAL_SEQ_LEN,
                           "windows": DEFAULT_EVAL_WINDOWS},
                   "tasks": evaluate(model, tok, TASKS, limit=args.limit)}
        (dense / "eval.json").write_text(json.dumps(results, indent=2))
    done, failed = ["dense"], {}
    for name in rows:
        if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
            print(f"paper_table: deadline reached, not starting {name}", flush=True)
            continue
        folder = out / name
        try:
            if not (folder / "sparsequant.json").is_file():
                _run(["compress", *ROWS[name], *cli_flags, "--overwrite", "--out", str(folder)])
            if not (folder / "eval.json").is_file():
                _run(["eval", str(folder), "--ppl", "--tasks", TASKS, *limit, *cli_flags])
            done.append(name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a failing row must not lose the others
            if not args.keep_going:
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"paper_table: row {name} failed: {failed[name]}", flush=True)
        print(f"paper_table: {name} finished at {time.perf_counter() - t_start:.0f} s", flush=True)
    if failed:
        (out / "failed.json").write_text(json.dumps(failed, indent=2))
    try:
        cli(["report", *[str(out / n) for n in done], "--out", str(out / "report")])
    except Exception as exc:  # noqa: BLE001 - e.g. no matplotlib on the machine: the folders stay
        print(f"paper_table: report failed ({exc}); run 'sparsequant report' on the folders", flush=True)


if __name__ == "__main__":
    main()
