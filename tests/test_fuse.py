"""Fused q/k/v and gate/up projections (nn/fuse.py, models/fused.py) and the GQA attention without
copies (models/attention.py): exact against the separate linears and the stock forwards, on tiny
models of every family, eagerly, in the decode engine and under torch.compile."""
import dataclasses
import hashlib
import warnings

import pytest
import torch
from torch import nn

import sparsequant as sq
from sparsequant.checkpoint.packed import PackedWeight
from sparsequant.models.attention import sdpa_attention
from sparsequant.models.fused import FUSABLE, FusedAttention, FusedMLP, fuse_projections, is_fused
from sparsequant.nn.fuse import FusionRefused, concat_packed, fuse_linears
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.patterns import SparsitySpec
from sparsequant.quant import QuantSpec
from sparsequant.runtime import synthetic as syn
from sparsequant.runtime.engine import DecodeEngine, left_pad
from sparsequant.runtime.generate import generate
from sparsequant.solvers import LinearPlan, compress_weight

from conftest import FAMILIES, greedy_run, random_ids, tiny_model

S24 = SparsitySpec.parse("2:4")


def _packed(n, k, pattern="2:4", quant=QuantSpec(4, 32, True), seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    plan = LinearPlan(prune=None if pattern == "dense" else "magnitude", sparsity=SparsitySpec.parse(pattern), quant=quant)
    return PackedWeight.from_compressed(compress_weight(w, None, plan))


def _compressed(model, quant=QuantSpec(4, 32, True)):
    """Every decoder linear a SparseQuantLinear (2:4, reference path on the CPU)."""
    modules = dict(model.named_modules())
    for name, lin in syn.decoder_linears(model).items():
        plan = LinearPlan(prune="magnitude", sparsity=S24, quant=quant)
        pw = PackedWeight.from_compressed(compress_weight(lin.weight.detach().float(), None, plan))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, SparseQuantLinear(pw, bias=lin.bias, compute_dtype=torch.float32))
    return model


def _quiet_fuse(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fuse_projections(model, **kw)


# -- stacking packed weights ---------------------------------------------------------------
@pytest.mark.parametrize("pattern,quant", [
    ("2:4", QuantSpec(4, 32, True)), ("2:4", QuantSpec(4, 64, False)), ("2:4", QuantSpec(8, None, True)),
    ("2:4", None), ("dense", QuantSpec(4, 32, True)), ("dense", None), ("2:4+8/256", QuantSpec(4, 32, True)),
])
def test_concat_packed_is_the_row_stacked_weight(pattern, quant):
    parts = [_packed(n, 256, pattern, quant, seed=n) for n in (48, 16, 24)]  # unequal heights
    fused = concat_packed(parts)
    assert fused.shape == (88, 256) and fused.storage == parts[0].storage
    assert fused.nbytes() == sum(p.nbytes() for p in parts)  # memory accounting unchanged
    want = torch.cat([p.to_compressed().effective_weight() for p in parts])
    assert torch.equal(fused.to_compressed().effective_weight(), want)


def test_concat_packed_refuses_what_it_cannot_stack_exactly():
    a = _packed(32, 256)
    with pytest.raises(FusionRefused, match="formats differ"):
        concat_packed([a, _packed(32, 256, quant=QuantSpec(4, 64, True))])
    with pytest.raises(FusionRefused, match="input widths"):
        concat_packed([a, _packed(32, 128)])
    with pytest.raises(FusionRefused, match="bitmap storage"):
        concat_packed([_packed(32, 256, "4:8")] * 2)
    with pytest.raises(FusionRefused, match="hybrid storage"):
        concat_packed([_packed(32, 256, "hybrid:25%@16x128")] * 2)
    with pytest.raises(FusionRefused, match="not indexed by output row"):  # 3-bit rows of 100 codes: one flat stream
        concat_packed([_packed(8, 100, "dense", QuantSpec(3, 32, True))] * 2)
    with pytest.raises(FusionRefused, match="adapters"):
        concat_packed([dataclasses.replace(a, adapter={"rank": 2}), a])


def test_fuse_linears_is_exact_for_dense_and_sparse_linears_with_partial_biases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 256, generator=g)
    dense = [nn.Linear(256, n, bias=b) for n, b in ((64, True), (32, False), (32, True))]
    fused = fuse_linears(dense)
    assert torch.equal(fused(x), torch.cat([d(x) for d in dense], -1))
    sparse = [SparseQuantLinear(_packed(n, 256, seed=n), bias=None if n == 64 else torch.randn(n, generator=g))
              for n in (64, 32, 48)]
    fused = fuse_linears(sparse)
    assert isinstance(fused, SparseQuantLinear)
    torch.testing.assert_close(fused(x), torch.cat([s(x) for s in sparse], -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(FusionRefused, match="different kinds"):
        fuse_linears([dense[0], sparse[0]])


# -- whole models ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_equals_the_unfused_one(family):
    """Dense and compressed tiny models: same logits and greedy tokens (engine, left padding) fused."""
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 4)]
    ids, mask = left_pad(rows, 0)
    for compress in (False, True):
        model = tiny_model(family, seed=2)
        if compress:
            model = _compressed(model)
        want_t, want_l = greedy_run(DecodeEngine(model, 2, 32), ids, mask, 5)
        x = random_ids(2, 7, seed=4)
        with torch.no_grad():
            want = model(x).logits
        report = fuse_projections(model)
        with torch.no_grad():
            got = model(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got_t, got_l = greedy_run(DecodeEngine(model, 2, 32), ids, mask, 5)
        assert got_t == want_t
        for a, b in zip(got_l, want_l):
            assert float((a - b).abs().max()) < 1e-5 * max(1.0, float(b.abs().max()))
        if model.config.model_type in FUSABLE:
            assert len(report.fused) == 2 * model.config.num_hidden_layers and not report.unfused
            layer = model.model.layers[0]
            assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
            assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
            kind = SparseQuantLinear if compress else nn.Linear
            assert type(layer.self_attn.qkv_proj) is kind and type(layer.mlp.gate_up_proj) is kind
            assert fuse_projections(model).fused == []  # idempotent
        else:
            assert not report and "*" in report.unfused and not is_fused(model)


def test_groups_that_cannot_be_stacked_stay_separate_and_still_compute():
    model = _compressed(tiny_model("llama", seed=1))
    attn = model.model.layers[0].self_attn
    k = attn.k_proj
    attn.k_proj = nn.Linear(k.in_features, k.out_features, bias=False)  # a recipe kept k_proj dense
    x = random_ids(1, 6, seed=1)
    with torch.no_grad():
        want = model(x).logits
    with pytest.warns(UserWarning, match="1 projection groups left unfused"):
        report = fuse_projections(model)
    assert report.unfused == {"model.layers.0.self_attn": "the linears are of different kinds: Linear, SparseQuantLinear"}
    assert hasattr(attn, "q_proj") and not isinstance(attn, FusedAttention)
    assert isinstance(model.model.layers[0].mlp, FusedMLP) and len(report.fused) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)


def test_no_fusion_where_no_kernel_takes_the_fused_weight_but_the_parts_have_one(monkeypatch):
    """Kernel placement logic on the meta device with a stand-in kernel that refuses tall weights."""
    from sparsequant import kernels

    model = _compressed(tiny_model("llama", seed=1))  # q 64, k/v 32, gate/up 128 rows
    monkeypatch.setattr(kernels, "prepare", lambda packed, device, dtype, act_quant=None:
                        "state" if packed.shape[0] <= 128 else None)
    report = _quiet_fuse(model, device="meta", dtype=torch.float16)
    assert [p.rsplit(".", 1)[1] for p in report.fused] == ["qkv_proj", "qkv_proj"]  # 128 rows: taken
    assert all("no meta kernel takes the fused 256x64 weight" in why for why in report.unfused.values())
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj._kernel_state == "state" and mlp.up_proj._kernel_state == "state"
    assert model.model.layers[0].self_attn.qkv_proj._kernel_state == "state"


def test_load_fuses_by_default_without_touching_the_checkpoint(tmp_path):
    from sparsequant.recipe import CalibrationConfig, QuantConfig, Recipe

    model = tiny_model("qwen2", seed=3)  # q/k/v biases
    recipe = Recipe(method="magnitude", pattern="2:4", quant=QuantConfig(bits=4, group_size=32),
                    calibration=CalibrationConfig(samples=2, seq_len=16))
    sq.save(sq.compress(model, recipe, calibration=random_ids(2, 16), progress=False), tmp_path / "ck")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "ck").iterdir() if p.is_file()}
    fused, _ = sq.load(tmp_path / "ck")
    plain, _ = sq.load(tmp_path / "ck", fuse=False)
    assert is_fused(fused) and not is_fused(plain)
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "ck").iterdir()
                      if p.is_file()}
    assert syn.weight_bytes_on(fused, "cpu") == syn.weight_bytes_on(plain, "cpu")
    x = random_ids(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
    prompts = [[1, 5, 9, 200, 3], [7, 8]]
    assert (generate(fused, prompts, max_new_tokens=12, eos_token_id=[]).tokens
            == generate(plain, prompts, max_new_tokens=12, eos_token_id=[]).tokens)
    twin = syn.dense_twin(fused)  # the dense baseline mirrors the fusion
    assert is_fused(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, plain(x).logits, rtol=1e-4, atol=1e-4)


# -- grouped-query attention without repeat_kv ------------------------------------------------
class _Heads(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,b,length", [(4, 3, 37), (2, 1, 16), (1, 2, 9)])
def test_sdpa_attention_without_repeat_equals_a_float64_reference(dtype, groups, b, length):
    g = torch.Generator().manual_seed(groups * 100 + length)
    hkv, d = 2, 24
    q = torch.randn(b, hkv * groups, 1, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    allowed = torch.rand(b, 1, 1, length, generator=g) < 0.7
    allowed[..., -1] = True
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    out, weights = sdpa_attention(_Heads(groups), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (b, 1, hkv * groups, d) and out.dtype == dtype
    kr = k.double().repeat_interleave(groups, 1)
    vr = v.double().repeat_interleave(groups, 1)
    p = torch.softmax((q.double() @ kr.transpose(-1, -2)) * 0.3 + mask.double(), -1)
    want = (p @ vr).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_fused_attention_can_keep_the_stock_sdpa_function(monkeypatch):
    """gqa_rows False (the default) / True (bench_e2e --gqa-compare): the fused forward calls
    transformers' SDPA / models/attention.sdpa_attention; same tokens."""
    import sparsequant.models.fused as fused_mod

    calls = []
    monkeypatch.setattr(fused_mod, "sdpa_attention", lambda *a, **k: calls.append(1) or sdpa_attention(*a, **k))
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (6, 2)]
    ids, mask = left_pad(rows, 0)
    runs = {}
    for rows_path in (True, False):
        model = tiny_model("llama", seed=6)
        fuse_projections(model, gqa_rows=rows_path)
        assert all(m.gqa_rows is rows_path for m in model.modules() if isinstance(m, FusedAttention))
        calls.clear()
        runs[rows_path] = greedy_run(DecodeEngine(model, 2, 32), ids, mask, 4)
        assert bool(calls) is rows_path
        # the twins mirror the choice
        assert all(m.gqa_rows is rows_path for m in syn.dense_twin(_compressed(model)).modules()
                   if isinstance(m, FusedAttention))
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        assert float((a - b).abs().max()) < 1e-5 * max(1.0, float(b.abs().max()))


def test_compiled_fused_gqa_engine_equals_the_stock_eager_engine():
    """torch.compile (fullgraph, one graph) of a fused, compressed GQA model against the unfused,
    uncompiled stock forward (transformers' SDPA with repeat_kv)."""
    from torch._dynamo.utils import counters

    model = _compressed(tiny_model("llama", seed=5))  # 4 query heads over 2 KV heads
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (7, 3)]
    ids, mask = left_pad(rows, 0)
    want_t, want_l = greedy_run(DecodeEngine(model, 2, 32, compile=False), ids, mask, 6)
    fuse_projections(model, gqa_rows=True)
    graphs = counters["stats"]["unique_graphs"]
    got_t, got_l = greedy_run(DecodeEngine(model, 2, 32, compile=True), ids, mask, 6)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert got_t == want_t
    for a, b in zip(got_l, want_l):
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))


# -- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sdpa_attention_without_repeat_equals_a_float64_reference(dtype):
    g = torch.Generator().manual_seed(7)
    b, hkv, groups, length, d = 3, 8, 4, 1040, 128  # LLaMA-3-8B heads, a cache of 65 x 16 slots
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, hkv * groups, 1, d), (b, hkv, length, d), (b, hkv, length, d)))
    allowed = torch.rand(b, 1, 1, length, generator=g) < 0.6
    allowed[..., 0] = True
    mask = torch.where(allowed, 0.0, torch.finfo(dtype).min)
    out, _ = sdpa_attention(_Heads(groups), *(t.to("cuda", dtype) for t in (q, k, v, mask)), scaling=d ** -0.5)
    p = torch.softmax((q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2)) * d ** -0.5
                      + torch.where(allowed, 0.0, float("-inf")).double(), -1)
    want = (p @ v.double().repeat_interleave(groups, 1)).transpose(1, 2)
    err = float((out.double().cpu() - want).norm() / want.norm())
    assert out.shape == want.shape and err < (2e-3 if dtype == torch.float16 else 1.5e-2)


@pytest.mark.gpu
def test_gpu_fused_sparse_twin_runs_fused_kernels_and_equals_the_unfused_one():
    cfg = syn.synthetic_config("tiny-llama")
    cfg.initializer_range = 0.06  # sharp logits: no near-ties between two fp16 summation orders
    dense = syn.build_dense(cfg, device="cuda", seed=4)
    plain, _ = syn.sparse_twin(dense)
    fuse_projections(dense)
    fused, _ = syn.sparse_twin(dense)
    lins = {n: m for n, m in fused.named_modules() if isinstance(m, SparseQuantLinear)}
    assert len(lins) == 8 and all(m._kernel_state is not None for m in lins.values())
    assert lins["model.layers.0.self_attn.qkv_proj"].out_features == 256 + 2 * 128
    assert syn.weight_bytes_on(fused, "cuda") <= syn.weight_bytes_on(plain, "cuda") * 1.01
    x = random_ids(3, 37, vocab=512, seed=2).cuda()
    with torch.no_grad():
        a, b = fused(x).logits.double(), plain(x).logits.double()
    assert float((a - b).norm() / b.norm()) < 2e-3
    prompts = [[1, 15, 27, 300, 42, 7], [3, 200, 17]]
    # CUDA graphs, uncompiled (the compiled fused step is checked by benchmarks/bench_e2e.py)
    assert (generate(fused, prompts, max_new_tokens=16, eos_token_id=[], compile=False).tokens
            == generate(plain, prompts, max_new_tokens=16, eos_token_id=[], compile=False).tokens)
