"""End-to-end speed: prefill and decode tokens/s of several engines on one model shape.

Engines (each a model run by the same ``DecodeEngine``, so the comparison is fair):
- ``sparse``: the compressed model (SparseQuantLinear; 2:4 W4A16 kernels on a GPU);
- ``sparse-fp8``: the same 2:4 weights as int8-per-channel codes run as W8A8 fp8 (cuSPARSELt);
  synthetic models only, it is mostly a prefill format;
- ``dense``: the uncompressed fp16 model;
- ``transformers``: the dense model through plain ``model.generate`` (its dynamic cache, eager).

An engine entry is a model or ``(model, DecodeEngine options)``, e.g. ``(dense, {"compile": False})``
to time the CUDA graph of the uncompiled step beside the compiled one. Rows of an engine whose
name ends in ``-compiled`` are compared with ``dense-compiled`` when the run has it, else ``dense``.

For every (prompt length P, batch B): prefill = one forward of B x P prompt tokens filling the
cache (captured in a CUDA graph on a GPU, like the decode step); decode = one step of B new tokens
(graph replay + greedy choice + feeding the token back, no host synchronisation inside the timed
loop). Timings use CUDA events on a GPU (wall clock on the CPU), after warm-up runs; each number is
the median of ``repeats`` measurements, a decode measurement being the mean over ``steps`` steps.
The transformers baseline times ``generate`` for 1 and ``hf_tokens`` new tokens: prefill from the
first, decode from the difference. Peak memory is ``torch.cuda.max_memory_allocated`` over the
measurement. Configurations whose KV cache and activations would not fit in the free GPU memory
are skipped and reported as such, as are those left when the time budget runs out.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import SparseQuantError
from ..nn.embedding import embedding_device_dtype, vocab_size_of
from .engine import DecodeEngine

#: Priority of (prompt length, batch): the configurations the acceptance criteria name come first,
#: so a time budget cuts the least informative ones.
PRIORITY = [(128, 1), (128, 32), (2048, 1), (128, 8), (2048, 8), (2048, 32), (128, 128), (2048, 128)]


@dataclass
class BenchSettings:
    batches: tuple[int, ...] = (1, 8, 32, 128)
    prompt_lens: tuple[int, ...] = (128, 2048)
    steps: int = 16  # decode steps per measurement
    repeats: int = 3
    warmup: int = 2
    hf_tokens: int = 8
    hf_max_batch: int = 128
    budget_s: float | None = None
    seed: int = 0


@dataclass
class BenchRow:
    engine: str
    batch: int
    prompt_len: int
    prefill_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_ms: float | None = None  # per step
    decode_tok_s: float | None = None
    peak_mem_gb: float | None = None
    note: str = ""


@dataclass
class BenchReport:
    rows: list[BenchRow] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}

    def save_json(self, path) -> None:
        from ..checkpoint.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        from ..eval.table import markdown_table

        base = {(r.engine, r.batch, r.prompt_len): r for r in self.rows if r.engine in ("dense", "dense-compiled")}
        rows = []
        for r in sorted(self.rows, key=lambda r: (r.prompt_len, r.batch, r.engine)):
            d = base.get((baseline_of(r.engine), r.batch, r.prompt_len)) or base.get(("dense", r.batch, r.prompt_len))
            sp = lambda a, b: None if a is None or b is None or not b else a / b  # noqa: E731
            rows.append([r.engine, r.batch, r.prompt_len, r.prefill_tok_s,
                         sp(r.prefill_tok_s, d.prefill_tok_s if d else None), r.decode_tok_s,
                         sp(r.decode_tok_s, d.decode_tok_s if d else None), r.decode_ms, r.peak_mem_gb, r.note])
        return markdown_table(["engine", "batch", "prompt", "prefill tok/s", "x dense", "decode tok/s", "x dense",
                               "ms/step", "peak GB", "note"], rows)

    def plot(self, path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
            for (eng, p) in sorted({(r.engine, r.prompt_len) for r in self.rows}):
                pts = sorted((r.batch, getattr(r, key)) for r in self.rows
                             if r.engine == eng and r.prompt_len == p and getattr(r, key))
                if pts:
                    ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"{eng}, prompt {p}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{title} ({self.meta.get('model', '')})")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def baseline_of(engine: str) -> str:
    """The dense engine a row is compared with: the compiled dense step for compiled engines."""
    return "dense-compiled" if engine.endswith("-compiled") else "dense"


# -- timing ---------------------------------------------------------------------------------
class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn) -> float:
        """Milliseconds of ``fn()`` (device time on a GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def estimate_bytes(config, batch: int, prompt_len: int, max_len: int, hf: bool = False) -> int:
    """KV cache plus a generous prefill activation estimate (float16), to skip what cannot fit."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // heads
    cache = 2 * c.num_hidden_layers * batch * max_len * kv * hd * 2
    tokens = batch * prompt_len
    acts = tokens * (8 * c.hidden_size + 4 * c.intermediate_size) * 2 + batch * prompt_len * max_len * 2 * 2
    return int(cache * (2 if hf else 1) + acts)


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# -- one measurement ------------------------------------------------------------------------
@torch.no_grad()
def measure_engine(model, name: str, batch: int, prompt_len: int, s: BenchSettings, timer: _Timer,
                   prefill_only: bool = False, options: dict | None = None) -> BenchRow:
    row = BenchRow(name, batch, prompt_len)
    vocab = vocab_size_of(model)
    g = torch.Generator().manual_seed(s.seed + batch * 7919 + prompt_len)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    steps_total = s.warmup + s.repeats * s.steps + 2
    eng = DecodeEngine(model, batch, prompt_len + steps_total, **(options or {}))
    graph = eng.use_graph
    logits = eng.prefill(ids, graph=graph)  # captures the prefill graph on CUDA (warm-up included)
    times = []
    for _ in range(s.repeats):
        times.append(timer(lambda: eng.prefill(ids, graph=graph)))
    row.prefill_ms = _median(times)
    row.prefill_tok_s = batch * prompt_len / (row.prefill_ms / 1e3)
    if not prefill_only:
        logits = eng.prefill(ids, graph=graph)
        tok = torch.argmax(logits, dim=-1)
        for _ in range(s.warmup):  # the first call captures the decode graph
            tok = torch.argmax(eng.decode(tok), dim=-1)

        def steps():
            nonlocal tok
            for _ in range(s.steps):
                tok = torch.argmax(eng.decode(tok), dim=-1)

        times = [timer(steps) / s.steps for _ in range(s.repeats)]
        row.decode_ms = _median(times)
        row.decode_tok_s = batch / (row.decode_ms / 1e3)
        row.note = "compiled" if eng.use_compile else ("graph" if graph else "eager")
    eng.release_graphs()
    del eng
    return row


@torch.no_grad()
def measure_transformers(model, batch: int, prompt_len: int, s: BenchSettings, timer: _Timer) -> BenchRow:
    row = BenchRow("transformers", batch, prompt_len)
    device = timer.device
    vocab = vocab_size_of(model)
    g = torch.Generator().manual_seed(s.seed + batch * 7919 + prompt_len)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n):
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)

    run(2)  # warm-up
    t1 = _median([timer(lambda: run(1)) for _ in range(max(1, s.repeats - 1))])
    tn = _median([timer(lambda: run(s.hf_tokens)) for _ in range(max(1, s.repeats - 1))])
    row.prefill_ms = t1
    row.prefill_tok_s = batch * prompt_len / (t1 / 1e3)
    row.decode_ms = max(tn - t1, 1e-6) / (s.hf_tokens - 1)
    row.decode_tok_s = batch / (row.decode_ms / 1e3)
    row.note = "plain generate, dynamic cache"
    return row


def _guarded(fn, name, batch, p, device, need: int | None) -> BenchRow:
    free = _free_bytes(device)
    if free is not None and need is not None and need > 0.9 * free:
        return BenchRow(name, batch, p, note=f"skipped: needs ~{need / 2**30:.0f} GB, {free / 2**30:.0f} GB free")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row = fn()
    except torch.OutOfMemoryError:
        row = BenchRow(name, batch, p, note="skipped: out of memory")
    except Exception as exc:  # one failing configuration must not lose the others' numbers
        import traceback

        traceback.print_exc()
        row = BenchRow(name, batch, p, note=f"error: {type(exc).__name__}: {str(exc)[:160]}")
    finally:
        _cleanup(device)
    if device.type == "cuda" and row.prefill_ms is not None:
        row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def run_bench(engines: dict, s: BenchSettings, meta: dict | None = None, log=print,
              prefill_only: frozenset = frozenset()) -> BenchReport:
    """Measure every engine (name -> model; the name ``transformers`` uses plain generate) at every
    (prompt length, batch) of ``s``, most informative configurations first."""
    if not engines:
        raise SparseQuantError("nothing to benchmark")
    engines = {n: (e if isinstance(e, tuple) else (e, {})) for n, e in engines.items()}
    first = next(iter(engines.values()))[0]
    device = embedding_device_dtype(first)[0]
    timer = _Timer(device)
    report = BenchReport(meta=dict(meta or {}))
    t_start = time.perf_counter()
    wanted = [(p, b) for p in s.prompt_lens for b in s.batches]
    order = [c for c in PRIORITY if c in wanted] + [c for c in wanted if c not in PRIORITY]
    config = first.config
    for p, b in order:
        for name, (model, options) in engines.items():
            if s.budget_s is not None and time.perf_counter() - t_start > s.budget_s:
                report.rows.append(BenchRow(name, b, p, note="skipped: time budget"))
                continue
            max_len = p + s.warmup + s.repeats * s.steps + 2
            limit = getattr(config, "max_position_embeddings", None)
            if limit is not None and max_len > limit:
                report.rows.append(BenchRow(name, b, p, note=f"skipped: longer than the model's {limit} positions"))
                continue
            if name == "transformers":
                if b > s.hf_max_batch:
                    report.rows.append(BenchRow(name, b, p, note="skipped: batch above --hf-max-batch"))
                    continue
                need = estimate_bytes(config, b, p, p + s.hf_tokens, hf=True)
                row = _guarded(lambda: measure_transformers(model, b, p, s, timer), name, b, p, device, need)
            else:
                need = estimate_bytes(config, b, p, max_len)
                row = _guarded(lambda: measure_engine(model, name, b, p, s, timer, prefill_only=name in prefill_only,
                                                      options=options), name, b, p, device, need)
            report.rows.append(row)
            log(f"  {name:13s} batch {b:4d} prompt {p:5d}: prefill {row.prefill_tok_s or 0:12,.0f} tok/s  "
                f"decode {row.decode_tok_s or 0:10,.1f} tok/s  {row.note}")
    report.meta["seconds"] = time.perf_counter() - t_start
    return report


def environment() -> dict:
    import platform

    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    return env
