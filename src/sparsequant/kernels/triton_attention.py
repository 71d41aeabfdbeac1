"""Decode attention: one query token per row over a KV cache, split over the cache, in one launch (Triton).

At batch 1 the compiled decode step spent ~9 us per LLaMA-2-7B layer in cuDNN's flash SDPA kernel for its
one query token (benchmarks/KERNEL_NOTES.md), a kernel built for many query rows: a fixed cost of the
same size at 256 and 512 cache positions. Here program ``(row b, head h, split s)`` streams split ``s``
of the cache of head ``h``'s KV head (grouped-query heads read the shared head; nothing is repeated)
through an online softmax in fp32 and, when the cache is split, writes its running max, exp-sum and
weighted sum of V to a scratch buffer. The last program of ``(b, h)`` to arrive (an atomic counter
per ``(b, h)``, reset by that program, so a call is one launch and safe in a CUDA graph) combines the
splits exactly, rescaling each by ``exp(max_s - max)``, and writes the output in the activation type.

Mask: ``[B, 1, 1, L']`` (or ``[B, 1, L']``), bool (True = attend) or additive float, as transformers'
SDPA mask for one query token; positions at or past ``min(L, L')`` are not attended. A row whose every
position is masked out gives zeros (SDPA gives NaN); the engine's masks never do that (every query sees
its own slot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interp_compat

if _interp_compat.interpreting():
    _interp_compat.install()

#: Cache positions per inner step of a program, and its warps (measured on an H100, bench_attention.py).
BLOCK_L = 16
NUM_WARPS = 1
#: At most this many splits per (row, head): the combine loads them as one vector.
MAX_SPLIT = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                             cnt_ptr, H, HKV, LM, qk_scale, steps_per_split,
                             sqb, sqh, skb, skh, skl, svb, svh, svl, smb, sob, soh,
                             MASK_KIND: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                             SPLIT: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // (H // HKV)
    offs_d = tl.arange(0, D)
    # scores in the log2 domain: exp2 is one instruction, exp is two
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_d).to(tl.float32) * qk_scale
    m_i = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    acc = tl.zeros([D], dtype=tl.float32)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    for step in range(0, steps_per_split):
        offs_l = (s * steps_per_split + step) * BLOCK + tl.arange(0, BLOCK)
        valid = offs_l < LM
        # K, V and the mask are requested together: at batch 1 a program is bound by load latency
        k = tl.load(k_base + offs_l[:, None] * skl + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + offs_l[:, None] * svl + offs_d[None, :], mask=valid[:, None], other=0.0)
        if MASK_KIND == 1:  # bool: True = attend
            keep = tl.load(mask_ptr + b * smb + offs_l, mask=valid, other=0)
        if MASK_KIND == 2:  # additive, natural-log units
            add = tl.load(mask_ptr + b * smb + offs_l, mask=valid, other=0.0).to(tl.float32)
        sc = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if MASK_KIND == 1:
            valid = valid & (keep != 0)
        if MASK_KIND == 2:
            sc += add * 1.4426950408889634
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)  # 0 while m_i is still -inf
        p = tl.exp2(sc - m_safe)  # 0 where masked
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    o_ptrs = out_ptr + b * sob + h * soh + offs_d
    if SPLIT == 1:
        tl.store(o_ptrs, (acc / tl.where(l_i > 0, l_i, 1.0)).to(out_ptr.dtype.element_ty))
    else:
        slot = bh * SPLIT + s
        tl.store(part_m_ptr + slot, m_i)
        tl.store(part_l_ptr + slot, l_i)
        tl.store(part_acc_ptr + slot * D + offs_d, acc)
        # every thread's partials are written before the release below publishes them
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        if done == SPLIT - 1:
            offs_s = tl.arange(0, SPLIT)
            ms = tl.load(part_m_ptr + bh * SPLIT + offs_s, cache_modifier=".cg")
            ls = tl.load(part_l_ptr + bh * SPLIT + offs_s, cache_modifier=".cg")
            accs = tl.load(part_acc_ptr + (bh * SPLIT + offs_s)[:, None] * D + offs_d[None, :], cache_modifier=".cg")
            mx = tl.max(ms, axis=0)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            w = tl.exp2(ms - mx)
            total = tl.sum(w * ls, axis=0)
            o = tl.sum(w[:, None] * accs, axis=0) / tl.where(total > 0, total, 1.0)
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr + bh, 0)


def supported(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """One query token, fp16/bf16, head size a power of two in [16, 256], one mask row per batch row."""
    if query.dim() != 4 or query.shape[2] != 1 or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    d = query.shape[-1]
    if d & (d - 1) or d < 16 or d > 256 or key.shape[-1] != d or query.shape[1] % key.shape[1]:
        return False
    if attention_mask is not None and not (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                           and attention_mask.shape[2] == 1):
        return False
    return True


#: Where this kernel beats PyTorch's SDPA (cuDNN) on an H100 (bench_attention.py, session 6): at most
#: 64 (row, query head) pairs - batch 1-2 of LLaMA-2-7B and LLaMA-3-8B - over caches up to 512
#: positions: 1.1-1.5x there (6.6 against 8.9 us per layer at batch 1, 256 positions). Beyond, cuDNN
#: streams the cache at full bandwidth and ties or wins, more so for grouped-query heads, whose shared
#: KV head this kernel reads once per query head (from L2): 0.80x at 1024 positions, batch 1, 8 KV heads.
PREFERRED_MAX_PAIRS = 64
PREFERRED_MAX_LENGTH = 512


def preferred(batch: int, heads: int, length: int) -> bool:
    """Whether to use this kernel instead of SDPA for one query token: ``batch`` rows of ``heads``
    query heads over a cache of ``length`` positions (measured, see above)."""
    return batch * heads <= PREFERRED_MAX_PAIRS and length <= PREFERRED_MAX_LENGTH


def split_count(rows_heads: int, length: int, sms: int, block: int = BLOCK_L) -> int:
    """Splits of the cache per (row, head), a power of two: one block of positions per program where
    that keeps the programs under ~16 per SM. At batch 1 a program is bound by the latency of its
    loads, not by bandwidth, so short programs (many of them) finish first."""
    blocks = max(1, triton.cdiv(length, block))
    split = 1
    while split < blocks and split < MAX_SPLIT and rows_heads * split * 2 <= 16 * sms:
        split *= 2
    return split


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-(row, head) arrival counters, zero between calls (each call's last programs reset theirs).
    One buffer per device, shared by every call: calls on one stream run one after another."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scale: float, split: int | None = None,
                     block: int = BLOCK_L, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q [B, H, 1, D]``, ``k/v [B, H_kv, L, D]`` (H_kv divides H);
    returns ``[B, 1, H, D]`` (transformers' attention-function layout). ``split``: cache splits per
    (row, head), a power of two (default: ``split_count``); ``block``: positions per inner step."""
    if not supported(query, key, attention_mask):
        raise ValueError("decode_attention takes one fp16/bf16 query token with a power-of-two head size "
                         "and one mask row per batch row")
    if value.shape[:3] != key.shape[:3] or value.shape[-1] != key.shape[-1]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
    b, h, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        key, value, query = key.contiguous(), value.contiguous(), query.contiguous()
    lm, kind, mask, smb = length, 0, query, 0
    if attention_mask is not None:
        mask = attention_mask[:, 0, 0, :]
        lm = min(length, mask.shape[-1])
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        kind = 1 if mask.dtype == torch.bool else 2
        smb = mask.stride(0) if mask.shape[0] > 1 else 0
        if kind == 1:
            mask = mask.view(torch.uint8)
    dev = query.device
    if split is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
        split = split_count(b * h, lm, sms, block)
    if split < 1 or split & (split - 1) or block < 16 or block & (block - 1):
        raise ValueError(f"split and block must be powers of two (block >= 16), got {split} and {block}")
    steps = max(1, triton.cdiv(triton.cdiv(lm, block), split))
    out = torch.empty(b, 1, h, d, device=dev, dtype=query.dtype)
    if split == 1:
        part_m = part_l = part_acc = cnt = out  # never touched
    else:
        part_m = torch.empty(b * h * split, device=dev, dtype=torch.float32)
        part_l = torch.empty(b * h * split, device=dev, dtype=torch.float32)
        part_acc = torch.empty(b * h * split * d, device=dev, dtype=torch.float32)
        cnt = _counters(dev, b * h)
    _decode_attention_kernel[(b * h, split)](
        query, key, value, mask, out, part_m, part_l, part_acc, cnt, h, hkv, lm, float(scale) * _LOG2E, steps,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), smb, out.stride(0), out.stride(2),
        MASK_KIND=kind, D=d, BLOCK=block, SPLIT=split, num_warps=num_warps)
    return out


@torch.library.custom_op("sparsequant::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``decode_attention`` as one opaque op for torch.compile (Inductor calls it; it never traces the launch)."""
    return decode_attention(query, key, value, attention_mask, scale)


@decode_attention_op.register_fake
def _decode_attention_fake(query, key, value, attention_mask, scale):
    b, h, _, d = query.shape
    return query.new_empty((b, 1, h, d))
