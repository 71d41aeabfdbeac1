"""Check and time the skinny mma.sp kernel (1-8 tokens, K split over the warps of a block).

    PYTHONPATH=src python benchmarks/bench_skinny.py [--tokens 1,2,4,8] [--no-sweep] [--out DIR]

Same method as bench_kernels.py (whose helpers it uses): CUDA-graph replays rotating over enough
weight copies to exceed 3x L2, median per call.
1. Correctness first: the skinny kernel (planned configuration, and every configuration x K-slice
   count on two shapes) against the float64 reference, int4 g128 fp16 on the LLaMA and fused shapes
   at every token count, bf16 / int8 per channel / g32 on awkward shapes; NaN-poisoned outputs.
2. Timing, int4 g128 fp16: skinny (planned), the tiled mma.sp kernel (planned), the decode kernel
   over the mma.sp layout (1 token), ``kernels.linear`` as dispatched, cuBLAS fp16 and
   ``torch._weight_int4pack_mm`` (dense int4 g128, bf16), five LLaMA shapes + fused QKV / gate-up.
3. A sweep of (configuration, K slices) for every shape and token count (unless --no-sweep).
Prints a table last; JSON to $OUT (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import SHAPES, copies_for, int4pack_baseline, log, time_eager, time_graph  # noqa: E402
from bench_mma_sp import clone_mma  # noqa: E402

from sparsequant import kernels  # noqa: E402
from sparsequant.kernels import reference  # noqa: E402
from sparsequant.kernels.mma_sp import SKINNY_CONFIGS, SMEM_OPTIN, MmaSpState, skinny_plan, skinny_smem_bytes  # noqa: E402
from sparsequant.kernels.testing import random_packed24  # noqa: E402
from sparsequant.kernels.triton_decode_mma import DecodeMmaWorkspace, decode_mma_linear  # noqa: E402

FUSED = [(12288, 4096), (22016, 4096)]  # QKV, gate/up of LLaMA-2-7B, rows concatenated
AWKWARD = [  # n, k, bits, group, dtype
    (100, 1000, 4, None, torch.bfloat16), (257, 520, 8, None, torch.float16), (333, 4096, 4, 64, torch.float16),
    (130, 136, 8, 32, torch.bfloat16), (4096, 11008, 8, 128, torch.float16), (40, 264, 4, 32, torch.float16),
]


def _rel(y, ref) -> float:
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gmean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def variants(s: int, m: int, bits: int = 4):
    """Every (configuration, K slices) the kernel accepts for m tokens, K slices not above the super-tiles."""
    out = []
    for cfg, (warps, _) in enumerate(SKINNY_CONFIGS):
        if skinny_smem_bytes(bits, m, cfg) > SMEM_OPTIN:
            continue
        kw = 1
        while kw <= warps:
            if kw <= max(1, s):
                out.append((cfg, kw))
            kw *= 2
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,3,4,5,6,8")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    tokens = [int(v) for v in args.tokens.split(",")]
    shapes = SHAPES + FUSED
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "checks": [], "timing": [], "sweep": []}
    failed = []

    def dump():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "skinny.json"), "w") as f:
            json.dump(res, f, indent=1)

    def check(name, call, ref, dtype):
        out = torch.full(tuple(ref.shape), float("nan"), device=dev, dtype=dtype)
        try:
            y = call(out)
            e = _rel(y, ref) if y.data_ptr() == out.data_ptr() else float("inf")
        except Exception as exc:  # noqa: BLE001 - a refused launch is a failed check, not the end of the run
            log(f"  {name}: {type(exc).__name__}: {str(exc)[:200]}")
            e = float("inf")
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        res["checks"].append({"case": name, "rel": e, "ok": e < tol})
        if not e < tol:
            failed.append(name)
            log(f"FAIL {name}: rel {e:.3g} (tol {tol})")

    log("== correctness (fresh random inputs, float64 reference, NaN-poisoned outputs) ==")
    cases = [(n, k, 4, 128, torch.float16) for (n, k) in shapes] + AWKWARD
    for ci, (n, k, bits, group, dtype) in enumerate(cases):
        seed = int(torch.randint(0, 10**6, (1,)))
        pk = random_packed24(n, k, bits, group, device=dev, seed=seed)
        st_ = MmaSpState(pk, dev, dtype)
        wd = reference.dequantize_nm24(pk).double().t()
        for m in sorted(set(tokens) | {1, 3, 5, 8}):
            x = torch.randn(m, k, device=dev).to(dtype)
            ref = x.double() @ wd
            check(f"{n}x{k} int{bits} g{group} {str(dtype)[6:]} m={m} planned", lambda o: st_.skinny(x, out=o), ref, dtype)
            if ci in (0, len(shapes)) and m in (1, 5):  # every configuration on two shapes
                for cfg, kw in variants(st_.layout.s, m, bits):
                    check(f"{n}x{k} m={m} cfg={cfg} kw={kw}", lambda o: st_.skinny(x, out=o, cfg=cfg, kw=kw), ref, dtype)
        ys = [st_.skinny(x) for _ in range(3)]
        if not all(torch.equal(ys[0], y) for y in ys[1:]):
            failed.append(f"{n}x{k} not deterministic")
        del st_, wd
    res["correct"] = not failed
    log(f"correctness: {len(res['checks'])} checks, {'all passed' if not failed else f'{len(failed)} FAILED'}")
    dump()

    log("== timing (CUDA graphs, rotated weight copies, median us per call) ==")
    for (n, k) in shapes:
        pk = random_packed24(n, k, 4, 128, device=dev, seed=n + k)
        base = MmaSpState(pk, dev, torch.float16)
        nc = copies_for(base.layout.nbytes())
        states = [base] + [clone_mma(base) for _ in range(nc - 1)]
        wsm = [DecodeMmaWorkspace(n, dev) for _ in states]
        disp = [kernels.Nm24State.from_mma(s) for s in states]
        wd = torch.randn(n, k, device=dev, dtype=torch.float16)
        wds = [wd] + [wd.clone() for _ in range(copies_for(wd.numel() * 2) - 1)]
        i4 = int4pack_baseline(n, k, dev)
        i4s = None if i4 is None else [i4] + [(i4[0].clone(), i4[1].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        lay = base.layout
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            plan = skinny_plan(m, lay.rt, lay.s, lay.bits)
            row = {"shape": [n, k], "tokens": m, "plan": list(plan)}
            row["skinny"] = time_graph([lambda s=s: s.skinny(x) for s in states])
            row["tiled"] = time_graph([lambda s=s: s(x) for s in states])
            if m == 1:
                row["decode_mma"] = time_graph([lambda s=s, w=w: decode_mma_linear(x, s.layout, w) for s, w in zip(states, wsm)])
            row["dispatch"] = time_graph([lambda d=d: kernels.linear(x, d) for d in disp])
            row["fp16"] = time_graph([lambda w=w: F.linear(x, w) for w in wds])
            if i4s is not None:
                xb = x.to(torch.bfloat16)
                row["int4pack"] = time_graph([lambda p=p: torch._weight_int4pack_mm(xb, p[0], 128, p[1]) for p in i4s])
            if m == 1 and (n, k) == SHAPES[0]:
                row["eager_skinny"] = time_eager([lambda: states[0].skinny(x)])
            if not args.no_sweep:
                best = None
                for cfg, kw in variants(lay.s, m):
                    try:
                        t = time_graph([lambda s=s, c=cfg, w=kw: s.skinny(x, cfg=c, kw=w) for s in states])
                    except Exception as exc:  # noqa: BLE001 - e.g. a ring that does not fit: skip it
                        log(f"  sweep {n}x{k} m={m} cfg={cfg} kw={kw}: {type(exc).__name__}: {str(exc)[:100]}")
                        continue
                    res["sweep"].append({"shape": [n, k], "tokens": m, "cfg": cfg, "kw": kw, "us": t})
                    if best is None or t < best[0]:
                        best = (t, cfg, kw)
                if best:
                    row["sweep_best"] = {"us": best[0], "cfg": best[1], "kw": best[2]}
            res["timing"].append(row)
            sb = row.get("sweep_best", {})
            log(f"{n}x{k} m={m} plan {plan}: skinny {row['skinny']:.1f} us (best {sb.get('us', float('nan')):.1f} "
                f"cfg {sb.get('cfg')} kw {sb.get('kw')}), tiled {row['tiled']:.1f}, decode_mma "
                f"{row.get('decode_mma', float('nan')):.1f}, dispatch {row['dispatch']:.1f}, fp16 {row['fp16']:.1f}, "
                f"int4pack {row.get('int4pack', float('nan')):.1f} -> {row['fp16'] / row['skinny']:.2f}x fp16")
            dump()
        del states, disp, wds, i4s, wsm
        torch.cuda.empty_cache()

    log("\n| shape | tokens | skinny (plan) | sweep best | tiled | decode_mma | dispatched | cuBLAS fp16 | int4pack | skinny vs fp16 | vs dispatched |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["timing"]:
        sb = r.get("sweep_best", {})
        log(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['skinny']:.1f} {tuple(r['plan'])} | "
            f"{sb.get('us', float('nan')):.1f} ({sb.get('cfg')}, {sb.get('kw')}) | {r['tiled']:.1f} | "
            f"{r.get('decode_mma', float('nan')):.1f} | {r['dispatch']:.1f} | {r['fp16']:.1f} | "
            f"{r.get('int4pack', float('nan')):.1f} | {r['fp16'] / r['skinny']:.2f}x | {r['dispatch'] / r['skinny']:.2f}x |")
    five = [tuple(s) for s in SHAPES]
    log("\n| tokens | skinny vs fp16 | sweep best vs fp16 | dispatched vs fp16 | tiled vs fp16 | int4pack vs fp16 | skinny vs int4pack |")
    log("|---|---|---|---|---|---|---|")
    for m in tokens:
        rows = [r for r in res["timing"] if r["tokens"] == m and tuple(r["shape"]) in five]
        g = {key: gmean([r["fp16"] / r[key] for r in rows if r.get(key)]) for key in ("skinny", "dispatch", "tiled", "int4pack")}
        gb = gmean([r["fp16"] / r["sweep_best"]["us"] for r in rows if r.get("sweep_best")])
        gi = gmean([r["int4pack"] / r["skinny"] for r in rows if r.get("int4pack")])
        res.setdefault("geomean", {})[m] = {**g, "sweep_best": gb, "skinny_vs_int4pack": gi}
        log(f"| {m} | {g['skinny']:.2f}x | {gb:.2f}x | {g['dispatch']:.2f}x | {g['tiled']:.2f}x | {g['int4pack']:.2f}x | {gi:.2f}x |")
    log(f"correctness: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed[:10])}")
    dump()
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
