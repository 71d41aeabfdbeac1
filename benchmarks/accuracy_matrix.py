"""Perplexity of the default model under many recipes, side by side, with honest sizes.

Loads the model once, evaluates dense perplexity once, then for each (method, pattern, quant)
restores the dense weights, compresses, and evaluates on the same held-out windows. Results are
appended to a JSON file as they come (a crash keeps finished rows) and printed as a table.

    python benchmarks/accuracy_matrix.py --out runs/accuracy_matrix.json
    python benchmarks/accuracy_matrix.py --methods wanda,sparsegpt --patterns 2:4 --quant int4
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from sparsequant.checkpoint.io import uncompressed_tensors
from sparsequant.checkpoint.size import size_report
from sparsequant.data.windows import calibration_windows, evaluation_windows
from sparsequant.eval.perplexity import perplexity
from sparsequant.eval.table import markdown_table
from sparsequant.models.loading import load_model
from sparsequant.pipeline.sequential import compress_model
from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe

QUANTS = {
    "none": None,
    "int4": QuantConfig("rtn", 4, 128, True),
    "int4-gptq": QuantConfig("gptq", 4, 128, True),
    "int4g64": QuantConfig("rtn", 4, 64, True),
    "int4g64-gptq": QuantConfig("gptq", 4, 64, True),
    "int3": QuantConfig("rtn", 3, 128, True),
    "int2-gptq-g64": QuantConfig("gptq", 2, 64, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="magnitude,wanda")
    ap.add_argument("--patterns", default="2:4,4:8,8:16,50%")
    ap.add_argument("--quant", default="none,int4", help=f"comma list of {', '.join(QUANTS)}")
    ap.add_argument("--dense-quant", default="int4", help="quant schemes also run on the dense model")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--joint", action="store_true", help="joint prune+quantize where the method supports it")
    ap.add_argument("--true-sequential", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/accuracy_matrix.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of the rows already in --out")
    args = ap.parse_args()
    if args.table_only:
        print_table(json.loads(Path(args.out).read_text())["rows"])
        return

    torch.set_num_threads(args.threads)
    model, tok = load_model(quiet=True)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, args.samples, args.seq_len, seed=0)
    ev = evaluation_windows(tok, args.eval_seq_len, args.eval_windows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["method"], r["pattern"], r["quant"]) for r in rows}
    header = {"date": str(date.today()), "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads",
              "calibration": f"{args.samples} x {args.seq_len} tokens of the Wikipedia calibration half",
              "evaluation": f"{args.eval_windows} x {args.eval_seq_len} tokens of the Wikipedia evaluation half"}

    def save():
        out.write_text(json.dumps({**header, "rows": rows}, indent=2))

    if ("dense", "dense", "none") not in done:
        t0 = time.perf_counter()
        ppl = perplexity(model, ev, progress=False)
        rows.append({"method": "dense", "pattern": "dense", "quant": "none", "ppl": ppl, "bits_per_weight": 16.0,
                     "linear_ratio": 1.0, "model_ratio": 1.0, "seconds": time.perf_counter() - t0})
        save()
    dense_ppl = next(r["ppl"] for r in rows if r["method"] == "dense")

    names = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    jobs = [(m, p, q) for m in names(args.methods) for p in names(args.patterns) for q in names(args.quant)]
    jobs += [("-", "dense", q) for q in names(args.dense_quant) if q != "none"]
    for method, pattern, qname in jobs:
        if (method, pattern, qname) in done:
            continue
        model.load_state_dict(dense_state)
        recipe = Recipe(name="matrix", method=method if method != "-" else "magnitude", pattern=pattern,
                        quant=QUANTS[qname], joint=args.joint, true_sequential=args.true_sequential,
                        calibration=CalibrationConfig(samples=args.samples, seq_len=args.seq_len))
        t0 = time.perf_counter()
        result = compress_model(model, recipe, calib, progress=False)
        t_comp = time.perf_counter() - t0
        ppl = perplexity(model, ev, progress=False)
        size = size_report(result.packed, uncompressed_tensors(model, result.packed, result.storage_dtype))
        joint = recipe.plan().uses_joint
        rows.append({"method": method, "pattern": pattern, "quant": qname, "joint": joint, "ppl": ppl,
                     "bits_per_weight": size.bits_per_weight, "linear_ratio": size.linear_ratio,
                     "model_ratio": size.model_ratio, "seconds": t_comp})
        print(f"{method:10s} {pattern:6s} {qname:8s} ppl {ppl:10.2f} ({ppl / dense_ppl:.2f}x dense) "
              f"{size.bits_per_weight:.3f} b/w  {t_comp:.0f}s", flush=True)
        save()

    print_table(rows)


def print_table(rows):
    dense_ppl = next(r["ppl"] for r in rows if r["method"] == "dense")
    table = [[r["method"], r["pattern"], r["quant"] + (" joint" if r.get("joint") else ""), r["bits_per_weight"], r["linear_ratio"], r["model_ratio"],
              r["ppl"], r["ppl"] / dense_ppl, r["seconds"]] for r in rows]
    print(markdown_table(["method", "pattern", "quant", "bits/weight", "linears vs fp16", "model vs fp16", "ppl",
                          "ppl / dense", "seconds"], table))


if __name__ == "__main__":
    main()
