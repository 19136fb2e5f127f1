"""W8A8's GPU kernels (kestrel.quant.w8a8): per-token int8 activations, and the int8 product
scaled back to the activation dtype.

    per_token_quant_int8(x)            ~ kestrel.quant.w8a8.quantize_rows_int8
    scale_int32(acc, xs, ws, dtype)    ~ (acc.float() * xs * wsᵀ).to(dtype)
    int8_gemm_small_m(xq, xs, wq, ws)  ~ the same of xq·wqᵀ, reading each weight byte once

Without them a W8A8 layer ran as a dozen torch ops whose int32 and float32 intermediates cost
more memory traffic than the int8 product saves: an 8B model's 4k prefill took 187 ms against
BF16's 86, and its batch-1 decode 6.4 ms against 3.9 (H200). Quantizing is one read of each
row and one write of its codes; the scaling one read of the int32 sums and one write of the
output; decode rows (up to 16) go through fp8_gemm's skinny kernel on int8 tiles instead of a
cuBLAS GEMM padded to 17 rows.

Rounding as the reference's: the quotient x / scale correctly rounded (Markstein's correction
of x·(1/scale), ``rounding.quantize_e4m3_rcp``'s method), then to the nearest integer, ties to
even (torch.round), through float32 addition of 1.5·2²³; outputs rounded half to even with
``round_dtype`` (the interpreter truncates casts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.fp8_gemm import _compiled, _launch, _out_tensor
from kestrel.kernels.rounding import DTYPE_CODES, round_dtype
from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model, sm_count

_MAX_ONE_PASS = 16384  # longest row held in registers at once
_RINT = tl.constexpr(12582912.0)  # 1.5·2²³: float32 addition rounds to integers there
_INT8_MAX = tl.constexpr(127.0)
_FLOOR = tl.constexpr(1e-12)  # quant.w8a8._SCALE_FLOOR
_TILE = 64  # scale_int32: outputs per program are _TILE × 2·_TILE


@triton.jit
def _int8_codes(v, scale, rcp):
    """round(v / scale) clamped to ±127, as int8; ``rcp`` = div_rn(1, scale)."""
    q = v * rcp
    q = tl.fma(tl.fma(-q, scale, v), rcp, q)  # the correctly rounded quotient
    q = (q + _RINT) - _RINT
    return tl.minimum(tl.maximum(q, -_INT8_MAX), _INT8_MAX).to(tl.int8)


@triton.jit
def _per_token_int8_kernel(x_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,
                           BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(v), axis=0), _INT8_MAX), _FLOOR)
        rcp = tl.math.div_rn(1.0, scale)
        tl.store(q_row + offs, _int8_codes(v, scale, rcp), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), _INT8_MAX), _FLOOR)
        rcp = tl.math.div_rn(1.0, scale)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + offs, _int8_codes(v, scale, rcp), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _scale_int32_kernel(acc_ptr, xs_ptr, ws_ptr, out_ptr, M, N, DT: tl.constexpr,
                        HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.load(acc_ptr + offs, mask=mask, other=0)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = round_dtype(acc.to(tl.float32) * xs[:, None] * ws[None, :], DT, HW)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def per_token_quant_int8(x: torch.Tensor, *, max_one_pass: int = _MAX_ONE_PASS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float → (int8 codes [T, K], float32 scales [T, 1]): one scale per row, its
    absmax / 127 (``max_one_pass``: rows longer than it are read twice; tests force it)."""
    if x.dim() != 2 or x.dtype not in DTYPE_CODES:
        raise ValueError(f"per_token_quant_int8: expected a [T, K] float tensor, got "
                         f"{tuple(x.shape)} {x.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, k = x.shape
    q = torch.empty(t, k, dtype=torch.int8, device=x.device)
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if t and k:
        block = triton.next_power_of_2(k)
        one_pass = block <= max_one_pass
        block = block if one_pass else triton.next_power_of_2(max_one_pass)
        _per_token_int8_kernel[(t,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                     ONE_PASS=one_pass, num_warps=max(1, min(16, block // 256)))
    return q, s


def scale_int32(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] int32 sums, x_scale [M, 1], w_scale [N, 1] float32 → [M, N] of out_dtype."""
    if acc.dtype != torch.int32 or acc.dim() != 2 or not acc.is_contiguous():
        raise ValueError(f"scale_int32: expected contiguous [M, N] int32 sums, got "
                         f"{tuple(acc.shape)} {acc.dtype}")
    m, n = acc.shape
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"scale_int32: scales {tuple(x_scale.shape)} and "
                         f"{tuple(w_scale.shape)} for sums {tuple(acc.shape)}")
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m and n:
        grid = (triton.cdiv(m, _TILE), triton.cdiv(n, 2 * _TILE))
        _scale_int32_kernel[grid](acc, x_scale.reshape(-1).float().contiguous(),
                                  w_scale.reshape(-1).float().contiguous(), out, m, n,
                                  DT=DTYPE_CODES[out_dtype], HW=_compiled(), BLOCK_M=_TILE,
                                  BLOCK_N=2 * _TILE, num_warps=4)
    return out


def int8_gemm_small_m(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                      w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                      config: SkinnyConfig | None = None) -> torch.Tensor:
    """xq [M, K] int8, x_scale [M, 1], wq [N, K] int8, w_scale [N, 1] → [M, N] of out_dtype:
    fp8_gemm_small_m's kernel and configs (one byte per weight either way) on int8 tiles, the
    products summed in float32 (exact up to 2²⁴) or, in its tensor-core dot, in int32 per K
    step. CUDA-graph safe."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.dim() != 2 or wq.dim() != 2 \
            or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"int8_gemm_small_m: expected int8 [M, K] and [N, K], got "
                         f"{tuple(xq.shape)} {xq.dtype} and {tuple(wq.shape)} {wq.dtype}")
    if x_scale.numel() != xq.shape[0] or w_scale.numel() != wq.shape[0]:
        raise ValueError(f"int8_gemm_small_m: scales {tuple(x_scale.shape)} and "
                         f"{tuple(w_scale.shape)}, expected one per row of x and of w")
    (m, k), n = xq.shape, wq.shape[0]
    out = _out_tensor("int8_gemm_small_m", None, m, n, out_dtype, xq.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    dev = xq.device
    cfg = config or default_config(m, n, k, sm_count(dev.type, dev.index),
                                   gpu=gpu_model(dev.type, dev.index))
    xs = x_scale.reshape(-1).float().contiguous()
    ws = w_scale.reshape(-1).float().contiguous()
    return _launch(xq.contiguous(), xs, wq.contiguous(), ws, out, cfg, scaled=True)
