"""Check and time the sparsequant GPU kernels against baselines measured in the same run.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--quick] [--sweep] [--out DIR]

1. Correctness: every kernel vs the float32 reference (kernels/reference.py) at the benchmark
   shapes, outputs poisoned with NaN first, fresh random inputs.
2. Timing: median over replays of a CUDA graph holding R calls that rotate over several weight
   copies (so L2 holds none of them), divided by R; plus the eager call time (host loop).
   Baselines: cuBLAS fp16 F.linear, torch._weight_int4pack_mm (dense int4 g128, bf16),
   torch._scaled_mm (dense fp8, row-wise scales), torch._int_mm (dense int8).
3. --sweep: try decode / prefill tile configurations per shape and report the best.
Prints a short table last and writes JSON to $OUT (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparsequant import kernels
from sparsequant.kernels import Nm24State, reference
from sparsequant.kernels.cslt import CsltW8A8, quantize_per_token, weight_from_dense
from sparsequant.kernels.layout import build_layout
from sparsequant.kernels.testing import random_packed24
from sparsequant.kernels.triton_decode import DecodeWorkspace, decode_linear, pick_decode_config
from sparsequant.kernels.triton_expand import expand_dense_ptx
from sparsequant.kernels.triton_prefill import expand_dense_t, expand_linear, pick_prefill_config, prefill_linear

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # out x in
L2_BYTES = 50 * 2**20


def log(*a):
    print(*a, flush=True)


def rel_err(y, ref):
    y = y.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def copies_for(nbytes: int) -> int:
    return max(2, min(32, math.ceil(3 * L2_BYTES / max(nbytes, 1))))


def time_graph(fns, reps_per_graph: int | None = None, replays: int = 20) -> float:
    """Median microseconds per call of ``fns`` (rotated) replayed inside one CUDA graph."""
    reps = reps_per_graph or max(len(fns), 20)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / reps)
    del g
    return statistics.median(times)


def time_eager(fns, iters: int = 50) -> float:
    """Median microseconds per call from the host: launch overhead included."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(iters):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e6 / iters)
    return statistics.median(out)


def clone_layout(lay):
    import copy

    c = copy.copy(lay)
    c.meta, c.vals, c.scales = lay.meta.clone(), lay.vals.clone(), lay.scales.clone()
    c.zeros = None if lay.zeros is None else lay.zeros.clone()
    return c


def int4pack_baseline(n, k, dev):
    """Dense int4 g128 through torch._weight_int4pack_mm (tinygemm), or None if unavailable."""
    try:
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        packed_u8 = ((w[:, 0::2] << 4) | w[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.randn(k // 128, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, wp, 128, sz)
        return wp, sz
    except Exception as exc:  # noqa: BLE001 - report and go on
        log(f"  int4pack baseline unavailable: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def check_correctness(dev, results, quick):
    log("== correctness vs float32 reference (outputs poisoned with NaN) ==")
    cases = []
    for (n, k) in SHAPES[: 2 if quick else None]:
        cases.append((n, k, 4, 128, True, torch.float16))
    cases += [(4096, 4096, 8, None, True, torch.float16), (4096, 4096, 4, 64, False, torch.bfloat16),
              (11008, 4096, 8, 32, False, torch.bfloat16), (4104, 4136, 4, 128, True, torch.float16)]
    ok = True
    for (n, k, bits, g, sym, dt) in cases:
        pk = random_packed24(n, k, bits, g, sym, device=dev, seed=n + k + bits)
        lay = build_layout(pk, dev)
        w = reference.dequantize_nm24(pk)
        for m in (1, 3, 16, 127, 2048):
            x = torch.randn(m, k, device=dev).to(dt)
            ref = x.float() @ w.t()
            outs = {}
            if m <= 16:
                for asm in ([True, False] if dt == torch.float16 else [False]):
                    y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
                    decode_linear(x, lay, use_asm=asm, out=y)
                    outs[f"decode{'-ptx' if asm else '-triton'}"] = rel_err(y, ref)
            y = torch.full((m, n), float("nan"), dtype=dt, device=dev)
            prefill_linear(x, lay, out=y)
            outs["prefill"] = rel_err(y, ref)
            tol = 2e-3 if dt == torch.float16 else 1e-2
            for name, e in outs.items():
                good = e < tol
                ok &= good
                results["correctness"].append(dict(kernel=name, n=n, k=k, bits=bits, group=g, sym=sym,
                                                   dtype=str(dt), m=m, rel_err=e, ok=good))
            log(f"  {n}x{k} int{bits} g{g} {'sym' if sym else 'asym'} {str(dt)[6:]} m={m}: "
                + " ".join(f"{a}={b:.2e}" for a, b in outs.items()))
    return ok


def check_w8a8(dev, results, quick):
    """W8A8 through cuSPARSELt vs the float64 reference of the quantized product, every usable mode."""
    from sparsequant.kernels import cslt, cusparselt

    log("== correctness W8A8 (cuSPARSELt) vs float64 reference of the quantized product ==")
    lib = cusparselt.library()
    results["cusparselt"] = dict(path=getattr(lib, "path", None), version=getattr(lib, "version", None),
                                 load_error=cusparselt.load_error())
    log(f"  cuSPARSELt: {results['cusparselt']}")
    ok = True
    for kind in ("int8", "fp8"):
        for (n, k) in ([(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 14336)]):
            pk = random_packed24(n, k, 8, None, True, device=dev, seed=7)
            wq, ws = weight_from_dense(reference.dequantize_nm24(pk), kind)
            all_modes = ["fused", "alpha_w", "raw"] if kind == "fp8" else ["alpha_w", "raw"]
            # every mode (and torch's path) on the small shape in bf16; the default mode elsewhere
            cases = [(torch.bfloat16, md) for md in all_modes + ["torch"]] + [(torch.float16, None)]
            if n > 4096 or k > 4096:
                cases = [(torch.bfloat16, None)]
            for out_dtype, mode in cases:
                try:
                    op = CsltW8A8(wq, ws, kind, out_dtype, backend="torch" if mode == "torch" else "auto",
                                  modes=None if mode in (None, "torch") else (mode,))
                except Exception as exc:  # noqa: BLE001 - a mode cuSPARSELt refuses here
                    log(f"  cslt {kind} {mode} {str(out_dtype)[6:]}: unavailable ({str(exc)[:160]})")
                    continue
                for m in (16, 127, 2048):
                    x = torch.randn(m, k, device=dev, dtype=out_dtype) * 3
                    rq, rs = reference.quantize_per_token(x, kind)
                    xq, xs = op.quantize(x)
                    q_same = (xq[:m].float() == rq.float()).float().mean().item()
                    ref = (rq.double() @ wq.double().t()) * rs.double()[:, None] * ws.double()[None, :]
                    torch.full((1 << 26,), float("nan"), device=dev)  # poison the allocator's free blocks
                    e = rel_err(op(x), ref)
                    good = e < 1e-2 and q_same > 0.999
                    ok &= good
                    results["correctness"].append(dict(kernel=f"cslt-{kind}-{op.backend}-{op.mode}", n=n, k=k,
                                                       m=m, dtype=str(out_dtype), rel_err=e, quant_match=q_same,
                                                       ok=good))
                    log(f"  cslt {kind} {op.backend}/{op.mode} {str(out_dtype)[6:]} {n}x{k} m={m}: "
                        f"rel_err={e:.2e} act-quant match={q_same:.5f}{'' if good else '  FAIL'}")
                del op
    results["cslt_probe_errors"] = {str(key): v for key, v in cslt.PROBE_ERRORS.items()}
    log(f"  refused modes: {results['cslt_probe_errors']}")
    return ok


def bench_decode_prefill(dev, results, quick, sweep):
    log("== timing W4A16 2:4 (int4 g128) vs baselines ==")
    token_counts = [1, 16, 128, 2048] if quick else [1, 2, 4, 8, 16, 128, 512, 2048]
    if os.environ.get("BENCH_TOKENS"):
        token_counts = [int(t) for t in os.environ["BENCH_TOKENS"].split(",")]
    for (n, k) in SHAPES[: 2 if quick else None]:
        pk = random_packed24(n, k, 4, 128, True, device=dev, seed=1)
        lay0 = build_layout(pk, dev)
        wbytes = lay0.nbytes()
        lays = [lay0] + [clone_layout(lay0) for _ in range(copies_for(wbytes) - 1)]
        wss = [DecodeWorkspace(n, dev) for _ in lays]
        w16 = reference.dequantize_nm24(pk).half()
        dense = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2) - 1)]
        i4 = int4pack_baseline(n, k, dev)
        i4s = None if i4 is None else [i4] + [(i4[0].clone(), i4[1].clone()) for _ in range(copies_for(n * k // 2) - 1)]
        row = dict(n=n, k=k, sparse_bytes=wbytes, fp16_bytes=n * k * 2)
        for m in token_counts:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.bfloat16()
            r = dict(n=n, k=k, m=m)
            r["cublas_fp16_us"] = time_graph([lambda w=w: F.linear(x, w) for w in dense])
            states = [Nm24State.from_layout(l, torch.float16) for l in lays]
            r["linear_us"] = time_graph([lambda st=st: kernels.linear(x, st) for st in states])
            r["linear_eager_us"] = time_eager([lambda st=st: kernels.linear(x, st) for st in states])
            if i4s is not None and m <= 128:
                r["int4pack_us"] = time_graph([lambda p=p: torch._weight_int4pack_mm(xb, p[0], 128, p[1]) for p in i4s])
            if m <= 16:
                r["decode_ptx_us"] = time_graph([lambda l=l, ws=ws: decode_linear(x, l, ws) for l, ws in zip(lays, wss)])
                r["decode_triton_us"] = time_graph(
                    [lambda l=l, ws=ws: decode_linear(x, l, ws, use_asm=False) for l, ws in zip(lays, wss)])
                r["decode_eager_us"] = time_eager([lambda l=l, ws=ws: decode_linear(x, l, ws) for l, ws in zip(lays, wss)])
            if m >= 2:
                r["prefill_us"] = time_graph([lambda l=l: prefill_linear(x, l) for l in lays[:4]])
            if m >= 16:
                r["expand_cublas_us"] = time_graph([lambda l=l: expand_linear(x, l) for l in lays[:4]])
                if m == 16:
                    wt = torch.empty(k, n, dtype=torch.float16, device=dev)
                    wn = torch.empty(n, k, dtype=torch.float16, device=dev)
                    r["expand_portable_only_us"] = time_graph(
                        [lambda l=l: expand_dense_t(l, torch.float16, wt) for l in lays[:4]])
                    r["expand_ptx_only_us"] = time_graph([lambda l=l: expand_dense_ptx(l, wn) for l in lays[:4]])
            if sweep and (n, k) in sweep and m in (1, 4):
                r["decode_sweep"] = sweep_decode(x, lays, wss, n, k)
            if sweep and (n, k) in sweep and m in (16, 2048) and os.environ.get("SWEEP_PREFILL"):
                r["prefill_sweep"] = sweep_prefill(x, lays, n, k)
            results["timing"].append(r)
            log("  " + json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in r.items()
                                   if not a.endswith("sweep")}))
        del lays, dense, i4s
        torch.cuda.empty_cache()


def sweep_decode(x, lays, wss, n, k):
    m = x.shape[0]
    base = pick_decode_config(m, n, k)
    out = []
    for bn in (64, 128, 256):
        for bu in (1, 2, 4, 8):
            for sf in (0.5, 1, 2):
                for nw in (4, 8):
                    if nw == 8 and bn * bu < 512:
                        continue
                    cfg = dict(base, BLOCK_N=bn, BLOCK_U=bu, num_warps=nw)
                    cfg["SPLIT"] = max(1, int(base["SPLIT"] * sf * 128 / bn))
                    if -(-k // 32) < cfg["SPLIT"] * bu:
                        continue
                    try:
                        t = time_graph([lambda l=l, ws=ws: decode_linear(x, l, ws, config=cfg) for l, ws in zip(lays, wss)],
                                       replays=10)
                    except Exception as exc:  # noqa: BLE001
                        log(f"    decode cfg {cfg} failed: {type(exc).__name__} {str(exc)[:100]}")
                        continue
                    out.append(dict(cfg=cfg, us=t))
    out.sort(key=lambda d: d["us"])
    log(f"    decode sweep m={m} {n}x{k}: best {out[0] if out else None}")
    return out[:5]


def sweep_prefill(x, lays, n, k):
    m = x.shape[0]
    cands = []
    for bm in (16, 32, 64, 128, 256):
        if bm > max(16, 2 * m) or (m >= 1024 and bm < 128):
            continue
        for bn in (64, 128, 256):
            for bu in (1, 2, 4):
                for nw in (4, 8):
                    if (bm * bn >= 128 * 256 and nw == 4) or (bm * bn * bu > 128 * 128 * 2):
                        continue
                    cands.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_U=bu, GROUP_M=8, num_warps=nw, num_stages=3))
    out = []
    for cfg in cands:
        try:
            t = time_graph([lambda l=l: prefill_linear(x, l, config=cfg) for l in lays[:2]], replays=5,
                           reps_per_graph=4 if m >= 512 else 20)
        except Exception as exc:  # noqa: BLE001
            log(f"    prefill cfg {cfg} failed: {type(exc).__name__} {str(exc)[:100]}")
            continue
        out.append(dict(cfg=cfg, us=t))
    out.sort(key=lambda d: d["us"])
    log(f"    prefill sweep m={m} {n}x{k}: best {out[0] if out else None}")
    return out[:5]


def _dense_fp8_op(x, wt, ws):
    qa, sa = quantize_per_token(x, "fp8")
    return torch._scaled_mm(qa, wt, sa[:, None], ws[None, :], out_dtype=torch.bfloat16)


def bench_w8a8(dev, results, quick, save=None):
    """Whole W8A8 op vs dense fp8 / int8 / fp16 at 16-2048 tokens, in CUDA graphs, plus eager calls.

    Token counts in the order given (BENCH_W8_TOKENS), each over all shapes, saving after each row,
    so a run cut short still has the first token count on every shape.
    """
    log("== timing W8A8 2:4 (cuSPARSELt) vs dense int8 / fp8 / fp16 ==")
    token_counts = [16, 2048] if quick else [16, 128, 512, 2048]
    if os.environ.get("BENCH_W8_TOKENS"):
        token_counts = [int(t) for t in os.environ["BENCH_W8_TOKENS"].split(",")]
    setups = {}
    for (n, k) in SHAPES[: 2 if quick else None]:
        w = reference.dequantize_nm24(random_packed24(n, k, 8, None, True, device=dev, seed=3))
        w16 = w.half()
        dense16 = [w16] + [w16.clone() for _ in range(copies_for(n * k * 2) - 1)]
        ops, dense8 = {}, {}
        for kind in ("int8", "fp8"):
            wq, ws = weight_from_dense(w, kind)
            op0 = CsltW8A8(wq, ws, kind, torch.bfloat16)
            ops[kind] = [op0] + [CsltW8A8(wq, ws, kind, torch.bfloat16) for _ in range(copies_for(n * k // 2) - 1)]
            wt = wq.t()  # column-major [K, N], the layout _int_mm / _scaled_mm want
            dense8[kind] = [(wt, ws)] + [(wq.clone().t(), ws.clone()) for _ in range(copies_for(n * k) - 1)]
        wq, ws = weight_from_dense(w, "fp8")
        setups[(n, k)] = (dense16, ops, dense8, CsltW8A8(wq, ws, "fp8", torch.bfloat16, backend="torch"))
        del w, w16
    for m in token_counts:
        for (n, k), (dense16, ops, dense8, torch_fp8) in setups.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            x16 = x.half()
            r = dict(n=n, k=k, m=m)
            r["cublas_fp16_us"] = time_graph([lambda w=w: F.linear(x16, w) for w in dense16], reps_per_graph=20)
            for kind in ("int8", "fp8"):
                os_ = ops[kind]
                r[f"cslt_{kind}_mode"] = f"{os_[0].backend}/{os_[0].mode}"
                xq, xs = os_[0].quantize(x)
                for o in os_:  # plans + (cached) algorithm search, outside the graphs
                    o(x)
                r[f"cslt_{kind}_product_us"] = time_graph([lambda o=o: o.product(xq, xs) for o in os_], reps_per_graph=20)
                r[f"cslt_{kind}_mm_us"] = time_graph([lambda o=o: o.mm(xq, xs) for o in os_], reps_per_graph=20)
                r[f"cslt_{kind}_op_us"] = time_graph([lambda o=o: o(x) for o in os_], reps_per_graph=20)
                r[f"actquant_{kind}_us"] = time_graph([lambda: os_[0].quantize(x)], reps_per_graph=20)
                r[f"cslt_{kind}_eager_us"] = time_eager([lambda o=o: o(x) for o in os_], iters=50)
                if os_[0].backend == "lt":
                    plan = os_[0].sm._plans[xq.shape[0]]
                    yb = torch.empty(xq.shape[0], n, dtype=os_[0].mm_dtype, device=dev)
                    alpha = xs if os_[0].mode == "fused" else os_[0]._alpha_w
                    r[f"cslt_{kind}_lt_call_eager_us"] = time_eager([lambda: plan.run(xq, yb, alpha)], iters=200)
                qa, sa = quantize_per_token(x, kind)  # unpadded, for the dense baselines
                if kind == "int8":
                    try:  # _int_mm wants more than 16 rows
                        r["int_mm_us"] = time_graph([lambda d=d: torch._int_mm(qa, d[0]) for d in dense8[kind]],
                                                    reps_per_graph=20)
                        r["int_mm_scaled_us"] = time_graph(
                            [lambda d=d: (torch._int_mm(qa, d[0]).float() * sa[:, None] * d[1][None, :]).to(torch.bfloat16)
                             for d in dense8[kind]], reps_per_graph=20)
                    except Exception as exc:  # noqa: BLE001
                        log(f"  _int_mm m={m} failed: {str(exc)[:100]}")
                else:
                    try:
                        r["scaled_mm_fp8_us"] = time_graph(
                            [lambda d=d: torch._scaled_mm(qa, d[0], sa[:, None], d[1][None, :], out_dtype=torch.bfloat16)
                             for d in dense8[kind]], reps_per_graph=20)
                        # the dense op from bf16 x, quantized by the same kernel as ours
                        r["quant_scaled_mm_fp8_us"] = time_graph(
                            [lambda d=d: _dense_fp8_op(x, d[0], d[1]) for d in dense8[kind]], reps_per_graph=20)
                    except Exception as exc:  # noqa: BLE001
                        log(f"  _scaled_mm rowwise failed: {exc}")
            if m == 2048 or (m == 16 and (n, k) == SHAPES[0]):
                # the previous path (torch._cslt_sparse_mm, a plan per call) in the same run
                torch_fp8(x)
                if m == 2048:
                    r["torch_cslt_fp8_op_us"] = time_graph([lambda t=torch_fp8: t(x)], reps_per_graph=10)
                r["torch_cslt_fp8_eager_us"] = time_eager([lambda t=torch_fp8: t(x)], iters=20)
            r = {a: b for a, b in r.items() if b is not None}
            results["w8a8"].append(r)
            log("  " + json.dumps({a: (round(b, 2) if isinstance(b, float) else b) for a, b in r.items()}))
            if save is not None:
                save()
    del setups
    torch.cuda.empty_cache()


def geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def summary(results):
    lines = ["", "== summary (ratios = baseline time / our time, same run) =="]
    t = results["timing"]
    for m in sorted({r["m"] for r in t}):
        rows = [r for r in t if r["m"] == m]
        ours = [r["linear_us"] for r in rows]  # the path kernels.linear dispatches to
        fp16 = geomean([r["cublas_fp16_us"] / o for r, o in zip(rows, ours)])
        i4 = geomean([r["int4pack_us"] / o for r, o in zip(rows, ours) if "int4pack_us" in r])
        lines.append(f"W4A16 2:4 m={m:5d}: vs cuBLAS fp16 {fp16:5.2f}x   vs int4pack {i4:5.2f}x   "
                     + " ".join(f"{r['n']}x{r['k']}:{o:.1f}us/{r['cublas_fp16_us']:.1f}" for r, o in zip(rows, ours)))
    w8 = results["w8a8"]
    if w8:
        lines.append("W8A8 2:4 (geomean over shapes; op = quantize + cuSPARSELt [+ scale pass] from bf16 x; "
                     "mm = from quantized x, like _scaled_mm):")
    for m in sorted({r["m"] for r in w8}):
        rows = [r for r in w8 if r["m"] == m]

        def g(num, den):
            return geomean([r[num] / r[den] for r in rows if num in r and den in r])

        lines.append(
            f"  m={m:5d} fp8[{rows[0].get('cslt_fp8_mode')}]: op vs _scaled_mm {g('scaled_mm_fp8_us', 'cslt_fp8_op_us'):.2f}x"
            f" | mm vs _scaled_mm {g('scaled_mm_fp8_us', 'cslt_fp8_mm_us'):.2f}x"
            f" | op vs quant+_scaled_mm {g('quant_scaled_mm_fp8_us', 'cslt_fp8_op_us'):.2f}x"
            f" | op vs fp16 {g('cublas_fp16_us', 'cslt_fp8_op_us'):.2f}x"
            f" | product vs _scaled_mm {g('scaled_mm_fp8_us', 'cslt_fp8_product_us'):.2f}x")
        lines.append(
            f"  m={m:5d} int8[{rows[0].get('cslt_int8_mode')}]: op vs _int_mm {g('int_mm_us', 'cslt_int8_op_us'):.2f}x"
            f" | mm vs _int_mm {g('int_mm_us', 'cslt_int8_mm_us'):.2f}x"
            f" | op vs _int_mm+scale {g('int_mm_scaled_us', 'cslt_int8_op_us'):.2f}x"
            f" | op vs fp16 {g('cublas_fp16_us', 'cslt_int8_op_us'):.2f}x")
        eag = [r["cslt_fp8_eager_us"] for r in rows if "cslt_fp8_eager_us" in r]
        call = [r["cslt_fp8_lt_call_eager_us"] for r in rows if "cslt_fp8_lt_call_eager_us" in r]
        old = [r["torch_cslt_fp8_eager_us"] for r in rows if "torch_cslt_fp8_eager_us" in r]
        lines.append(f"  m={m:5d} eager fp8 op {min(eag, default=0):.0f}-{max(eag, default=0):.0f} us"
                     f" (cusparseLtMatmul call alone {min(call, default=0):.1f}-{max(call, default=0):.1f} us;"
                     f" torch._cslt path {min(old, default=0):.0f}-{max(old, default=0):.0f} us)")
    for r in w8:
        if r["m"] == 2048:
            lines.append(f"  2048 {r['n']}x{r['k']} us: fp8 op {r.get('cslt_fp8_op_us', 0):.1f} mm {r.get('cslt_fp8_mm_us', 0):.1f}"
                         f" product {r.get('cslt_fp8_product_us', 0):.1f} quant {r.get('actquant_fp8_us', 0):.1f}"
                         f" | _scaled_mm {r.get('scaled_mm_fp8_us', 0):.1f} | old torch path {r.get('torch_cslt_fp8_op_us', 0):.1f}"
                         f" | int8 op {r.get('cslt_int8_op_us', 0):.1f} _int_mm {r.get('int_mm_us', 0):.1f}"
                         f" | fp16 {r.get('cublas_fp16_us', 0):.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", default="", help="shapes to sweep tile configs on, e.g. 4096x4096,14336x4096")
    ap.add_argument("--skip", default="", help="comma list of: correct,w4,w8 (w4/w8 also skip their checks)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    import signal

    signal.signal(signal.SIGTERM, lambda *a: sys.exit("stopped by SIGTERM (time limit)"))
    p = torch.cuda.get_device_properties(dev)
    import triton

    results = dict(device=p.name, sms=p.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), correctness=[], timing=[], w8a8=[])
    log(f"device {p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    ok = True
    if "correct" not in skip:
        if "w4" not in skip:
            ok = check_correctness(dev, results, args.quick)
        if "w8" not in skip:
            ok = check_w8a8(dev, results, args.quick) and ok
        log(f"correctness: {'ALL OK' if ok else 'FAILURES'}")
    results["all_correct"] = ok
    path = os.path.join(args.out, "bench_kernels.json")
    try:
        if "w4" not in skip:
            sweep = {tuple(int(v) for v in t.split("x")) for t in args.sweep.split(",") if t}
            bench_decode_prefill(dev, results, args.quick, sweep)
        if "w8" not in skip:
            def save():
                with open(path, "w") as f:
                    json.dump(results, f, indent=1)

            bench_w8a8(dev, results, args.quick, save)
    finally:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    log(summary(results))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
