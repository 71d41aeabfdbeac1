"""torch.compile of the decode engine's step and the sparse linear's custom op, on the CPU.

Inductor on the CPU generates C++ (gcc), so each compiled engine costs ~10-40 s here; the models
are the tiny two-layer fixtures and each test compiles one engine.
"""
import copy
import gc

import pytest
import torch
from torch._dynamo.utils import counters

from sparsequant.nn import linear_op
from sparsequant.nn.embedding import Int8Embedding, quantize_input_embedding
from sparsequant.nn.linear import SparseQuantLinear
from sparsequant.runtime import synthetic as syn
from sparsequant.runtime.engine import DecodeEngine, left_pad

from conftest import exact_embedding, greedy_run, random_ids, runtime_cli, tiny_model


def _sparse_linear(n=48, k=128, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pw = syn.pack_linear_weight(torch.randn(n, k, generator=g), 4, 32)
    b = torch.randn(n, generator=g) if bias else None
    return SparseQuantLinear(pw, bias=b, compute_dtype=torch.float32)


def _compressed(model):
    """``model`` with every decoder linear a SparseQuantLinear (2:4 int4 g32, reference path on the CPU)."""
    modules = dict(model.named_modules())
    for name, lin in syn.decoder_linears(model).items():
        pw = syn.pack_linear_weight(lin.weight.detach(), 4, 32)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, SparseQuantLinear(pw, bias=lin.bias, compute_dtype=torch.float32))
    return model


# llama runs through the custom op (compressed linears), qwen3 (q/k norms, per-layer-type masks) dense
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_step_equals_eager_and_never_recompiles(family):
    model = tiny_model(family, seed=2)
    if family == "llama":
        model = _compressed(model)
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 4)]  # the second row left-padded
    ids, mask = left_pad(rows, 0)
    eager = DecodeEngine(model, 2, 32, compile=False)
    compiled = DecodeEngine(model, 2, 32, compile=True)
    assert not eager.use_compile and compiled.use_compile
    want_t, want_l = greedy_run(eager, ids, mask, 6)
    graphs = counters["stats"]["unique_graphs"]
    got_t, got_l = greedy_run(compiled, ids, mask, 6)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled, as one graph, once for six steps
    assert got_t == want_t
    for a, b in zip(got_l, want_l):
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))
    # a second generation on the same engine: new prompts, same shapes -> no new compilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        again_t, _ = greedy_run(compiled, ids.flip(0), mask.flip(0), 4)
    assert again_t == greedy_run(eager, ids.flip(0), mask.flip(0), 4)[0]


def test_compiled_step_with_an_int8_embedding_equals_the_eager_float_embedding():
    # the table is exactly representable, so the int8 lookup changes no value: tokens must agree
    model = _compressed(exact_embedding(tiny_model("llama", seed=3)))
    small = copy.deepcopy(model)
    assert isinstance(quantize_input_embedding(small), Int8Embedding)
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (7, 3)]
    ids, mask = left_pad(rows, 0)
    want_t, want_l = greedy_run(DecodeEngine(model, 2, 32, compile=False), ids, mask, 6)
    got_t, got_l = greedy_run(DecodeEngine(small, 2, 32, compile=True), ids, mask, 6)
    assert got_t == want_t
    for a, b in zip(got_l, want_l):
        assert float((a - b).abs().max()) < 1e-4 * max(1.0, float(b.abs().max()))


def test_engine_defaults_to_uncompiled_on_the_cpu():
    eng = DecodeEngine(tiny_model("llama"), 1, 16)
    assert eng.compile_auto and not eng.use_compile and not eng.use_graph


def test_custom_op_compiles_fullgraph_on_the_reference_path():
    m = _sparse_linear()
    x = torch.randn(3, 5, 128)
    want = m(x)
    assert torch.equal(torch.ops.sparsequant.linear(x, m._op_handle, m.out_features), want)
    compiled = torch.compile(lambda t: torch.relu(m(t)) * 2, fullgraph=True, dynamic=False)
    got = compiled(x)
    assert torch.allclose(got, torch.relu(want) * 2, atol=1e-6, rtol=1e-6)
    # against the float64 product with the dequantized weight
    ref = x.double() @ m.dense_weight().double().T + m.bias.double()
    assert float((want.double() - ref).norm() / ref.norm()) < 1e-6


def test_custom_op_passes_opcheck():
    m = _sparse_linear(n=40, k=64, bias=False, seed=3)
    for shape in [(7, 64), (2, 3, 64)]:
        torch.library.opcheck(torch.ops.sparsequant.linear.default, (torch.randn(*shape), m._op_handle, 40))


def test_handles_are_unique_per_copy_and_dead_ones_are_errors():
    m = _sparse_linear()
    c = copy.deepcopy(m)
    assert c._op_handle != m._op_handle and linear_op.lookup(c._op_handle) is c
    x = torch.randn(2, 128)
    assert torch.equal(torch.ops.sparsequant.linear(x, c._op_handle, 48), m(x))
    handle = c._op_handle
    del c
    gc.collect()
    with pytest.raises(RuntimeError, match="no live SparseQuantLinear"):
        torch.ops.sparsequant.linear(x, handle, 48)


def test_generate_and_bench_commands_take_compile_flags():
    from sparsequant.commands import bench

    root = runtime_cli()
    assert root.parse_args(["generate", "--prompt", "x", "--no-compile"]).compile is False
    assert root.parse_args(["generate", "--prompt", "x"]).compile is None
    assert root.parse_args(["generate", "--prompt", "x"]).fuse is True
    assert root.parse_args(["generate", "--prompt", "x", "--no-fuse"]).fuse is False
    assert root.parse_args(["bench", "llama-2-7b", "--no-fuse"]).fuse is False
    args = root.parse_args(["bench", "llama-2-7b", "--compile"])
    assert args.compile is True and not args.compile_compare
    m = object()
    runs = bench.with_compile_options({"sparse": m, "transformers": m}, None, compare=True)
    assert runs == {"sparse": (m, {"compile": False}), "transformers": m, "sparse-compiled": (m, {"compile": True})}


@pytest.mark.gpu
def test_gpu_compiled_graph_decode_equals_uncompiled_graph():
    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cuda", seed=5)
    sparse, _ = syn.sparse_twin(dense, "2:4-w4a16")
    rows = [[1, 15, 27, 300, 42, 7, 99, 5], [3, 200, 17]]
    ids, mask = left_pad(rows, 0)
    for model in (dense, sparse):
        want_t, want_l = greedy_run(DecodeEngine(model, 2, 64, compile=False), ids, mask, 16)
        eng = DecodeEngine(model, 2, 64, compile=True)
        got_t, got_l = greedy_run(eng, ids, mask, 16)
        assert eng.use_compile and eng.use_graph
        assert got_t == want_t
        for a, b in zip(got_l, want_l):  # fp16: fused kernels round differently from the unfused ones
            assert float((a - b).norm() / b.norm()) < 2e-2


def test_compiled_prefill_equals_the_eager_prefill():
    model = _compressed(tiny_model("llama", seed=6))
    rows = [random_ids(1, n, seed=n)[0].tolist() for n in (11, 5)]
    ids, mask = left_pad(rows, 0)
    eager = DecodeEngine(model, 2, 32, compile=False)
    compiled = DecodeEngine(model, 2, 32, compile=True, compile_prefill=True)
    assert compiled.compile_prefill and not eager.compile_prefill
    want, got = eager.prefill(ids, mask), compiled.prefill(ids, mask)
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert ids.shape[1] in compiled._prefill_fns  # compiled once for this prompt length
    # decoding after a compiled prefill continues from the same cache
    assert greedy_run(compiled, ids, mask, 4)[0] == greedy_run(eager, ids, mask, 4)[0]


@pytest.mark.gpu
def test_gpu_compiled_prefill_graph_equals_the_uncompiled_one_for_fp16_and_fp8():
    dense = syn.build_dense(syn.synthetic_config("tiny-llama"), device="cuda", seed=7)
    fp8, _ = syn.sparse_twin(dense, "2:4-fp8")
    ids = random_ids(1, 96, vocab=512, seed=3)
    for model in (dense, fp8):
        want = DecodeEngine(model, 1, 128, compile=False).prefill(ids, graph=True).float()
        eng = DecodeEngine(model, 1, 128, compile=True, compile_prefill=True)
        got = eng.prefill(ids, graph=True).float()
        assert eng.compile_prefill and eng.use_graph
        assert float((got - want).norm() / want.norm()) < 2e-2
