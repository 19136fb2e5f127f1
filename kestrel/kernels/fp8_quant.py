"""Per-token FP8 (e4m3) activation quantization in Triton, plain and fused with its producer.

    per_token_quant_fp8    ~ kestrel.quant.fp8_ops.quantize_rowwise_ref
    silu_and_mul_quant_fp8 ~ kestrel.quant.fp8_ops.silu_and_mul_quant_ref
    rms_norm_quant_fp8     ~ kestrel.quant.fp8_ops.rms_norm_quant_ref

One program per token row: amax → clamp to [AMAX_FLOOR, scale_ub] → scale = amax/448 → x /
scale saturated to ±448 → e4m3. Rows that fit one block are read once; longer rows take a
second pass (the amax must be known before the first element can be cast).

The kernels round to the e4m3 grid themselves (round half to even, in float32 arithmetic) and
write the e4m3 bit pattern as a byte, instead of relying on Triton's fp32→fp8 cast: the result
is then the same on every backend and GPU generation (pre-Ada GPUs have no fp8 cast, and the
Triton 3.x CPU interpreter's cast drops the carry of a mantissa round-up, 1.96 → 1.0).
The same holds for bf16 rounding points (the interpreter truncates fp32→bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.quant.fp8_ops import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, INV_FP8_MAX

_MAX_ONE_PASS = 16384  # longest row held in registers at once
_FLOOR = tl.constexpr(AMAX_FLOOR)  # kernels may only read constexpr globals
_MAX = tl.constexpr(FP8_MAX)
_INV_MAX = tl.constexpr(INV_FP8_MAX)


@triton.jit
def round_dtype(v, DT: tl.constexpr):
    """Round float32 v to the storage dtype and back (DT 0: float32, 1: bfloat16, 2: float16)."""
    if DT == 1:  # bf16 keeps 7 of 23 mantissa bits: round half to even through an integer add
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    elif DT == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _e4m3_bits(y):
    """float32 y in [-448, 448] → e4m3fn bit pattern (uint8), rounding half to even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(y)
    # Normals (|y| >= 2^-6) keep 3 mantissa bits; an integer add carries into the exponent.
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000
    code_n = (((r >> 23) & 0xFF) - 120) * 8 + ((r >> 20) & 7)  # exponent bias 127 → 7
    # Subnormals sit on a 2^-9 grid: adding 1.5·2^14 makes float32 addition round there.
    sub = (a + 24576.0) - 24576.0
    code_s = (sub * 512.0).to(tl.int32)  # 0..8; 8 is 2^-6, whose code is also 8
    code = tl.where(a < 0.015625, code_s, code_n)
    return ((sign << 7) | code).to(tl.uint8)


@triton.jit
def _scale_of(amax, scale_ub):
    return tl.minimum(tl.maximum(amax, _FLOOR), scale_ub) * _INV_MAX  # as the reference


@triton.jit
def _quant(v, scale):
    y = tl.math.div_rn(v, scale)  # IEEE division, as in the torch reference
    return _e4m3_bits(tl.minimum(tl.maximum(y, -_MAX), _MAX))


@triton.jit
def _silu_mul(x_row, n_cols, offs, mask, DT: tl.constexpr):
    """silu(gate) * up with the reference's rounding points (silu rounded, then the product)."""
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = round_dtype(gate / (1.0 + tl.exp(-gate)), DT)
    return round_dtype(act * up, DT)


@triton.jit
def _per_token_quant_kernel(
    x_ptr,  # [T, N] (SILU: [T, 2N] gate | up)
    q_ptr,  # [T, N] uint8 (e4m3 bits)
    s_ptr,  # [T] float32
    n_cols,
    stride_x,
    stride_q,
    scale_ub,
    SILU: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        if SILU:
            v = _silu_mul(x_row, n_cols, offs, mask, DT)
        else:
            v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(v), axis=0), scale_ub)
        tl.store(q_row + offs, _quant(v, scale), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            if SILU:
                v = _silu_mul(x_row, n_cols, offs, mask, DT)
            else:
                v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = _scale_of(tl.max(amax, axis=0), scale_ub)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            if SILU:
                v = _silu_mul(x_row, n_cols, offs, mask, DT)
            else:
                v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + offs, _quant(v, scale), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] residual in (unused if not HAS_RES)
    w_ptr,  # [H]
    q_ptr,  # [T, H] uint8 (e4m3 bits)
    s_ptr,  # [T] float32
    res_out_ptr,  # [T, H] x + residual (unused if not HAS_RES)
    n_cols,
    stride_x,
    stride_r,
    stride_q,
    stride_ro,
    eps,
    scale_ub,
    HAS_RES: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_dtype(x + r, DT)  # the reference rounds the sum to the dtype first
        tl.store(res_out_ptr + row * stride_ro + offs,
                 x.to(res_out_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = round_dtype(w * round_dtype(x * rstd, DT), DT)  # cast back, then scale (HF order)
    scale = _scale_of(tl.max(tl.abs(v), axis=0), scale_ub)
    tl.store(q_ptr + row * stride_q + offs, _quant(v, scale), mask=mask)
    tl.store(s_ptr + row, scale)


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected [T, C], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"{name}: dtype {x.dtype} not supported; use one of {list(DTYPE_CODES)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _ub(scale_ub: float | None) -> float:
    return float("inf") if scale_ub is None else float(scale_ub)


def _launch_rowwise(x: torch.Tensor, n_cols: int, silu: bool, scale_ub: float | None,
                    max_one_pass: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.shape[0]
    q = torch.empty(t, n_cols, dtype=torch.uint8, device=x.device)
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if t and n_cols:
        block = triton.next_power_of_2(n_cols)
        one_pass = block <= max_one_pass
        block = block if one_pass else triton.next_power_of_2(max_one_pass)
        _per_token_quant_kernel[(t,)](
            x, q, s, n_cols, x.stride(0), q.stride(0), _ub(scale_ub),
            SILU=silu, DT=DTYPE_CODES[x.dtype], BLOCK=block, ONE_PASS=one_pass,
            num_warps=max(1, min(16, block // 256)),
        )
    return q.view(FP8_DTYPE), s


def per_token_quant_fp8(x: torch.Tensor, scale_ub: float | None = None, *,
                        max_one_pass: int = _MAX_ONE_PASS) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] (fp32/bf16/fp16) → (fp8 [T, N], scale [T, 1] float32), one scale per token."""
    x = _rows(x, "per_token_quant_fp8")
    return _launch_rowwise(x, x.shape[1], False, scale_ub, max_one_pass)


def silu_and_mul_quant_fp8(
    x: torch.Tensor, scale_ub: float | None = None, *, max_one_pass: int = _MAX_ONE_PASS
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 2I] gate | up → silu(gate)·up as (fp8 [T, I], scale [T, 1]); the [T, I] float
    activation never reaches memory."""
    x = _rows(x, "silu_and_mul_quant_fp8")
    if x.shape[1] % 2:
        raise ValueError(f"silu_and_mul_quant_fp8 needs an even last dimension, got {x.shape[1]}")
    return _launch_rowwise(x, x.shape[1] // 2, True, scale_ub, max_one_pass)


def rms_norm_quant_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    scale_ub: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + residual) → RMSNorm → (fp8 [T, H], scale [T, 1], new residual [T, H]).

    The new residual is x itself when no residual is given, as in ``rms_norm_ref``.
    """
    x = _rows(x, "rms_norm_quant_fp8")
    t, h = x.shape
    if triton.next_power_of_2(h) > _MAX_ONE_PASS:
        raise ValueError(f"rms_norm_quant_fp8: hidden size {h} > {_MAX_ONE_PASS} not supported")
    q = torch.empty(t, h, dtype=torch.uint8, device=x.device)
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    r = _rows(residual, "residual") if residual is not None else x
    res_out = torch.empty_like(x) if residual is not None else x
    if t:
        block = triton.next_power_of_2(h)
        _rms_norm_quant_kernel[(t,)](
            x, r, weight, q, s, res_out, h, x.stride(0), r.stride(0), q.stride(0),
            res_out.stride(0), eps, _ub(scale_ub),
            HAS_RES=residual is not None, DT=DTYPE_CODES[x.dtype], BLOCK=block,
            num_warps=max(1, min(16, block // 256)),
        )
    return q.view(FP8_DTYPE), s, res_out
