"""``sparsequant report``: the results table, CSV and Pareto plot of finished runs."""
from __future__ import annotations


def add_parser(subparsers, common_parent):
    p = subparsers.add_parser(
        "report", parents=[common_parent],
        help="results table (Markdown, CSV) and accuracy/perplexity vs bits plot of finished runs",
        description="Collect run folders (checkpoints, or folders with run.json / eval.json / sparsequant.json; "
        "a folder of such folders works too) or accuracy_matrix.py JSON files, and write results.md, results.csv "
        "and pareto.png: Quantization | Pruning | Bitwidth | Sparsity | Compression Ratio | ArcC | ArcE | PiQA | "
        "Wino | Average | PPL, with accuracy and perplexity plotted against bits per weight and the Pareto "
        "front marked.",
        epilog="example: sparsequant report runs/* runs/accuracy_matrix.json --out report",
    )
    p.add_argument("paths", nargs="+", help="run folders, folders of run folders, or accuracy_matrix.py JSON files")
    p.add_argument("--out", required=True, help="folder for results.md, results.csv and pareto.png (created)")
    p.add_argument("--metric", choices=("acc", "acc_norm"), default="acc",
                   help="zero-shot score shown for each task (default acc)")
    p.add_argument("--title", help="title of the plot")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..eval.report import collect, markdown, write_outputs

    rows, notes = collect(args.paths, args.metric)
    files = write_outputs(rows, notes, args.out, metric=args.metric, title=args.title)
    print(markdown(rows))
    for n in notes:
        print(f"note: {n}")
    print()
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0
