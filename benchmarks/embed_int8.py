"""Int8 input embedding and int8 LM head (issue 7): accuracy on the default model, bytes of the
LLaMA-2-7B shape. CPU only.

    python benchmarks/embed_int8.py --threads 1 --out runs/embed_int8.json

1. Accuracy: SmolLM2-135M-Instruct (float32, the reference path) on the standard held-out windows
   (20 x 1024 tokens): dense, then the input embedding stored as int8 rows + one float16 scale per
   row (nn/embedding.py). The default model ties its LM head to the embedding, which an int8 table
   cannot serve (the head would lose its weight), so the int8 model is an untied copy: the head keeps
   the original float table, only the lookups go through int8. Then the LM head as int8 rows too
   (nn/int8_linear.py), and the int8 head alone on a fresh copy of the (tied) model: the head gets its
   own int8 table, the lookups keep the float one.
2. Bytes: a 1-layer LLaMA-2-7B-shaped model (real widths, random fp16 weights on the CPU) and its
   2:4 W4A16 g128 sparse twin with and without the int8 embedding, counted by
   ``runtime.synthetic.weight_bytes_on``; the 32-layer model is the 1-layer one with its layer
   bytes times 32 (every layer has the same shapes, and packed bytes depend only on shapes). On the
   CPU the linears' bytes are the checkpoint layout; on a GPU they are the kernel layout (0.1955x of
   fp16 on an H100, BENCHMARKS.md run 16), so the ratio is also given with that figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparsequant.data.windows import evaluation_windows, fingerprint  # noqa: E402
from sparsequant.eval.perplexity import perplexity  # noqa: E402
from sparsequant.models.loading import load_model  # noqa: E402
from sparsequant.nn.embedding import Int8Embedding, quantize_input_embedding  # noqa: E402
from sparsequant.nn.int8_linear import Int8Linear, quantize_lm_head  # noqa: E402
from sparsequant.nn.linear import SparseQuantLinear  # noqa: E402
from sparsequant.runtime import synthetic as syn  # noqa: E402

H100_LINEAR_RATIO = 0.1955  # kernel-layout bytes / fp16 bytes of a prepared 2:4 W4A16 g128 linear (run 16)


@torch.no_grad()
def accuracy(n_windows: int, seq_len: int) -> dict:
    model, tok = load_model(None, dtype=torch.float32, quiet=True)
    windows = evaluation_windows(tok, seq_len, n_windows)
    out = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "windows": list(windows.shape),
           "windows_sha": fingerprint(windows), "tied": bool(model.config.tie_word_embeddings)}
    t0 = time.perf_counter()
    out["ppl_dense"] = perplexity(model, windows, progress=False)
    out["seconds_dense"] = time.perf_counter() - t0
    # untie: the head gets its own copy of the float table, the lookups go through int8
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    table = model.get_input_embeddings().weight.detach().clone()
    q = quantize_input_embedding(model, torch.float32)
    assert isinstance(q, Int8Embedding) and torch.equal(model.get_output_embeddings().weight, table)
    err = (table.double() - q.dequantize().double()).abs()
    out["embedding"] = {"shape": list(table.shape), "scale_dtype": str(q.scales.dtype),
                        "max_abs_err": float(err.max()),
                        "rel_fro_err": float((table.double() - q.dequantize().double()).norm() / table.double().norm()),
                        "max_err_over_half_scale": float((err / (q.scales.double()[:, None] / 2)).max())}
    t0 = time.perf_counter()
    out["ppl_int8_embedding"] = perplexity(model, windows, progress=False)
    out["seconds_int8"] = time.perf_counter() - t0
    quantize_lm_head(model, torch.float32)
    out["ppl_int8_embedding_and_head"] = perplexity(model, windows, progress=False)
    fresh, _ = load_model(None, dtype=torch.float32, quiet=True)
    h = quantize_lm_head(fresh, torch.float32)
    out["head"] = {"shape": [h.out_features, h.in_features], "scale_dtype": str(h.scales.dtype),
                   "tied_source": out["tied"]}
    out["ppl_int8_head"] = perplexity(fresh, windows, progress=False)
    return out


def _parts(model) -> dict:
    """Bytes (CPU) by part: input embedding, LM head, compressed/dense decoder linears, the rest."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    lin = [m for m in model.modules() if isinstance(m, SparseQuantLinear)]
    e = emb.nbytes() if isinstance(emb, Int8Embedding) else emb.weight.numel() * emb.weight.element_size()
    h = head.nbytes() if isinstance(head, Int8Linear) else head.weight.numel() * head.weight.element_size()
    if lin:
        l_bytes = sum(m.packed.nbytes() + (0 if m.bias is None else m.bias.numel() * m.bias.element_size()) for m in lin)
    else:
        l_bytes = sum(w.weight.numel() * w.weight.element_size() for w in syn.decoder_linears(model).values())
    total = syn.weight_bytes_on(model, "cpu")
    return {"embedding": e, "lm_head": h, "linears": l_bytes, "other": total - e - h - l_bytes, "total": total}


@torch.no_grad()
def memory(layers_full: int = 32) -> dict:
    cfg = syn.synthetic_config("llama-2-7b", layers=1)
    dense = syn.build_dense(cfg, device="cpu", dtype=torch.float16, seed=0)
    plain, _ = syn.sparse_twin(dense, "2:4-w4a16")
    small, _ = syn.sparse_twin(dense, "2:4-w4a16", embed_int8=True)
    smaller, _ = syn.sparse_twin(dense, "2:4-w4a16", embed_int8=True, head_int8=True)
    rows = {}
    for name, m in (("dense fp16", dense), ("2:4 W4A16", plain), ("2:4 W4A16 + int8 embedding", small),
                    ("2:4 W4A16 + int8 embedding + int8 head", smaller)):
        p = _parts(m)
        # 32 layers: the layer's linears (and its norms, inside "other" minus the final norm) times 32
        final_norm = m.model.norm.weight.numel() * m.model.norm.weight.element_size()
        rotary = sum(b.numel() * b.element_size() for b in m.model.rotary_emb.buffers())
        per_layer_other = p["other"] - final_norm - rotary
        scaled = {"embedding": p["embedding"], "lm_head": p["lm_head"], "linears": p["linears"] * layers_full,
                  "other": per_layer_other * layers_full + final_norm + rotary}
        scaled["total"] = sum(scaled.values())
        rows[name] = {"one_layer": p, "scaled": scaled}
    d = rows["dense fp16"]["scaled"]
    for name, r in rows.items():
        s = r["scaled"]
        r["model_ratio_vs_fp16"] = s["total"] / d["total"]
        r["linear_ratio_vs_fp16"] = s["linears"] / d["linears"]
        # the same with the linears at the H100 kernel layout's measured ratio
        if name != "dense fp16":
            r["model_ratio_with_h100_linears"] = (s["total"] - s["linears"] + H100_LINEAR_RATIO * d["linears"]) / d["total"]
    params = sum(p.numel() for p in dense.parameters())
    return {"config": "llama-2-7b", "layers_built": 1, "layers_scaled_to": layers_full,
            "one_layer_params": params, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": "cpu"}
    if not args.skip_memory:
        res["memory"] = memory()
        for name, r in res["memory"]["rows"].items():
            extra = f", {r['model_ratio_with_h100_linears']:.4f}x with the H100 kernel layout" \
                if "model_ratio_with_h100_linears" in r else ""
            print(f"{name:40s} model {r['model_ratio_vs_fp16']:.4f}x fp16 (linears {r['linear_ratio_vs_fp16']:.4f}x)"
                  f"{extra}; {r['scaled']['total'] / 1e9:.3f} GB", flush=True)
    if not args.skip_accuracy:
        res["accuracy"] = a = accuracy(args.windows, args.seq_len)
        print(f"perplexity {a['windows']} windows: dense {a['ppl_dense']:.4f}, int8 input embedding "
              f"{a['ppl_int8_embedding']:.4f}, int8 embedding + head {a['ppl_int8_embedding_and_head']:.4f}, "
              f"int8 head alone {a['ppl_int8_head']:.4f}; embedding max |err| {a['embedding']['max_abs_err']:.3g}, "
              f"relative {a['embedding']['rel_fro_err']:.3g}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
