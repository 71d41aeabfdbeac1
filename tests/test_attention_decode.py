"""The split-KV decode-attention kernel (kernels/triton_attention.py) against PyTorch's SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsequant.kernels import triton_attention as ta

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest sets it)


def _reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    m = None
    if mask is not None:
        m = mask[..., : k.shape[2]]
        m = m if m.dtype == torch.bool else m.double()
    return F.scaled_dot_product_attention(q.double(), kr, vr, attn_mask=m, scale=scale).transpose(1, 2)


CASES = [  # b, h, h_kv, length, d, mask
    (2, 4, 2, 70, 64, "bool"), (1, 4, 4, 130, 32, "float"), (3, 8, 2, 5, 16, None), (2, 4, 1, 200, 64, "bool"),
    (1, 2, 2, 64, 128, "long-bool"),
]


@pytest.mark.parametrize("b,h,hkv,length,d,mask_kind", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_equals_sdpa(b, h, hkv, length, d, mask_kind, dtype):
    gen = torch.Generator().manual_seed(b * 1000 + length)
    q = torch.randn(b, h, 1, d, generator=gen).to(dtype).to(DEV)
    k = torch.randn(b, hkv, length, d, generator=gen).to(dtype).to(DEV)
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype).to(DEV)
    mask = None
    if mask_kind in ("bool", "long-bool"):
        extra = 5 if mask_kind == "long-bool" else 0  # a mask longer than the cache: its tail is ignored
        mask = torch.rand(b, 1, 1, length + extra, generator=gen) > 0.3
        mask[..., 0] = True
        mask = mask.to(DEV)
    elif mask_kind == "float":
        mask = torch.where(torch.rand(b, 1, 1, length, generator=gen) > 0.3, 0.0, float("-inf")).to(dtype)
        mask[..., 0] = 0
        mask = mask.to(DEV)
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), d ** -0.5)
    for split, block in ((None, 32), (1, 16), (2, 64), (8, 16), (16, 64)):  # incl. more splits than blocks
        out = ta.decode_attention(q, k, v, mask, d ** -0.5, split=split, block=block)
        assert out.shape == (b, 1, h, d) and out.dtype == dtype
        err = (out.cpu().double() - ref).abs().max().item()
        assert err < (2e-3 if dtype == torch.float16 else 1.6e-2), (split, err)
    # the last program of each (row, head) resets its counter: a second call sees zeros again
    assert int(ta._counters(q.device, b * h)[: b * h].abs().sum()) == 0


def test_split_count_fills_the_machine_without_empty_splits():
    assert ta.split_count(32, 256, 132, block=32) == 8  # one block of 32 positions per program
    assert ta.split_count(32, 250, 132, block=32) == 8
    assert ta.split_count(32, 4096, 132, block=32) == 64  # 2048 programs, ~16 per SM
    assert ta.split_count(1, 100_000, 132, block=32) == ta.MAX_SPLIT
    assert ta.split_count(1024, 4096, 132, block=32) == 2
    assert ta.split_count(4096, 4096, 132, block=32) == 1
    assert ta.split_count(1, 10, 132) == 1


def test_the_kernel_is_preferred_only_where_it_measured_faster():
    assert ta.preferred(1, 32, 256) and ta.preferred(2, 32, 512)
    assert not ta.preferred(8, 32, 256)  # many pairs: cuDNN streams at full bandwidth
    assert not ta.preferred(1, 32, 1024)


def test_additive_mask_in_the_dtypes_lowest_value_is_exact_zero_weight():
    """The engine's masks use finfo.min, not -inf: masked positions must weigh nothing."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 1, 32, generator=gen).half().to(DEV)
    k = torch.randn(1, 2, 96, 32, generator=gen).half().to(DEV)
    v = (torch.randn(1, 2, 96, 32, generator=gen) * 100).half().to(DEV)
    mask = torch.zeros(1, 1, 1, 96, dtype=torch.float16)
    mask[..., 40:] = torch.finfo(torch.float16).min
    out = ta.decode_attention(q, k, v, mask.to(DEV), 32 ** -0.5, split=2)
    ref = _reference(q[..., :].cpu(), k[:, :, :40].cpu(), v[:, :, :40].cpu(), None, 32 ** -0.5)
    assert (out.cpu().double() - ref).abs().max().item() < 1e-3 * ref.abs().max().item()


def test_unsupported_shapes_are_refused():
    q = torch.randn(1, 4, 2, 64).half()  # two query tokens
    k = torch.randn(1, 2, 10, 64).half()
    assert not ta.supported(q, k, None)
    assert not ta.supported(torch.randn(1, 4, 1, 48).half(), torch.randn(1, 2, 10, 48).half(), None)  # d = 48
    assert not ta.supported(torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64), None)  # float32
    assert not ta.supported(q[:, :, :1], k, torch.ones(1, 4, 1, 10, dtype=torch.bool))  # a mask per head
    with pytest.raises(ValueError):
        ta.decode_attention(q, k, k, None, 0.125)
    q1 = torch.randn(1, 4, 1, 64).half()
    with pytest.raises(ValueError, match="powers of two"):
        ta.decode_attention(q1, k, k, None, 0.125, split=3)
    with pytest.raises(ValueError, match="power"):
        ta.decode_attention(q1, k, k, None, 0.125, block=24)
    with pytest.raises(ValueError, match="differ"):
        ta.decode_attention(q1, k, torch.randn(1, 2, 9, 64).half(), None, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,length,kernel", [(2, 300, True), (16, 300, False), (1, 700, False)])
def test_engine_attention_picks_the_kernel_where_preferred_and_matches_sdpa(monkeypatch, batch, length, kernel):
    """The fused attention's function: one query token on CUDA through the kernel where it is the
    faster one (``preferred``), SDPA elsewhere; equal to float64 SDPA either way, compiled too."""
    from sparsequant.models.attention import decode_attention

    class Mod:
        num_key_value_groups = 4

    calls = []
    real = ta.decode_attention_op
    monkeypatch.setattr(ta, "decode_attention_op", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(batch, 8, 1, 128, device="cuda").half()
    k = torch.randn(batch, 2, length, 128, device="cuda").half()
    v = torch.randn(batch, 2, length, 128, device="cuda").half()
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[0, ..., 250:] = False
    out, _ = decode_attention(Mod(), q, k, v, mask, scaling=128 ** -0.5)
    assert bool(calls) == kernel
    ref = _reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 128 ** -0.5)
    assert (out.cpu().double() - ref).abs().max().item() < 2e-3
    monkeypatch.setattr(ta, "decode_attention_op", real)
    compiled = torch.compile(lambda a, b_, c, m: decode_attention(Mod(), a, b_, c, m, scaling=128 ** -0.5)[0],
                             fullgraph=True)
    assert (compiled(q, k, v, mask) - out).abs().max().item() < 2e-3
