"""Where a decode step's time goes: a CUDA-graph-free profile of one engine step, per kernel.

Builds a synthetic model (default LLaMA-2-7B shape, 8 layers), runs the engine's decode step
eagerly under torch.profiler for a few steps and prints the top kernels by total GPU time, the
number of kernel launches per step, and the graph-replay step time for comparison. Run with
``--scheme dense`` and ``--scheme 2:4-w4a16`` to compare, ``--compile`` for the torch.compiled step,
``--no-fuse`` for separate q/k/v and gate/up linears.

    PYTHONPATH=src python benchmarks/profile_decode.py --layers 8 --scheme dense
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--scheme", default="dense")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="profile the torch.compiled step (default: the uncompiled one)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k/v and gate/up fused into one linear each, as the engine runs by default")
    p.add_argument("--decode-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="fused attention for one query token through kernels/triton_attention.py (default) or SDPA")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from sparsequant.runtime import synthetic as syn
    from sparsequant.runtime.engine import DecodeEngine

    cfg = syn.synthetic_config(args.config, args.layers)
    model = syn.build_dense(cfg, "cuda", torch.float16)
    if args.fuse:
        from sparsequant.models.fused import fuse_projections

        fuse_projections(model, decode_attention=args.decode_attention)  # a sparse twin mirrors it
    if args.scheme != "dense":
        model, _ = syn.sparse_twin(model, args.scheme)
    eng = DecodeEngine(model, args.batch, args.max_len, cuda_graph=False, compile=args.compile)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len))
    tok = eng.prefill(ids).argmax(-1)
    for _ in range(3):
        tok = eng.decode(tok).argmax(-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = eng.decode(tok).argmax(-1)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list[float]] = {}
    for e in events:
        per_kernel.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    total = sum(sum(v) for v in per_kernel.values()) / args.steps
    rows = sorted(((sum(v) / args.steps, len(v) / args.steps, k) for k, v in per_kernel.items()), reverse=True)
    print(f"\n{args.config} x{args.layers} layers, {args.scheme}, batch {args.batch}{', compiled' if args.compile else ''}: "
          f"{len(events) / args.steps:.0f} kernels/step, {total:.0f} us GPU time/step (eager, summed)")
    print(f"{'us/step':>9} {'calls':>6}  kernel")
    for us, calls, name in rows[: args.top]:
        print(f"{us:9.1f} {calls:6.0f}  {name[:110]}")

    # the same step replayed from a CUDA graph
    g_eng = DecodeEngine(model, args.batch, args.max_len, cuda_graph=True, compile=args.compile)
    tok = g_eng.prefill(ids).argmax(-1)
    for _ in range(3):
        tok = g_eng.decode(tok).argmax(-1)
    torch.cuda.synchronize()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        tok = g_eng.decode(tok).argmax(-1)
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - t0) / n * 1e6
    print(f"graph replay step: {graph_us:.0f} us ({graph_us / args.layers:.0f} us per layer)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = f"{args.scheme.replace(':', '')}_b{args.batch}{'_compiled' if args.compile else ''}"
        path = os.path.join(args.out, f"profile_{tag}{'' if args.decode_attention else '_sdpa'}_L{args.max_len}.json")
        with open(path, "w") as f:
            json.dump({"config": args.config, "layers": args.layers, "scheme": args.scheme, "batch": args.batch, "compile": args.compile,
                       "kernels_per_step": len(events) / args.steps, "gpu_us_per_step": total,
                       "graph_step_us": graph_us,
                       "top": [{"us": us, "calls": c, "name": k} for us, c, k in rows[:60]]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
