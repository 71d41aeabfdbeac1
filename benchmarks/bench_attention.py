"""One-query-token attention over a static KV cache: our split-KV Triton kernel against PyTorch's SDPA.

The batch-1 decode step spends a fixed ~9 us per LLaMA-2-7B layer in cuDNN's SDPA kernel for its one
query token (benchmarks/KERNEL_NOTES.md). This times, per layer, one attention call of each variant
inside a CUDA graph that holds one call per layer (each layer its own cache, so L2 does not serve the
next call), with the engine's mask (additive, fp16, ``[B, 1, 1, L]``, every slot valid). Each variant
is first checked against float64 SDPA on the same inputs.

    PYTHONPATH=src python benchmarks/bench_attention.py --lengths 256,512,2048 --batch 1,32

Variants: ``sdpa`` (PyTorch's choice), ``sdpa-cudnn``, ``sdpa-efficient`` (forced backends),
``triton`` (kernels/triton_attention.py, its defaults), ``triton-bBwW`` (B positions per step, W warps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def _sdpa(backend):
    def run(q, k, v, mask, scale):
        from torch.nn.attention import sdpa_kernel

        groups = q.shape[1] // k.shape[1]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    return run


def _triton(**kw):
    def run(q, k, v, mask, scale):
        from sparsequant.kernels.triton_attention import decode_attention

        return decode_attention(q, k, v, mask, scale, **kw).transpose(1, 2)
    return run


def variants() -> dict:
    from torch.nn.attention import SDPBackend

    out = {"sdpa": _sdpa(None), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
           "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION), "triton": _triton()}
    for block, warps in ((16, 1), (16, 2), (32, 4), (64, 4)):  # the tuning sweep behind the defaults
        out[f"triton-b{block}w{warps}"] = _triton(block=block, num_warps=warps)
    return out


def reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    return F.scaled_dot_product_attention(q.double(), kr, vr, attn_mask=mask.double(), scale=scale)


def time_graph(fn, inputs, reps: int) -> float:
    """Median microseconds per call over ``reps`` replays of a graph holding one call per input."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for x in inputs:
                fn(*x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x in inputs:
            fn(*x)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(inputs))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[144, 256, 512, 2048])
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=lambda s: [int(x) for x in s.split(",")], default=[32, 8],
                   help="32: LLaMA-2-7B; 8: LLaMA-3-8B (grouped-query)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=32, help="calls per graph, each on its own cache")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--variants", type=lambda s: s.split(","), default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    torch.manual_seed(0)
    chosen = {n: f for n, f in variants().items() if args.variants is None or n in args.variants}
    rows, dtype, d = [], torch.float16, args.head_dim
    scale = d ** -0.5
    for hkv in args.kv_heads:
        for b in args.batch:
            for length in args.lengths:
                inputs = []
                for _ in range(args.layers):
                    q = torch.randn(b, args.heads, 1, d, device="cuda", dtype=dtype)
                    k = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype)
                    v = torch.randn(b, hkv, length, d, device="cuda", dtype=dtype)
                    mask = torch.zeros(b, 1, 1, length, device="cuda", dtype=dtype)
                    inputs.append((q, k, v, mask, scale))
                ref = reference(*inputs[0])
                row = {"kv_heads": hkv, "batch": b, "length": length, "us": {}, "max_err": {}}
                for name, fn in chosen.items():
                    try:
                        out = fn(*inputs[0])
                        err = (out.double() - ref).abs().max().item()
                        row["max_err"][name] = err
                        if not err < 5e-3:
                            raise AssertionError(f"{name}: max error {err:.2e} against float64 SDPA")
                        row["us"][name] = time_graph(fn, inputs, args.reps)
                    except AssertionError:
                        raise
                    except Exception as exc:  # a backend that refuses the shape: say so, time the others
                        row["us"][name] = None
                        row["max_err"][name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                del inputs
                torch.cuda.empty_cache()
    names = list(chosen)
    print(f"\n{torch.cuda.get_device_name()}, one query token, {args.heads} heads x {d}, fp16, additive mask; "
          f"us per call (median of {args.reps} graph replays of {args.layers} calls on separate caches)")
    print(f"{'kv':>3} {'B':>3} {'L':>5} " + " ".join(f"{n:>14}" for n in names) + "   sdpa/triton")
    for r in rows:
        cells = " ".join(f"{r['us'][n]:14.2f}" if r["us"][n] is not None else f"{'-':>14}" for n in names)
        ratio = (r["us"].get("sdpa") or 0) / r["us"]["triton"] if r["us"].get("triton") else float("nan")
        print(f"{r['kv_heads']:3d} {r['batch']:3d} {r['length']:5d} {cells}   {ratio:10.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
