"""Fused elementwise/row kernels of the decoder layer: memory-bound, one pass over each tensor.

Every kernel here matches a torch reference bit-for-bit in the rounding points (it rounds to
the storage dtype where the reference does) and differs only by float32 reduction order:

    rms_norm          ~ kestrel.layers.norm.rms_norm_ref
    silu_and_mul      ~ kestrel.layers.activation.silu_and_mul_ref
    apply_rotary      ~ kestrel.layers.rotary.apply_rotary_ref    (but IN PLACE on q and k)
    rotary_and_cache  ~ apply_rotary_ref, then kestrel.attention.base.write_kv_cache
                        (in place on q and k; slot < 0 is skipped; bit-exact, FP8 caches too)

Layout assumptions: the last (hidden / head_dim) dimension is contiguous; other dimensions
may be strided, so q/k/v can be views into a fused qkv projection output without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.attention_common import check_kv_scales
from kestrel.kernels.pdl import pdl_args, pdl_enter
from kestrel.kernels.rotary import rotate_halves
from kestrel.kernels.rounding import hw_fp8_cast, quantize_e4m3


def _row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~8 elements per thread, 1..16 warps."""
    return max(1, min(16, block // 256))


# ----------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] residual in (unused if not HAS_RES)
    w_ptr,  # [H]
    out_ptr,  # [T, H]
    res_out_ptr,  # [T, H] new residual = x + residual (unused if not HAS_RES)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # The reference rounds the sum to x's dtype before normalising: do the same.
        s = (x + r).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / hidden  # masked lanes are 0 and add nothing
    rstd = 1.0 / tl.sqrt(var + eps)
    y = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back, then scale (HF order)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (x + residual) → RMSNorm; same contract as ``rms_norm_ref``.

    x, residual: [..., H]; weight: [H]. Returns (normed, new_residual), written to ``out`` /
    ``residual_out`` when given (contiguous), else newly allocated; inputs are never modified
    unless passed as an output. With no residual, new_residual is x itself.
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out = residual_out.view(-1, hidden)
    else:
        r2, res_out = x2, x2  # placeholders, never touched (HAS_RES=False)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out2, res_out,
            x2.stride(0), r2.stride(0), out2.stride(0), res_out.stride(0),
            hidden, eps,
            HAS_RES=residual is not None, BLOCK=block, num_warps=_row_warps(block),
            **pdl_args(x.device),
        )  # fmt: skip
    return out, (residual_out if residual_out is not None else x)


# ----------------------------------------------------------------------------- SwiGLU


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I] gate | up
    out_ptr,  # [T, I]
    stride_x,
    stride_o,
    inter,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # Reference: F.silu(gate) rounded to the dtype, then times up.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] (gate | up) → [..., I] = silu(gate) * up."""
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {two_i}")
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    o2 = out.view(-1, inter)
    if x2.shape[0] > 0:
        block = min(triton.next_power_of_2(inter), 2048)
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](
            x2, o2, x2.stride(0), o2.stride(0), inter, BLOCK=block, num_warps=_row_warps(block),
            **pdl_args(x.device),
        )
    return out


# ----------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Neox half-split rotation of one token's [num_heads, 2*HALF] heads, in place; returns
    the rotated halves (in x's dtype) for callers that also store them elsewhere."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    o1 = rotate_halves(x1, x2, cos[None, :], sin[None, :], True).to(x_ptr.dtype.element_ty)
    o2 = rotate_halves(x2, x1, cos[None, :], sin[None, :], False).to(x_ptr.dtype.element_ty)
    tl.store(p1, o1, mask=mask)
    tl.store(p1 + HALF, o2, mask=mask)
    return o1, o2


# ----------------------------------------------------------------------- rotary + KV cache write


@triton.jit
def _rotary_cache_kernel(
    q_ptr,  # [T, Hq, D] (strided), rotated in place
    k_ptr,  # [T, Hkv, D] (strided), rotated in place
    v_ptr,  # [T, Hkv, D] (strided)
    pos_ptr,  # [T] int32/int64
    cs_ptr,  # [max_pos, D]: cos | sin halves
    k_cache_ptr,  # [num_blocks * block_size, Hkv, D] contiguous per slot
    v_cache_ptr,
    slot_ptr,  # [T] int64, < 0 = skip (padding token)
    k_scale_ptr,  # [Hkv] float32 (FP8 caches)
    v_scale_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_cs,
    stride_slot,  # elements per cache slot = Hkv * D
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    FP8: tl.constexpr,  # the caches are FP8 (passed as their uint8 views)
    HW_CAST: tl.constexpr,  # FP8: the hardware e4m3 conversion (kestrel.kernels.fp8_quant)
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # One program per token: the rotary kernel and the cache write of reshape_and_cache in one
    # launch (decode at batch 1 pays for launches, not bytes).
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, num_q_heads, cos, sin,
                  HALF, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    k1, k2 = _rotate_heads(k_ptr + tok * stride_kt, stride_kh, num_kv_heads, cos, sin,
                           HALF, BLOCK_HK, BLOCK_HALF)  # fmt: skip
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_HK)
        hmask = offs_h < num_kv_heads
        mask = hmask[:, None] & dmask[None, :]
        c_off = slot * stride_slot + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        v_row = v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        v1 = tl.load(v_row, mask=mask)
        v2 = tl.load(v_row + HALF, mask=mask)
        # New names, not k1 = ...: the compiler refuses a variable whose type (here the uint8
        # bits) changes inside a runtime `if` (the interpreter does not check).
        if FP8:  # e4m3 bits of x / scale[head] into the caches' uint8 views
            ks = tl.load(k_scale_ptr + offs_h, mask=hmask, other=1.0)[:, None]
            vs = tl.load(v_scale_ptr + offs_h, mask=hmask, other=1.0)[:, None]
            kc1 = quantize_e4m3(k1.to(tl.float32), ks, HW_CAST)
            kc2 = quantize_e4m3(k2.to(tl.float32), ks, HW_CAST)
            vc1 = quantize_e4m3(v1.to(tl.float32), vs, HW_CAST)
            vc2 = quantize_e4m3(v2.to(tl.float32), vs, HW_CAST)
        else:
            kc1, kc2, vc1, vc2 = k1, k2, v1, v2
        tl.store(k_cache_ptr + c_off, kc1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + c_off + HALF, kc2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + c_off, vc1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + c_off + HALF, vc2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding IN PLACE on q [T, Hq, D] and k [T, Hkv, D], then k and v into the paged
    cache [NB, BS, Hkv, D] at ``slot_mapping`` (slots < 0 skipped), in one launch; returns (q, k).
    An FP8 cache takes ``quantize_kv`` of them with the per-head float32 ``k_scale``/``v_scale``.

    Bit-exact with ``apply_rotary_ref`` then ``write_kv_cache`` on CUDA: float32 rotation
    without FMA contraction (as torch's separate multiply and subtract), rounded to q/k's dtype,
    then cast to the cache dtype. (Triton's CPU interpreter truncates float32 → bfloat16, so
    there bf16 results may sit one step off.) q, k, v may be strided views (last dim contiguous).
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    if d % 2 or k.shape[2] != d or cos_sin.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"rotary_and_cache: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, cos_sin {tuple(cos_sin.shape)}")  # fmt: skip
    if k_cache.shape[2:] != (hk, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"rotary_and_cache: k {tuple(k.shape)} vs cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rotary_and_cache: k_cache and v_cache must be contiguous")
    if any(x.stride(-1) != 1 for x in (q, k, v, cos_sin)):
        raise ValueError("rotary_and_cache: the last dimension of q, k, v, cos_sin must be "
                         "contiguous")  # fmt: skip
    fp8 = check_kv_scales("rotary_and_cache", k_cache, hk, k_scale, v_scale)
    if t == 0:
        return q, k
    half = d // 2
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    else:
        k_scale = v_scale = slot_mapping  # unread placeholders
    _rotary_cache_kernel[(t,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), hk * d, hq, hk,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half),
        FP8=fp8, HW_CAST=fp8 and hw_fp8_cast(q.device),
        num_warps=4, enable_fp_fusion=False, **pdl_args(q.device),
    )  # fmt: skip
    return q, k
