"""Which cuSPARSELt W8A8 scale modes and which algorithm search work on this GPU, crash-proof.

    PYTHONPATH=src python benchmarks/cslt_probe.py [ENV_FILE]

Runs the probes (``cslt._probe``: each mode on a small random problem, checked against float64)
and one searched + one cached-configuration op in child processes, so a crash inside the library
shows as a refused mode instead of ending the run. Prints what it finds and writes shell exports
to ENV_FILE (``SPARSEQUANT_CSLT_MODES`` = the modes that did not crash, ``SPARSEQUANT_CSLT_SEARCH=0``
when the search crashed) for the tests and benchmarks run after it.
"""
from __future__ import annotations

import json
import subprocess
import sys

CASES = [(kind, dt, mode) for kind in ("int8", "fp8") for dt in ("bfloat16", "float16")
         for mode in (("fused", "alpha_w", "raw") if kind == "fp8" else ("alpha_w", "raw"))]

CHILD_PROBE = r"""
import json, sys, torch
from sparsequant.kernels import cslt, cusparselt
lib = cusparselt.library()
print("LIB", lib and lib.path, lib and lib.version, cusparselt.load_error(), flush=True)
for kind, dt, mode in json.loads(sys.argv[1]):
    print("TRY", kind, dt, mode, flush=True)
    ok = cslt._probe(lib, kind, getattr(torch, dt), mode, torch.device("cuda"))
    err = cslt.PROBE_ERRORS.get((kind, getattr(torch, dt), mode, "cuda"), "")
    print("RESULT", json.dumps([kind, dt, mode, ok, err]), flush=True)
"""

CHILD_SEARCH = r"""
import json, os, sys, time, torch
from sparsequant.kernels import cslt
from sparsequant.kernels.testing import random_packed24
from sparsequant.kernels import reference
for kind in ("int8", "fp8"):
    pk = random_packed24(1024, 2048, 8, None, True, device="cuda", seed=5)
    wq, ws = cslt.weight_from_dense(reference.dequantize_nm24(pk), kind)
    x = torch.randn(200, 2048, device="cuda", dtype=torch.bfloat16)
    op = cslt.CsltW8A8(wq, ws, kind, torch.bfloat16, backend="lt")
    print("SEARCH", kind, op.mode, flush=True)
    t = time.perf_counter(); y = op(x); torch.cuda.synchronize()
    cfg = op.sm._plans[208].config
    print("SEARCHED", kind, op.mode, cfg, f"{time.perf_counter() - t:.2f}s", flush=True)
    y2 = cslt.CsltW8A8(wq, ws, kind, torch.bfloat16, backend="lt")(x)
    rq, rs = reference.quantize_per_token(x, kind)
    ref = (rq.double() @ wq.double().t()) * rs.double()[:, None] * ws.double()[None, :]
    e1 = ((y.double() - ref).norm() / ref.norm()).item()
    e2 = ((y2.double() - ref).norm() / ref.norm()).item()
    print("CACHED", kind, f"rel err searched {e1:.2e} cached {e2:.2e}", flush=True)
print("SEARCH_OK", flush=True)
"""


def run_child(code: str, arg: str = "", env: dict | None = None) -> tuple[int, list[str]]:
    import os

    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, arg], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})
    lines = p.stdout.splitlines()
    for line in lines:
        print("  " + line)
    if p.returncode != 0:
        print(f"  child exited {p.returncode}; stderr tail:\n" + "\n".join(p.stderr.splitlines()[-8:]))
    return p.returncode, lines


def main() -> None:
    env_file = sys.argv[1] if len(sys.argv) > 1 else None
    todo = list(CASES)
    results, crashed = {}, []
    while todo:
        rc, lines = run_child(CHILD_PROBE, json.dumps(todo))
        done = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        for kind, dt, mode, ok, err in done:
            results[(kind, dt, mode)] = (ok, err)
        todo = todo[len(done):]
        if rc != 0 and todo:  # the case it was on crashed the process
            crashed.append(tuple(todo.pop(0)))
        elif rc != 0:
            break
    print("== probes ==")
    for key, (ok, err) in results.items():
        print(f"  {key}: {'OK' if ok else 'refused'} {err[:200]}")
    for key in crashed:
        print(f"  {key}: CRASHED the process")
    bad = {c[2] for c in crashed}
    modes = [m for m in ("fused", "alpha_w", "raw") if m not in bad]
    exports = [f"export SPARSEQUANT_CSLT_MODES={','.join(modes)}"]
    rc, lines = run_child(CHILD_SEARCH, env={"SPARSEQUANT_CSLT_MODES": ",".join(modes)})
    if rc != 0 or "SEARCH_OK" not in lines:
        print("== search crashed or failed: the tests and benchmarks run without it ==")
        exports.append("export SPARSEQUANT_CSLT_SEARCH=0")
    print("\n".join(exports))
    if env_file:
        with open(env_file, "w") as f:
            f.write("\n".join(exports) + "\n")


if __name__ == "__main__":
    main()
