"""The LM head as int8 rows (kernels/triton_w8a16.py) against cuBLAS fp16 and dense int4 (tinygemm).

Shapes: the LM heads of LLaMA-2-7B (32000 x 4096) and LLaMA-3-8B (128256 x 4096); tokens 1, 8, 32, 128.
Each variant is checked against float32 on the same inputs first, then timed inside a CUDA graph
(median of many replays, two weight copies alternating so L2 holds neither). A config sweep at one
token prints what the defaults in ``triton_w8a16.CONFIGS`` were picked from.

    PYTHONPATH=src python benchmarks/bench_w8a16.py --out runs/w8a16
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import int4pack_baseline, log, rel_err, time_graph  # noqa: E402

from sparsequant.kernels.triton_w8a16 import config_for, w8a16_linear  # noqa: E402
from sparsequant.nn.embedding import quantize_rows  # noqa: E402

HEADS = [(32000, 4096), (128256, 4096)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    dev = "cuda"
    rows, sweep = [], []
    for n, k in HEADS:
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(2)]
        qs = [quantize_rows(w) for w in ws]
        i4 = [int4pack_baseline(n, k, dev) for _ in range(2)]
        for m in args.tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.bfloat16()
            codes, scales = qs[0]
            ref = x.float() @ (codes.float() * scales.float()[:, None]).T
            err = rel_err(w8a16_linear(x, codes, scales), ref)
            if not err < 2e-3:
                raise AssertionError(f"w8a16 {n}x{k} m={m}: relative error {err:.2e}")
            row = {"n": n, "k": k, "tokens": m, "rel_err": err, "config": config_for(m)}
            row["fp16_us"] = time_graph([lambda w=w: F.linear(x, w) for w in ws])
            row["w8a16_us"] = time_graph([lambda q=q: w8a16_linear(x, *q) for q in qs])
            if all(i is not None for i in i4):
                row["int4pack_us"] = time_graph([lambda i=i: torch._weight_int4pack_mm(xb, i[0], 128, i[1]) for i in i4])
            row["bytes_w8a16"] = codes.numel() + scales.numel() * scales.element_size()
            row["w8a16_tb_s"] = row["bytes_w8a16"] / row["w8a16_us"] / 1e6
            rows.append(row)
            log(f"{n}x{k} m={m:4d}: fp16 {row['fp16_us']:8.1f} us  w8a16 {row['w8a16_us']:8.1f} us "
                f"({row['fp16_us'] / row['w8a16_us']:.2f}x, {row['w8a16_tb_s']:.2f} TB/s)  int4pack "
                f"{row.get('int4pack_us', float('nan')):8.1f} us")
        if args.sweep:
            x = torch.randn(1, k, device=dev, dtype=torch.float16)
            for bn, bk, st, wp in itertools.product((32, 64, 128), (128, 256, 512), (3, 5), (4,)):
                cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=st, num_warps=wp)
                try:
                    us = time_graph([lambda q=q: w8a16_linear(x, *q, config=cfg) for q in qs], replays=10)
                except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory)
                    log(f"  sweep {cfg}: {type(exc).__name__}")
                    continue
                sweep.append({"n": n, "k": k, "tokens": 1, **cfg, "us": us})
            best = sorted((s for s in sweep if s["n"] == n), key=lambda s: s["us"])[:5]
            for s in best:
                log(f"  sweep {n}x{k} m=1 best: {s['us']:.1f} us BN={s['BLOCK_N']} BK={s['BLOCK_K']} "
                    f"stages={s['NUM_STAGES']} warps={s['num_warps']}")
        del ws, qs, i4
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: LM head, fp16 activations (int4pack: bf16), us per call in a CUDA graph")
    print(f"{'shape':>13} {'tok':>4} {'fp16':>8} {'int8 rows':>10} {'int4pack':>9} {'fp16/int8':>9}")
    for r in rows:
        print(f"{r['n']:>6}x{r['k']:<6} {r['tokens']:4d} {r['fp16_us']:8.1f} {r['w8a16_us']:10.1f} "
              f"{r.get('int4pack_us', float('nan')):9.1f} {r['fp16_us'] / r['w8a16_us']:8.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_w8a16.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "rows": rows, "sweep": sweep}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
