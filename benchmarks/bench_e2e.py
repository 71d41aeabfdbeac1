"""End-to-end check and benchmark on one GPU, in one command (issue 7's acceptance run).

    python benchmarks/bench_e2e.py                       # LLaMA-2-7B shape, 32 layers, < 8 minutes on an H100
    python benchmarks/bench_e2e.py --layers 8 --budget-s 200
    python benchmarks/bench_e2e.py --layers 8 --batch 1,32 --prompt-len 128 --compile-compare --no-fp8 --no-hf

1. Correctness, on a tiny LLaMA compressed to 2:4 W4A16 g128 and saved as a checkpoint: the GPU load
   (kernels, CUDA graphs) against the CPU reference path of the same checkpoint - logits within
   float16 tolerance, greedy tokens equal for 32 new tokens (two prompts, one left-padded), the
   CUDA-graph decode equal to the eager one, the compiled (torch.compile) graph decode equal to the
   uncompiled one, the GPU holding only packed weights; the 2:4 fp8 W8A8 twin within fp8 tolerance.
2. Speed, on a LLaMA-2-7B-shaped synthetic model (random fp16 weights built on the GPU, compressed
   without calibration): prefill and decode tokens/s of 2:4 W4A16, 2:4 fp8 (W8A8), dense fp16 in the
   same engine and plain transformers generate, batches 1/8/32/128, prompts 128/2048, configurations
   that do not fit skipped, the time budget respected; weight memory and the acceptance ratios.
   ``--compile`` / ``--no-compile`` choose the decode step (default: compiled when it works);
   ``--compile-compare`` times both (engines '<name>' and '<name>-compiled'). ``--embed-int8`` gives
   the sparse engines an int8 input embedding (int8 rows + per-row scales; issue 7's <= 0.22x memory
   target) and adds a GPU-vs-CPU greedy check of it to the correctness phase. Every engine's model
   has q/k/v and gate/up fused (``models/fused.py``; ``--no-fuse`` keeps them separate);
   ``--fuse-compare sparse,sparse-fp8,dense`` also times those engines unfused ('<engine>-unfused',
   the same weights; ``--compare-batch`` limits the batches), ``--prefill-only-len 2048`` measures
   prefill only at those prompt lengths (no decode compilation; the fp8 engines then run there only),
   ``--no-time-dense`` builds the dense model for the twins without timing it; ``--gqa-compare``
   adds 'sparse-gqarows' (fused, attention through models/attention.sdpa_attention, no ``repeat_kv``)
   to isolate the GQA path against the default (transformers' SDPA).
   Issue 7's run within ~4 minutes: ``--embed-int8 --batch 1,32 --prompt-len 128 --no-hf
   --fuse-compare sparse,sparse-fp8 --compare-batch 1 --prefill-only-len 2048 --budget-s 110``.

Results go to $OUT (or --out): bench_e2e.json, bench_e2e.md, bench_e2e.png. The short table is
printed last. The exit status is 1 when a correctness check failed (timings still run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sparsequant as sq  # noqa: E402
from sparsequant.nn.linear import SparseQuantLinear  # noqa: E402
from sparsequant.runtime import synthetic as syn  # noqa: E402
from sparsequant.runtime.bench import BenchSettings, environment, run_bench  # noqa: E402
from sparsequant.runtime.generate import generate  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# -- 1. correctness -------------------------------------------------------------------------
#: Largest float32-reference gap between the reference's token and the GPU's that counts as a tie:
#: the logits here are ~2-4, where float16 steps by 0.002-0.004, and the GPU's fp16 kernels sum in
#: another order than the CPU reference, so a top-2 gap below ~2 steps can flip either way.
NEAR_TIE = 5e-3


def greedy_check(got, want, prompts, ref32) -> dict:
    """Greedy tokens equal, or every prompt's first divergence at a near-tie of the float32
    reference (after a divergence the two continue from different contexts: nothing more to compare)."""
    info = {"equal_tokens_per_prompt": [sum(a == b for a, b in zip(x, y)) for x, y in zip(got, want)],
            "gpu": got, "cpu_reference": want, "divergences": []}
    for r, (x, y) in enumerate(zip(got, want)):
        if x != y:
            k = next(i for i, (a, b) in enumerate(zip(x, y)) if a != b)
            with torch.no_grad():
                lg = ref32(torch.tensor([prompts[r] + y[:k]])).logits[0, -1].double()
            info["divergences"].append({"prompt": r, "step": k, "ref_token": y[k], "gpu_token": x[k],
                                        "ref_logit_gap": float(lg[y[k]] - lg[x[k]])})
    info["ok"] = all(abs(d["ref_logit_gap"]) < NEAR_TIE for d in info["divergences"])
    return info
@torch.no_grad()
def correctness(results: dict, embed_int8: bool = False, head_int8: bool = False) -> bool:
    from transformers import AutoModelForCausalLM

    checks = results.setdefault("checks", {})
    torch.manual_seed(0)
    cfg = syn.synthetic_config("tiny-llama")
    cfg.initializer_range = 0.06  # sharper logits than 0.02: fewer near-ties between fp16 and the reference
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    result = syn.compress_model_nm24(model, bits=4, group_size=128)
    tmp = Path(tempfile.mkdtemp(prefix="sq-e2e-"))
    sq.save(result, tmp / "ck")
    # the reference: CPU, the stock transformers forwards over the stored linears (no fusion)
    ref, _ = sq.load(tmp / "ck", dtype=torch.float16, fuse=False)  # CPU reference path, same dtype as the GPU
    ref32, _ = sq.load(tmp / "ck", fuse=False)  # CPU float32
    before = torch.cuda.memory_allocated()
    fast, _ = sq.load(tmp / "ck", device="cuda")  # fused q/k/v and gate/up (the default)
    held = torch.cuda.memory_allocated() - before
    lins = [m for m in fast.modules() if isinstance(m, SparseQuantLinear)]
    kinds = sorted({getattr(m._kernel_state, "kind", type(m._kernel_state).__name__) for m in lins})
    packed = sum(m.packed.nbytes() for m in lins)
    other = sum(t.numel() * t.element_size() for n, t in fast.state_dict().items() if ".packed_" not in n)
    checks["kernels"] = {"ok": all(m._kernel_state is not None for m in lins) and len(lins) == 4 * cfg.num_hidden_layers,
                         "kinds": kinds, "linears": len(lins), "fused": [n for n, m in fast.named_modules()
                                                                         if n.endswith(("qkv_proj", "gate_up_proj"))][:2]}
    checks["gpu_memory"] = {"ok": held <= 1.1 * (packed + other) + (1 << 20), "held_bytes": held,
                            "packed_bytes": packed, "uncompressed_bytes": other}

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=g)
    want = ref32(ids).logits.double()
    got = fast(ids.cuda()).logits.double().cpu()
    got_ref16 = ref(ids).logits.double()
    rel = float((got - want).norm() / want.norm())
    rel16 = float((got_ref16 - want).norm() / want.norm())
    checks["logits"] = {"ok": rel < 1e-2 and rel < 4 * rel16 + 1e-3, "rel_err_gpu_vs_fp32_ref": rel,
                        "rel_err_cpu_fp16_ref_vs_fp32_ref": rel16,
                        "max_abs_gpu_vs_fp16_ref": float((got - got_ref16).abs().max())}

    prompts = [[1, 15, 27, 300, 42, 7, 99, 5], [3, 200, 17]]
    t_ref = generate(ref, prompts, max_new_tokens=32, eos_token_id=[]).tokens
    t_gpu = generate(fast, prompts, max_new_tokens=32, eos_token_id=[]).tokens
    t_eager = generate(fast, prompts, max_new_tokens=32, eos_token_id=[], cuda_graph=False, compile=False).tokens
    t_plain = generate(fast, prompts, max_new_tokens=32, eos_token_id=[], compile=False).tokens
    t_comp = generate(fast, prompts, max_new_tokens=32, eos_token_id=[], compile=True).tokens
    plain_gpu, _ = sq.load(tmp / "ck", device="cuda", fuse=False)
    t_unfused = generate(plain_gpu, prompts, max_new_tokens=32, eos_token_id=[]).tokens
    del plain_gpu
    checks["fused_equals_unfused_gpu"] = {"ok": t_unfused == t_gpu,
                                          "equal_tokens_per_prompt": [sum(a == b for a, b in zip(x, y))
                                                                      for x, y in zip(t_gpu, t_unfused)]}
    info = greedy_check(t_gpu, t_ref, prompts, ref32)
    checks["greedy_32_tokens_gpu_vs_cpu_reference"] = info
    checks["cuda_graph_equals_eager"] = {"ok": t_plain == t_eager}
    checks["compiled_graph_equals_uncompiled"] = {"ok": t_comp == t_plain,
                                                   "equal_tokens_per_prompt": [sum(a == b for a, b in zip(x, y))
                                                                               for x, y in zip(t_comp, t_plain)]}

    if embed_int8 or head_int8:  # the same checkpoint with int8 tables: GPU (compiled graph) vs CPU reference
        opts = dict(embed_int8=embed_int8, head_int8=head_int8)
        ref8, _ = sq.load(tmp / "ck", dtype=torch.float16, fuse=False, **opts)
        ref8_32, _ = sq.load(tmp / "ck", fuse=False, **opts)
        fast8, _ = sq.load(tmp / "ck", device="cuda", **opts)
        t8_ref = generate(ref8, prompts, max_new_tokens=32, eos_token_id=[]).tokens
        t8_gpu = generate(fast8, prompts, max_new_tokens=32, eos_token_id=[]).tokens
        tables = [m for m in (fast8.get_input_embeddings() if embed_int8 else None,
                              fast8.get_output_embeddings() if head_int8 else None) if m is not None]
        info8 = greedy_check(t8_gpu, t8_ref, prompts, ref8_32)
        info8["ok"] = info8["ok"] and all(m.codes.is_cuda and m.codes.dtype == torch.int8 for m in tables)
        info8["equal_tokens_to_fp16_tables"] = [sum(a == b for a, b in zip(x, y)) for x, y in zip(t8_gpu, t_gpu)]
        name = "_".join(n for n, on in (("embedding", embed_int8), ("head", head_int8)) if on)
        checks[f"int8_{name}_greedy_gpu_vs_cpu_reference"] = info8
        del fast8

    # 2:4 fp8 W8A8 twin of a dense fp16 tiny model: within fp8 tolerance of its W8A16 reference
    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cuda", seed=3)
    w8, _ = syn.sparse_twin(dense, "2:4-w8a16")
    fp8, _ = syn.sparse_twin(dense, "2:4-fp8")
    x = torch.randint(0, 512, (4, 64), device="cuda")
    a = w8(x).logits.double()
    b = fp8(x).logits.double()
    rel8 = float((a - b).norm() / a.norm())
    kinds8 = sorted({getattr(m._kernel_state, "kind", "none") for m in fp8.modules() if isinstance(m, SparseQuantLinear)})
    checks["fp8_w8a8_vs_w8a16"] = {"ok": rel8 < 0.25 and kinds8 == ["nm24-w8a8-fp8"], "rel_err": rel8, "kinds": kinds8}
    ok = all(c["ok"] for c in checks.values())
    for name, c in checks.items():
        log(f"{'PASS' if c['ok'] else 'FAIL'} {name}: " + json.dumps({k: v for k, v in c.items()
                                                                  if k not in ('ok', 'gpu', 'cpu_reference')}))
    del fast, dense, w8, fp8
    torch.cuda.empty_cache()
    return ok


# -- 2. speed -------------------------------------------------------------------------------
def _twins(dense, args, suffix: str, meta: dict, fp8: bool = True) -> dict:
    """The compressed engines built from ``dense`` (fused or not), named ``<engine><suffix>``."""
    sparse, pack_s = syn.sparse_twin(dense, "2:4-w4a16", embed_int8=args.embed_int8, head_int8=args.head_int8)
    meta[f"pack_seconds_w4a16{suffix}"] = pack_s
    out = {"sparse" + suffix: sparse}
    if fp8 and not args.no_fp8 and args.device == "cuda":
        try:
            out["sparse-fp8" + suffix], meta[f"pack_seconds_fp8{suffix}"] = syn.sparse_twin(
                dense, "2:4-fp8", embed_int8=args.embed_int8, head_int8=args.head_int8)
        except Exception as exc:  # report and go on with the other engines
            meta["fp8_error"] = f"{type(exc).__name__}: {exc}"
            log(f"2:4 fp8 twin failed: {meta['fp8_error']}")
    return out


def speed(args, results: dict, save=lambda: None):
    from sparsequant.models.fused import fuse_projections
    from sparsequant.runtime.bench import BenchReport

    cfg = syn.synthetic_config(args.config, args.layers)
    log(f"building {args.config} with {cfg.num_hidden_layers} layers (random fp16 on the GPU)"
        + (", q/k/v and gate/up fused" if args.fuse else ", projections unfused"))
    dense = syn.build_dense(cfg, device=args.device, dtype=torch.float16, seed=0)
    if args.fuse:
        fuse_projections(dense, decode_attention=args.decode_attention)  # the compressed twins mirror it
    meta = {"model": f"{args.config} ({cfg.num_hidden_layers} layers)", "config": args.config,
            "layers": cfg.num_hidden_layers, "embed_int8": args.embed_int8, "head_int8": args.head_int8,
            "fused": args.fuse,
            "decode_attention": "triton" if args.fuse and args.decode_attention else "sdpa"}
    engines = _twins(dense, args, "", meta)
    log(f"2:4 W4A16 g128 packing + kernel layout: {meta['pack_seconds_w4a16']:.1f} s for {cfg.num_hidden_layers} layers"
        + (" (int8 input embedding)" if args.embed_int8 else "") + (" (int8 LM head)" if args.head_int8 else ""))
    if args.time_dense:
        engines["dense"] = dense
    if not args.no_hf:
        engines["transformers"] = dense
    unfused = {}  # the comparison engines: '-unfused' and '-gqarows'
    if args.fuse_compare:  # the same weights (same seed), projections separate
        plain = syn.build_dense(cfg, device=args.device, dtype=torch.float16, seed=0)
        twins = _twins(plain, args, "-unfused", meta, fp8="sparse-fp8" in args.fuse_compare)
        for name in args.fuse_compare:
            model = plain if name == "dense" else twins.get(name + "-unfused")
            if model is not None:
                unfused[name + "-unfused"] = model
        del plain, twins
    if args.gqa_compare:  # fused projections, sdpa_attention (no repeat_kv) instead of transformers' SDPA
        other = syn.build_dense(cfg, device=args.device, dtype=torch.float16, seed=0)
        fuse_projections(other, gqa_rows=True)
        unfused["sparse-gqarows"], _ = syn.sparse_twin(other, "2:4-w4a16", embed_int8=args.embed_int8, head_int8=args.head_int8)
        del other
    if args.attn_compare:  # the same weights, the other attention at one query token
        other = syn.build_dense(cfg, device=args.device, dtype=torch.float16, seed=0)
        fuse_projections(other, decode_attention=not args.decode_attention)
        tag = "-sdpa" if args.decode_attention else "-tritonattn"
        unfused["sparse" + tag], _ = syn.sparse_twin(other, "2:4-w4a16", embed_int8=args.embed_int8, head_int8=args.head_int8)
        if args.time_dense:
            unfused["dense" + tag] = other
        del other
    dense_bytes = syn.weight_bytes_on(dense, args.device)
    everything = {**engines, **unfused}
    meta["weight_bytes"] = {n: syn.weight_bytes_on(m, args.device) for n, m in everything.items() if n != "transformers"}
    meta["weight_ratio_vs_dense"] = {n: b / dense_bytes for n, b in meta["weight_bytes"].items()}
    lin = [m for m in engines["sparse"].modules() if isinstance(m, SparseQuantLinear)]
    lin_fp16 = sum(2 * m.in_features * m.out_features for m in lin)
    # on a GPU the kernel states hold the packed bits; on the CPU the checkpoint-layout buffers do
    kernel_bytes = sum(sum(t.numel() * t.element_size() for t in syn._state_tensors(m._kernel_state))
                       if m._kernel_state is not None else m.packed.nbytes() for m in lin)
    meta["linear_weight_ratio_vs_fp16"] = kernel_bytes / lin_fp16
    meta["sparse_linears"] = len(lin)
    meta["kernel_kinds"] = sorted({getattr(m._kernel_state, "kind", "none") for m in lin})
    log("weight memory vs dense fp16: " + ", ".join(f"{n} {r:.3f}x" for n, r in meta["weight_ratio_vs_dense"].items())
        + f"; compressed linears alone {meta['linear_weight_ratio_vs_fp16']:.3f}x; {len(lin)} linears "
        + ", ".join(meta["kernel_kinds"]))
    settings = BenchSettings(batches=tuple(args.batch), prompt_lens=tuple(args.prompt_len), steps=args.steps,
                             repeats=args.repeats, hf_tokens=args.hf_tokens, budget_s=args.budget_s)
    meta["settings"] = {k: getattr(settings, k) for k in settings.__dataclass_fields__}
    meta["compile"] = "compare" if args.compile_compare else args.compile
    meta["compile_prefill_only_lengths"] = bool(args.compile_prefill)
    from sparsequant.commands.bench import with_compile_options

    # Phases, most informative first; each gets what is left of --budget-s: batch by batch, the
    # engines then their -unfused twins; the prefill-only lengths after the first batch. With
    # prefill-only lengths, the fp8 (W8A8, mostly a prefill format) engines are measured there only.
    t0 = time.perf_counter()
    fields = dict(meta["settings"])
    fp8_prefill = bool(args.prefill_only_len)
    decode_main = {n: m for n, m in engines.items() if not (fp8_prefill and n.startswith("sparse-fp8"))}
    decode_unfused = {n: m for n, m in unfused.items() if not (fp8_prefill and n.startswith("sparse-fp8"))}
    compare = set(args.compare_batch or args.batch)
    phases = []
    for i, b in enumerate(args.batch):
        phases.append((decode_main, BenchSettings(**{**fields, "batches": (b,)}), frozenset()))
        if decode_unfused and b in compare:
            phases.append((decode_unfused, BenchSettings(**{**fields, "batches": (b,)}), frozenset()))
        if i == 0 and args.prefill_only_len:
            pre = {n: m for n, m in everything.items() if n != "transformers"}
            phases.append((pre, BenchSettings(**{**fields, "batches": tuple(args.prefill_only_batch),
                                                 "prompt_lens": tuple(args.prefill_only_len)}), frozenset(pre)))
    report = BenchReport(meta=meta)
    for group, st, prefill_only in phases:
        left = None if args.budget_s is None else max(0.0, args.budget_s - (time.perf_counter() - t0))
        st = BenchSettings(**{**{k: getattr(st, k) for k in st.__dataclass_fields__}, "budget_s": left})
        runs = with_compile_options(group, args.compile, args.compile_compare)
        if prefill_only and args.compile_prefill:  # every engine's prefill through torch.compile (same in each)
            runs = {n: (e[0], {**e[1], "compile_prefill": True}) if isinstance(e, tuple) else e for n, e in runs.items()}
        part = run_bench(runs, st, meta=meta, log=log, prefill_only=prefill_only)
        report.rows.extend(part.rows)
        results["bench"] = report.to_dict()
        save()
    report.meta["seconds"] = time.perf_counter() - t0
    results["bench"] = report.to_dict()
    return report


def acceptance(report) -> list[str]:
    rows = {(r.engine, r.batch, r.prompt_len): r for r in report.rows}
    lines = []

    def ratio(a, b, key):
        ra, rb = rows.get(a), rows.get(b)
        va, vb = getattr(ra, key, None) if ra else None, getattr(rb, key, None) if rb else None
        return (va / vb) if va and vb else None, va

    for suffix in ("", "-compiled"):
        if ("sparse" + suffix, 1, 128) not in rows:
            continue
        label = " (compiled step)" if suffix else ""
        r, v = ratio(("sparse" + suffix, 1, 128), ("dense" + suffix, 1, 128), "decode_tok_s")
        lines.append(f"batch 1 decode (prompt 128){label}: 2:4 W4A16 {v or 0:.0f} tok/s = {r or 0:.2f}x dense fp16 "
                     f"(target >= 2.5x and >= 500 tok/s)")
        r, v = ratio(("sparse" + suffix, 32, 128), ("dense" + suffix, 32, 128), "decode_tok_s")
        lines.append(f"batch 32 decode (prompt 128){label}: {v or 0:.0f} tok/s = {r or 0:.2f}x dense fp16 "
                     f"(target >= 1.8x)")
    variants = {"-unfused": "fused vs unfused projections",
                "-gqarows": "GQA attention: transformers' SDPA (repeat_kv) vs rows without repeat_kv (both fused)"}
    for (name, b, p), row in sorted(rows.items()):
        for suffix, label in variants.items():
            if not name.endswith(suffix):
                continue
            fused = name[: -len(suffix)]
            for key, what in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
                r, v = ratio((fused, b, p), (name, b, p), key)
                if r and getattr(row, key):
                    lines.append(f"{label}, {fused}, batch {b}, prompt {p}: {what} "
                                 f"{v:,.1f} vs {getattr(row, key):,.1f} tok/s = {r:.3f}x")
    for b in (1, 32):
        r, v = ratio(("dense-compiled", b, 128), ("dense", b, 128), "decode_tok_s")
        r2, v2 = ratio(("sparse-compiled", b, 128), ("sparse", b, 128), "decode_tok_s")
        if r or r2:
            lines.append(f"compiled vs uncompiled step, batch {b}: dense {r or 0:.2f}x, 2:4 W4A16 {r2 or 0:.2f}x")
    hf = rows.get(("transformers", 1, 128))
    if hf and hf.decode_tok_s:
        lines.append(f"  plain transformers generate, batch 1: {hf.decode_tok_s:.1f} tok/s")
    for b in (1, 8, 32):
        r, v = ratio(("sparse-fp8", b, 2048), ("dense", b, 2048), "prefill_tok_s")
        r4, _ = ratio(("sparse", b, 2048), ("dense", b, 2048), "prefill_tok_s")
        if r or r4:
            lines.append(f"2048-token prefill, batch {b}: 2:4 fp8 {r or 0:.2f}x, 2:4 W4A16 {r4 or 0:.2f}x dense fp16 "
                         f"(target fp8 >= 1.5x)")
    m = report.meta
    lines.append(f"weight memory: 2:4 W4A16 model {m['weight_ratio_vs_dense'].get('sparse', 0):.3f}x dense fp16, "
                 f"its linears {m['linear_weight_ratio_vs_fp16']:.3f}x (target <= 0.22x)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-2-7b", choices=list(syn.CONFIGS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers to keep (default: all)")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--prompt-len", type=lambda s: [int(x) for x in s.split(",")], default=[128, 2048])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-tokens", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="timing phase: no new measurement starts after this many seconds (default 300)")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step before graph capture (default: on when it works)")
    p.add_argument("--compile-compare", action="store_true",
                   help="time each engine with the uncompiled and the compiled decode step")
    p.add_argument("--embed-int8", action="store_true",
                   help="sparse engines hold the input embedding as int8 rows + per-row scales "
                   "(weight memory counts codes + scales; the correctness phase also checks it)")
    p.add_argument("--head-int8", action="store_true",
                   help="sparse engines hold the LM head as int8 rows + per-row scales (nn/int8_linear.py; the "
                   "dense engine keeps fp16; the correctness phase also checks it)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k/v and gate/up stacked into one linear each in every engine (default; models/fused.py)")
    p.add_argument("--fuse-compare", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="engines (sparse, sparse-fp8, dense) also timed with separate projections, as "
                   "'<engine>-unfused' (the same weights)")
    p.add_argument("--gqa-compare", action="store_true",
                   help="also time 'sparse-gqarows': fused projections with models/attention.sdpa_attention "
                   "(no repeat_kv of the KV cache) instead of transformers' SDPA, at --compare-batch")
    p.add_argument("--decode-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="fused engines attend for one query token with the split-KV Triton kernel "
                   "(kernels/triton_attention.py; default) instead of PyTorch's SDPA")
    p.add_argument("--attn-compare", action="store_true",
                   help="also time 'sparse-sdpa' and 'dense-sdpa' (or '-tritonattn' with --no-decode-attention): "
                   "the same weights with the other one-token attention, at --compare-batch")
    p.add_argument("--compare-batch", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="batches at which the -unfused engines decode (default: --batch)")
    p.add_argument("--prefill-only-len", type=lambda s: [int(x) for x in s.split(",")], default=[],
                   help="prompt lengths measured for prefill only, every engine (no decode compilation)")
    p.add_argument("--time-dense", action=argparse.BooleanOptionalAction, default=True,
                   help="time the dense fp16 engine (--no-time-dense: build it for the twins and the byte "
                   "ratios only, e.g. to compare fused and unfused sparse engines within a short budget)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="the prefill-only lengths run a torch.compiled prefill (one compilation per engine and length) "
                   "in every engine; the decode phases keep the default")
    p.add_argument("--prefill-only-batch", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the timing phase (tests; no correctness phase)")
    args = p.parse_args(argv)
    if (args.fuse_compare or args.gqa_compare) and not args.fuse:
        p.error("--fuse-compare and --gqa-compare compare against the fused engines: drop --no-fuse")
    if set(args.fuse_compare) - {"sparse", "sparse-fp8", "dense"}:
        p.error(f"--fuse-compare takes sparse, sparse-fp8, dense; got {args.fuse_compare}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_e2e.py needs a CUDA GPU (--device cpu --config tiny-llama is a dry run of the timing phase)")
        return 2
    results = {"environment": environment(), "command": " ".join(sys.argv)}
    log(json.dumps(results["environment"]))
    ok = True
    if not args.skip_correctness and args.device == "cuda":
        try:
            ok = correctness(results, args.embed_int8, args.head_int8)
        except Exception:
            ok = False
            results["correctness_error"] = traceback.format_exc()
            log("FAIL correctness raised:\n" + results["correctness_error"])
    report = None

    def save():  # after each phase, so a run cut short still leaves its numbers
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench_e2e.json").write_text(json.dumps(results, indent=2, default=str))

    save()
    try:
        report = speed(args, results, save)
    except Exception:
        results["speed_error"] = traceback.format_exc()
        log("speed phase raised:\n" + results["speed_error"])
    results["seconds"] = time.perf_counter() - T0
    if report is not None:
        results["acceptance"] = acceptance(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_e2e.json").write_text(json.dumps(results, indent=2, default=str))
        if report is not None:
            (out / "bench_e2e.md").write_text(report.table() + "\n")
            report.plot(out / "bench_e2e.png")
        log(f"saved results to {out}")
    print()
    print(f"correctness: {'PASS' if ok else 'FAIL'}   total {results['seconds']:.0f} s")
    if report is not None:
        print("\n".join(results["acceptance"]))
        print()
        print(report.table())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
