"""Fused elementwise/row kernels of the decoder layer: memory-bound, one pass over each tensor.

Every kernel here matches a torch reference bit-for-bit in the rounding points (it rounds to
the storage dtype where the reference does) and differs only by float32 reduction order:

    rms_norm          ~ kestrel.layers.norm.rms_norm_ref
    silu_and_mul      ~ kestrel.layers.activation.silu_and_mul_ref
    apply_rotary      ~ kestrel.layers.rotary.apply_rotary_ref    (but IN PLACE on q and k)
    reshape_and_cache ~ kestrel.attention.base.write_kv_cache     (slot -1 is skipped)

Layout assumptions: the last (hidden / head_dim) dimension is contiguous; other dimensions
may be strided, so q/k/v can be views into a fused qkv projection output without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
):
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
):
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
            x2, o2, x2.stride(0), o2.stride(0), inter, BLOCK=block, num_warps=_row_warps(block)
        )
    return out


# ----------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, cos, sin,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Neox half-split rotation of one token's [num_heads, 2*HALF] heads, in place."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    p1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, o2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, Hq, D] (strided)
    k_ptr,  # [T, Hkv, D] (strided)
    pos_ptr,  # [T] int32/int64
    cs_ptr,  # [max_pos, D]: cos | sin halves
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    num_q_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token: cos/sin row read once, shared by all q and k heads.
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, num_q_heads, cos, sin,
                  HALF, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh, num_kv_heads, cos, sin,
                  HALF, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding applied IN PLACE to q [T, Hq, D] and k [T, Hkv, D]; returns (q, k).

    Same math as ``apply_rotary_ref`` (float32 rotation, neox half split); positions [T];
    cos_sin [max_pos, D] = cos | sin halves. q and k may be strided views (last dim contiguous).
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    if d % 2 or k.shape[2] != d or cos_sin.shape[-1] != d:
        raise ValueError(
            f"rotary: head_dim mismatch q {q.shape}, k {k.shape}, cos_sin {cos_sin.shape}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("rotary: the last dimension of q, k and cos_sin must be contiguous")
    if t == 0:
        return q, k
    half = d // 2
    _rotary_kernel[(t,)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        hq, hk,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )  # fmt: skip
    return q, k


# ----------------------------------------------------------------------------- KV cache write


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,  # [T, Hkv, D] (strided)
    v_ptr,  # [T, Hkv, D] (strided)
    k_cache_ptr,  # [num_blocks * block_size, Hkv, D] contiguous per slot
    v_cache_ptr,
    slot_ptr,  # [T] int64, -1 = skip (padding token)
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_slot,  # elements per cache slot = Hkv * D
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # Masked rather than early-returned: a skipped token moves no bytes either way.
    valid = (tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot) >= 0  # broadcast scalar test
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM) & valid
    hd = offs_h[:, None] * HEAD_DIM + offs_d[None, :]  # [BLOCK_H, BLOCK_D] offset in a slot
    k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + slot * stride_slot + hd, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_slot + hd, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V [T, Hkv, D] into the paged cache [NB, BS, Hkv, D] at ``slot_mapping``.

    Slots < 0 are skipped (padding tokens of a CUDA-graph batch). Casts to the cache dtype.
    """
    t, hk, d = k.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("reshape_and_cache: k_cache and v_cache must be contiguous")
    if k_cache.shape[2:] != (hk, d) or v.shape != k.shape:
        raise ValueError(f"reshape_and_cache: k {k.shape}, v {v.shape}, cache {k_cache.shape}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("reshape_and_cache: the last dimension of k and v must be contiguous")
    if t == 0:
        return
    _reshape_and_cache_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), hk * d, hk,
        HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )  # fmt: skip
