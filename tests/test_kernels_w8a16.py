"""The dense W8A16 kernel (kernels/triton_w8a16.py) against its plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

from sparsequant.kernels import triton_w8a16 as w8
from sparsequant.nn.embedding import quantize_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest sets it)


@pytest.mark.parametrize("m,n,k", [(1, 70, 96), (3, 64, 256), (17, 33, 80), (5, 130, 300)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a16_equals_reference(m, n, k, dtype, bias):
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    codes, scales = quantize_rows(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = w8.w8a16_reference(x, codes, scales, b)
    exact = (x.double() @ (codes.double() * scales.double()[:, None]).T + (b.double() if bias else 0))
    y = w8.w8a16_linear(x.to(DEV), codes.to(DEV), scales.to(DEV), None if b is None else b.to(DEV),
                        config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, NUM_STAGES=2, num_warps=4))
    assert y.shape == (m, n) and y.dtype == dtype
    tol = (2e-3 if dtype == torch.float16 else 1.6e-2) * (exact.abs().max().item() + 1)
    assert (y.cpu().double() - exact).abs().max().item() < tol
    assert (ref.double() - exact).abs().max().item() < tol


def test_w8a16_default_configs_cover_every_token_count_and_keep_leading_dims():
    codes, scales = quantize_rows(torch.randn(40, 64))
    x = torch.randn(2, 3, 64).half()
    if DEV == "cpu":  # the interpreter: keep the tiles small
        y = w8.w8a16_linear(x, codes, scales, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, NUM_STAGES=1, num_warps=4))
    else:
        y = w8.w8a16_linear(x.cuda(), codes.cuda(), scales.cuda()).cpu()
    assert y.shape == (2, 3, 40)
    assert torch.allclose(y.float(), w8.w8a16_reference(x, codes, scales).float(), atol=2e-2, rtol=2e-3)
    for m in (1, 16, 17, 64, 65, 4096):
        assert w8.config_for(m)["BLOCK_M"] >= min(m, 16)


def test_w8a16_refuses_bad_input():
    codes, scales = quantize_rows(torch.randn(8, 32))
    with pytest.raises(TypeError):
        w8.w8a16_linear(torch.randn(1, 32), codes, scales)  # float32 activations
    with pytest.raises(ValueError, match="features"):
        w8.w8a16_linear(torch.randn(1, 31).half(), codes, scales)
    with pytest.raises(ValueError, match="scales"):
        w8.w8a16_linear(torch.randn(1, 32).half(), codes, scales[:4])
    with pytest.raises(TypeError):
        w8.w8a16_linear(torch.randn(1, 32).half(), codes.float(), scales)
