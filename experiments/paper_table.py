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
from pathlib import Path

from sparsequant.cli import main as cli

TASKS = "arc_challenge,arc_easy,piqa,winogrande"
ROWS = {
    "w4-gptq-g128": ["--recipe", "w4a16-gptq"],
    "w2-gptq-g64": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "64"],
    "50pct-w4-sparsegpt": ["--recipe", "50%-w4a16-sparsegpt"],
    "24-w4-sparsegpt": ["--recipe", "2:4-w4a16-sparsegpt"],
    "w2-gptq-g16": ["--recipe", "w4a16-gptq", "--bits", "2", "--group-size", "16"],
    "24-w4-sparsegpt-slim": ["--recipe", "2:4-w4a16-sparsegpt-slim"],
    "24-w4-sparsegpt-slim-q4": ["--recipe", "2:4-w4a16-sparsegpt-slim-q4"],
}
CORE_ROWS = ["w4-gptq-g128", "w2-gptq-g64", "50pct-w4-sparsegpt", "24-w4-sparsegpt"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: whole validation split)")
    ap.add_argument("--rows", default=",".join(CORE_ROWS),
                    help=f"comma-separated rows, or 'all' ({', '.join(ROWS)})")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args()
    out = Path(args.out)
    limit = [] if args.limit is None else ["--limit", str(args.limit)]
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    threads += [] if args.device is None else ["--device", args.device]
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    dense = out / "dense"
    if not (dense / "eval.json").is_file():
        # the uncompressed model: evaluated as is, results saved as a pseudo run folder
        import json

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
    for name in rows:
        folder = out / name
        if not (folder / "sparsequant.json").is_file():
            cli(["compress", *ROWS[name], *threads, "--out", str(folder)])
        if not (folder / "eval.json").is_file():
            cli(["eval", str(folder), "--ppl", "--tasks", TASKS, *limit, *threads])
    cli(["report", *[str(out / n) for n in ["dense", *rows]], "--out", str(out / "report")])


if __name__ == "__main__":
    main()
