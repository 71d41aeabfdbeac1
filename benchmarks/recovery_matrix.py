"""Perplexity and size of the default model under a list of recipes (presets or YAML files), each
with recovery options on top: variance correction, blockwise fine-tuning, selective overrides.

Loads the model once and evaluates dense perplexity once; every recipe compresses a fresh copy
(recovery can add biases, so a copy is simpler than restoring a state dict). Rows are appended to
the JSON file as they finish; finished labels are skipped on a rerun.

    python benchmarks/recovery_matrix.py --threads 1 --out runs/recovery.json \\
        wanda24=2:4 wanda24-vc=2:4+vc sgpt24w4-vc-ft=2:4-w4a16-sparsegpt+vc+ft24 selective=runs/sel.yaml

A job is ``label=recipe[+vc|+vc-mean|+vc-lsq][+ftN]``; ``+ftN`` runs N fine-tuning steps per layer
(``--ft-lr``, ``--ft-batch``).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import replace
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
from sparsequant.recipe import CalibrationConfig, get_recipe


def job_recipe(spec: str, args):
    base, *mods = spec.split("+")
    recipe = get_recipe(base)
    rec = recipe.recovery
    for mod in mods:
        if mod == "vc":
            rec = replace(rec, variance_correction=True)
        elif mod.startswith("vc-"):
            rec = replace(rec, variance_correction=mod[3:])
        elif mod.startswith("ft"):
            rec = replace(rec, finetune_steps=int(mod[2:]), finetune_lr=args.ft_lr, finetune_batch=args.ft_batch)
        else:
            raise SystemExit(f"unknown modifier {mod!r} in {spec!r}")
    calib = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    return recipe.with_(recovery=rec, calibration=calib)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", nargs="+", help="label=recipe[+vc][+ftN]")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--ft-lr", type=float, default=5e-3)
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    ap.add_argument("--out", default="runs/recovery.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dense, tok = load_model(quiet=True)
    calib = calibration_windows(tok, args.samples, args.seq_len, seed=0)
    ev = evaluation_windows(tok, args.eval_seq_len, args.eval_windows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {r["label"] for r in rows}
    header = {"date": str(date.today()), "device": f"CPU ({platform.processor() or platform.machine()}), "
              f"{args.threads} threads", "calibration": f"{args.samples} x {args.seq_len} tokens, seed 0",
              "evaluation": f"first {args.eval_windows} x {args.eval_seq_len} tokens of the Wikipedia evaluation half"}

    def save():
        out.write_text(json.dumps({**header, "rows": rows}, indent=2))

    if not args.skip_dense and "dense" not in done:
        rows.append({"label": "dense", "recipe": "-", "ppl": perplexity(dense, ev, progress=False),
                     "bits_per_weight": 16.0, "model_ratio": 1.0, "seconds": 0.0})
        save()
    for job in args.jobs:
        label, _, spec = job.partition("=")
        if label in done:
            continue
        recipe = job_recipe(spec, args)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        result = compress_model(model, recipe, calib, progress=False)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, ev, progress=False)
        size = size_report(result.packed, uncompressed_tensors(model, result.packed, result.storage_dtype))
        ft = [r.recovery for r in result.layers if r.recovery]
        row = {"label": label, "recipe": spec, "ppl": ppl, "bits_per_weight": size.bits_per_weight,
               "model_ratio": size.model_ratio, "seconds": seconds,
               "layer_rel_error_mean": sum(r.rel_error for r in result.layers) / len(result.layers)}
        if ft:
            row["finetune_rel_before_mean"] = sum(f["finetune_rel_before"] for f in ft) / len(ft)
            row["finetune_rel_after_mean"] = sum(f["finetune_rel_after"] for f in ft) / len(ft)
            row["finetune_layers_kept"] = sum(bool(f["finetune_kept"]) for f in ft)
        rows.append(row)
        print(f"{label:28s} ppl {ppl:9.2f}  {size.bits_per_weight:.3f} b/w  {seconds:.0f}s", flush=True)
        save()
        del model, result
    print(markdown_table(["label", "recipe", "bits/weight", "model vs fp16", "ppl", "seconds"],
                         [[r["label"], r["recipe"], r["bits_per_weight"], r["model_ratio"], r["ppl"], r["seconds"]]
                          for r in rows]))


if __name__ == "__main__":
    main()
