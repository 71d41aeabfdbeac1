"""``sparsequant bench``: prefill and decode tokens/s of a compressed model against dense fp16.

The model is a checkpoint folder (its dense baseline is the dequantized model) or a synthetic
config name (``llama-2-7b``, ``llama-3-8b``; random weights built on the device, compressed without
calibration, see runtime/synthetic.py). Writes bench.json, bench.md and bench.png to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    from ..errors import SparseQuantError

    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise SparseQuantError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise SparseQuantError(f"expected positive integers, got {text!r}")
    return vals


def add_parser(subparsers, common_parent):
    from ..runtime.synthetic import CONFIGS, SCHEMES

    p = subparsers.add_parser(
        "bench", parents=[common_parent], help="end-to-end prefill/decode tokens/s vs dense fp16 and transformers",
        description="Measure prefill and decode tokens/s (CUDA graphs, CUDA events, warm-up, median) of a "
        "compressed model, the dense fp16 model in the same engine, and plain transformers generate; "
        "peak GPU memory; configurations that do not fit are skipped and reported.",
        epilog="example: sparsequant bench llama-2-7b --layers 8 --out runs/bench-7b",
    )
    p.add_argument("model", help=f"checkpoint folder, or a synthetic config: {', '.join(CONFIGS)}")
    p.add_argument("--layers", type=int, help="synthetic configs: keep only the first N decoder layers")
    p.add_argument("--scheme", default="2:4-w4a16", help=f"synthetic configs: {', '.join(SCHEMES)} (default 2:4-w4a16)")
    p.add_argument("--engines", help="comma-separated: sparse, dense, transformers, sparse-fp8 "
                   "(default all that apply; sparse-fp8 needs CUDA and a synthetic config)")
    p.add_argument("--batch", default="1,8,32,128", help="batch sizes (default 1,8,32,128)")
    p.add_argument("--prompt-len", default="128,2048", help="prompt lengths (default 128,2048)")
    p.add_argument("--steps", type=int, default=16, help="decode steps per measurement (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per number; the median is reported")
    p.add_argument("--hf-tokens", type=int, default=8, help="new tokens per transformers generate call (default 8)")
    p.add_argument("--hf-max-batch", type=int, default=128, help="largest batch for the transformers baseline")
    p.add_argument("--budget-s", type=float, help="stop starting new measurements after this many seconds")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step before capturing its CUDA graph (default: on for CUDA "
                   "when it works); --compile-compare times both, as '<engine>' and '<engine>-compiled'")
    p.add_argument("--compile-compare", action="store_true",
                   help="time every engine with the uncompiled and the compiled decode step")
    p.add_argument("--embed-int8", action="store_true",
                   help="the sparse engines hold the input embedding as int8 rows + one scale per row "
                   "(the dense baseline keeps fp16); refused for tied embeddings")
    p.add_argument("--head-int8", action="store_true",
                   help="the sparse engines hold the LM head as int8 rows + one scale per row (a W8A16 kernel; "
                   "the dense baseline keeps fp16)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="every engine's model with q/k/v and gate/up stacked into one linear each (default; "
                   "--no-fuse keeps them separate)")
    p.add_argument("--out", help="folder for bench.json, bench.md and bench.png")
    p.set_defaults(func=run)
    return p


def build_engines(args, device, log=print):
    """``(engines {name: model}, meta, prefill_only names)`` for a checkpoint or a synthetic config."""
    import torch

    from .. import api
    from ..errors import SparseQuantError
    from ..models.loading import is_checkpoint
    from ..runtime import synthetic as syn

    wanted = None if not args.engines else [e.strip() for e in args.engines.split(",") if e.strip()]
    known = {"sparse", "dense", "transformers", "sparse-fp8"}
    if wanted and set(wanted) - known:
        raise SparseQuantError(f"unknown engine(s) {sorted(set(wanted) - known)}; choose from {sorted(known)}")
    meta = {"model": args.model, "device": str(device)}
    engines = {}
    t0 = time.perf_counter()
    if is_checkpoint(args.model):
        sparse, _ = api.load(args.model, device=device, dtype=torch.float16, embed_int8=args.embed_int8,
                             fuse=args.fuse, head_int8=args.head_int8)
        dense = syn.dense_twin(sparse)
        meta["source"] = "checkpoint"
        fp8 = None
    elif args.model in syn.CONFIGS:
        cfg = syn.synthetic_config(args.model, args.layers)
        dense = syn.build_dense(cfg, device=device, dtype=torch.float16, seed=0)
        if args.fuse:  # the twins below mirror it
            from ..models.fused import fuse_projections

            fuse_projections(dense)
        sparse, pack_s = syn.sparse_twin(dense, args.scheme, embed_int8=args.embed_int8, head_int8=args.head_int8)
        meta.update(source="synthetic", scheme=args.scheme, layers=cfg.num_hidden_layers,
                    full_layers=syn.CONFIGS[args.model]["num_hidden_layers"], pack_seconds=pack_s)
        fp8 = None
        if (wanted is None and device.type == "cuda") or (wanted and "sparse-fp8" in wanted):
            if device.type != "cuda":
                raise SparseQuantError("the sparse-fp8 engine needs a CUDA device")
            fp8, meta["pack_seconds_fp8"] = syn.sparse_twin(dense, "2:4-fp8", embed_int8=args.embed_int8,
                                                            head_int8=args.head_int8)
    else:
        raise SparseQuantError(f"{args.model} is neither a sparsequant checkpoint nor a synthetic config "
                               f"({', '.join(syn.CONFIGS)})")
    meta["build_seconds"] = time.perf_counter() - t0
    meta["embed_int8"] = bool(args.embed_int8)
    meta["head_int8"] = bool(args.head_int8)
    meta["fused"] = bool(args.fuse)
    order = wanted or ["sparse", "sparse-fp8", "dense", "transformers"]
    for name in order:
        model = {"sparse": sparse, "dense": dense, "transformers": dense, "sparse-fp8": fp8}[name]
        if model is not None:
            engines[name] = model
    dense_bytes = syn.weight_bytes_on(dense, device)
    meta["weight_bytes"] = {n: syn.weight_bytes_on(m, device) for n, m in engines.items() if n != "transformers"}
    meta["weight_ratio_vs_dense"] = {n: b / dense_bytes for n, b in meta["weight_bytes"].items()}
    lin = [m for m in sparse.modules() if hasattr(m, "prepare_kernel")]
    meta["linear_bytes_packed"] = sum(m.packed.nbytes() for m in lin)
    meta["linear_params"] = sum(m.in_features * m.out_features for m in lin)
    meta["linear_ratio_vs_fp16"] = meta["linear_bytes_packed"] / (2 * meta["linear_params"]) if lin else None
    meta["kernel_states"] = sum(getattr(m, "_kernel_state", None) is not None for m in lin)
    meta["compressed_linears"] = len(lin)
    log(f"built {', '.join(engines)} in {meta['build_seconds']:.1f} s; weight memory vs dense: "
        + ", ".join(f"{n} {r:.3f}x" for n, r in meta["weight_ratio_vs_dense"].items()))
    return engines, meta, frozenset()


def with_compile_options(engines: dict, compile: bool | None, compare: bool = False) -> dict:
    """Engine entries for run_bench: each model with its DecodeEngine ``compile`` option; with
    ``compare``, every engine twice (uncompiled as '<name>', compiled as '<name>-compiled')."""
    out = {}
    for name, model in engines.items():
        if name == "transformers":  # plain generate: no engine options
            out[name] = model
        elif compare:
            out[name] = (model, {"compile": False})
        else:
            out[name] = (model, {"compile": compile})
    if compare:
        for name, model in engines.items():
            if name != "transformers":
                out[f"{name}-compiled"] = (model, {"compile": True})
    return out


def run(args) -> int:
    import torch

    from ..runtime.bench import BenchSettings, environment, run_bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(batches=_ints(args.batch), prompt_lens=_ints(args.prompt_len), steps=args.steps,
                             repeats=args.repeats, hf_tokens=max(2, args.hf_tokens), hf_max_batch=args.hf_max_batch,
                             budget_s=args.budget_s)
    engines, meta, prefill_only = build_engines(args, device)
    engines = with_compile_options(engines, args.compile, args.compile_compare)
    meta["environment"] = environment()
    meta["settings"] = {k: getattr(settings, k) for k in settings.__dataclass_fields__}
    report = run_bench(engines, settings, meta=meta, prefill_only=prefill_only)
    print()
    print(report.table())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.save_json(out / "bench.json")
        from ..checkpoint.atomic import atomic_write_text

        atomic_write_text(out / "bench.md", report.table() + "\n")
        report.plot(out / "bench.png")
        print(f"\nsaved {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}", file=sys.stderr)
    return 0
