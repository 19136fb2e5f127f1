"""Rotary embedding (NeoX half split) in Triton, and decode attention's new-token step.

``rotate_halves`` is the one rotary formula of the kernels: ``fused.rotary_and_cache`` applies
it to prefill and mixed batches, ``new_token`` inside decode attention (``paged_attention``),
which rotates q and the step's new K and writes the new K/V into the paged cache in its own
launch. ``NewTokens`` is what a caller hands decode attention for that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kestrel.kernels.rounding import quantize_e4m3


@triton.jit
def rotate_halves(x, x_partner, cos, sin, d_low):
    """Neox half-split rotary, given each element's partner (the other half's element of the
    same index; ``d_low``: the element is in the first half): x1·cos − x2·sin | x2·cos +
    x1·sin, in float32 with the reference's rounding points (kernels using it are compiled
    without FMA contraction). Shared by ``fused.rotary_and_cache`` (on halves) and decode
    attention (on whole heads)."""
    xf = x.to(tl.float32)
    pf = x_partner.to(tl.float32)
    return tl.where(d_low, xf * cos - pf * sin, xf * cos + pf * sin)


@triton.jit
def new_token(q, q_ptrs, q_mask, partner, cos, sin, d_low, k_row, v_row, offs_d, d_mask,
               k_dst, v_dst, write, k_scale_ptr, v_scale_ptr, FP8_KV: tl.constexpr,
               HW_CAST: tl.constexpr):
    """Rotary on q and on the new token's K (rotary_and_cache's math); its K/V stored at
    ``k_dst``/``v_dst`` when ``write`` (the split that holds the last token: no program of the
    launch reads that slot). Returns q rotated and the new K/V as the cache holds them, in q's
    dtype, for that split to attend to from registers."""
    q_p = tl.load(q_ptrs + partner[None, :], mask=q_mask, other=0.0)
    q = rotate_halves(q, q_p, cos[None, :], sin[None, :], d_low[None, :]).to(q.dtype)
    k = tl.load(k_row + offs_d, mask=d_mask, other=0.0)
    k_p = tl.load(k_row + partner, mask=d_mask, other=0.0)
    k = rotate_halves(k, k_p, cos, sin, d_low).to(k_row.dtype.element_ty)
    v = tl.load(v_row + offs_d, mask=d_mask, other=0.0)
    if FP8_KV:  # the cache holds e4m3 codes of x / scale[head]
        kq = quantize_e4m3(k.to(tl.float32), tl.load(k_scale_ptr), HW_CAST).to(
            tl.float8e4nv, bitcast=True)
        vq = quantize_e4m3(v.to(tl.float32), tl.load(v_scale_ptr), HW_CAST).to(
            tl.float8e4nv, bitcast=True)
    else:
        kq = k.to(k_dst.dtype.element_ty)
        vq = v.to(v_dst.dtype.element_ty)
    if write:
        tl.store(k_dst + offs_d, kq, mask=d_mask)
        tl.store(v_dst + offs_d, vq, mask=d_mask)
    return q, kq.to(q.dtype), vq.to(q.dtype)


class NewTokens(NamedTuple):
    """The step's new token per sequence, for ``paged_attention_decode`` to apply rotary to it
    (and to q) and write its K/V into the cache in the attention launch itself
    (``rotary_and_cache`` fused in)."""

    k: torch.Tensor  # [B, Hkv, D], not yet rotated (may be a strided view)
    v: torch.Tensor  # [B, Hkv, D]
    positions: torch.Tensor  # [B]
    cos_sin: torch.Tensor  # [max_pos, D]: cos | sin halves
    slot_mapping: torch.Tensor  # [B] int64, < 0: not written


def check_new_tokens(new: NewTokens, q: torch.Tensor, hkv: int) -> None:
    b, _, d = q.shape
    if new.k.shape != (b, hkv, d) or new.v.shape != new.k.shape or d % 2 or \
            new.cos_sin.shape[-1] != d or new.positions.shape != (b,) or \
            new.slot_mapping.shape != (b,):
        raise ValueError(f"decode: new tokens k {tuple(new.k.shape)}, v {tuple(new.v.shape)}, "
                         f"positions {tuple(new.positions.shape)}, slots "
                         f"{tuple(new.slot_mapping.shape)}, cos_sin {tuple(new.cos_sin.shape)} "
                         f"for q {tuple(q.shape)}")  # fmt: skip
    if any(x.stride(-1) != 1 for x in (new.k, new.v, new.cos_sin)):
        raise ValueError("decode: the last dimension of new k, v, cos_sin must be contiguous")
