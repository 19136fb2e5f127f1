"""What the attention kernels share: the dot helper and its flags, the FP8 cache's scale check,
float16 queries for the dots with an FP8 cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.quant.fp8_ops import FP8_DTYPE

LOG2E = 1.4426950408889634  # softmax runs in base 2: scores are scaled by scale · log2(e)


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST=True multiplies in float32 (Triton's CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def f16_query(q, qk_scale):
    """bf16 q as float16 for dots with an FP8 cache's tiles, which convert to float16 in one
    instruction per two codes (to bfloat16 in several). e4m3 codes are exact in float16, and so
    are bf16 values of q in its normal range: q is scaled by an exact power of two 2^-e that
    brings max|q| into [2^14, 2^15) (down from beyond float16's range, or up from its
    subnormals, where bits would be lost), and qk_scale by 2^e, so q·k is unchanged. P then
    enters P·V in float16 (finer than bf16 for probabilities in [0, 1])."""
    amax = tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0)
    exp = (amax.to(tl.int32, bitcast=True) >> 23) - 127  # amax < 2^(exp + 1)
    e = tl.maximum(exp - 14, -100)  # an all-zero q (exp -127) keeps finite factors
    q = (q.to(tl.float32) * ((127 - e) << 23).to(tl.float32, bitcast=True)).to(tl.float16)
    return q, qk_scale * ((127 + e) << 23).to(tl.float32, bitcast=True)


def dot_flags(dtype: torch.dtype, device: torch.device, fp8_cache: bool) -> dict[str, object]:
    """Constexpr arguments of the attention kernels' dots for queries of ``dtype``: exact fp32
    dots for fp32; upcast off CUDA (``mma``); float16 dots over an FP8 cache for bf16 queries
    (``F16_DOT``, ``f16_query``)."""
    upcast = device.type != "cuda"
    prec = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return {"DOT_PREC": prec, "UPCAST": upcast,
            "F16_DOT": fp8_cache and dtype == torch.bfloat16}


def check_kv_scales(name: str, k_cache: torch.Tensor, hkv: int, k_scale, v_scale) -> bool:
    """Is the cache FP8 (then with one float32 scale per KV head for K and for V)?"""
    if k_cache.dtype != FP8_DTYPE:
        return False
    for s in (k_scale, v_scale):
        if s is None or s.dtype != torch.float32 or s.numel() != hkv or not s.is_contiguous():
            raise ValueError(f"{name}: an FP8 cache needs contiguous float32 k_scale and "
                             f"v_scale of {hkv} values (one per KV head)")
    return True
