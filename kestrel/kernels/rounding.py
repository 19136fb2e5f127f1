"""Rounding primitives of the Triton kernels: e4m3 codes, bf16 rounding points, per-token scales.

Rounding to e4m3: on CUDA with native fp8 (sm 8.9+) the hardware conversion (``HW_CAST``,
cvt.rn.satfinite: round to nearest even, saturating at ±448), which is torch's cast of the
clamped value. Elsewhere the kernels clamp, round to the e4m3 grid themselves (round half to
even, in float32 arithmetic) and write the bit pattern as a byte: the Triton 3.x CPU
interpreter's cast drops the carry of a mantissa round-up (1.96 → 1.0), and pre-Ada GPUs have
no fp8 cast. The same holds for bf16 rounding points (the interpreter truncates fp32→bf16),
which ``round_dtype`` rounds with integer arithmetic there and with the GPU's cvt.rn under
``HW_CAST``. Row kernels divide by the scale through its reciprocal with an FMA correction
(``quantize_e4m3_rcp``): the IEEE quotient's bits without a division per value, which left the
prefill SwiGLU + quant kernel compute-bound.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kestrel.quant.fp8_ops import AMAX_FLOOR, FP8_MAX, INV_FP8_MAX

_FLOOR = tl.constexpr(AMAX_FLOOR)  # kernels may only read constexpr globals
_MAX = tl.constexpr(FP8_MAX)
_INV_MAX = tl.constexpr(INV_FP8_MAX)
# kestrel.quant.w8a8's INT8_MAX and _SCALE_FLOOR (that module imports the layers; the tests
# hold the kernels to its quantize_rows_int8 bit for bit)
_INT8_MAX = tl.constexpr(127.0)
_INT8_FLOOR = tl.constexpr(1e-12)
_RINT = tl.constexpr(12582912.0)  # 1.5·2²³


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _has_fp8_cvt(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def hw_fp8_cast(device: torch.device) -> bool:
    """Compiled for a GPU with an fp32→e4m3 conversion instruction (not the interpreter)?"""
    compiled = isinstance(round_dtype, triton.runtime.JITFunction)
    return device.type == "cuda" and compiled and _has_fp8_cvt(device.index)


@triton.jit
def round_dtype(v, DT: tl.constexpr, HW: tl.constexpr = False):
    """Round float32 v to the storage dtype and back (DT 0: float32, 1: bfloat16, 2: float16).
    ``HW``: compiled for a GPU, whose conversion (cvt.rn) rounds half to even itself, in one
    instruction for two values; the interpreter's truncates, hence the integer path."""
    if DT == 1 and HW:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif DT == 1:  # bf16 keeps 7 of 23 mantissa bits: round half to even through an integer add
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
def scale_of(amax, scale_ub):
    return tl.minimum(tl.maximum(amax, _FLOOR), scale_ub) * _INV_MAX  # as the reference


@triton.jit
def quantize_e4m3(v, scale, HW_CAST: tl.constexpr):
    """v / scale → e4m3 bits (uint8), as the reference's cast_fp8(v / scale)."""
    return _e4m3(tl.math.div_rn(v, scale), HW_CAST)  # IEEE division, as in the torch reference


@triton.jit
def quantize_e4m3_rcp(v, scale, rcp, HW_CAST: tl.constexpr):
    """``quantize_e4m3`` for many values of one scale, given ``rcp = div_rn(1, scale)``: v / scale
    by Markstein's correction (q = v·rcp, then q + (v − q·scale)·rcp with exact FMA remainders
    is the correctly rounded quotient when rcp is the correctly rounded reciprocal), a multiply
    and two FMAs instead of a division with its slow-path check per value, which made the
    prefill SwiGLU + quant kernel compute-bound. q is clamped to ±512 first: larger quotients
    saturate at 448 either way, and the clamp keeps the remainder finite. v = −0 would come
    out +0 (−0 + (+0)), and how a compiler folds the negations decides it, so v's sign bit is
    put back into the quotient, whose sign it is (scale > 0)."""
    q = tl.minimum(tl.maximum(v * rcp, -512.0), 512.0)
    y = tl.fma(tl.fma(-q, scale, v), rcp, q).to(tl.uint32, bitcast=True)
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return _e4m3((y | sign).to(tl.float32, bitcast=True), HW_CAST)


@triton.jit
def row_scale(amax, scale_ub, INT8: tl.constexpr):
    """A row's scale from its amax: e4m3's (``scale_of``), or ``INT8``: max(amax / 127, 1e-12),
    as kestrel.quant.w8a8.quantize_rows_int8 (no bound: ``scale_ub`` unused)."""
    if INT8:
        scale = tl.maximum(tl.math.div_rn(amax, _INT8_MAX), _INT8_FLOOR)
    else:
        scale = scale_of(amax, scale_ub)
    return scale


@triton.jit
def row_codes(v, scale, rcp, HW_CAST: tl.constexpr, INT8: tl.constexpr):
    """v / scale as one byte per value (uint8 bits), given ``rcp = div_rn(1, scale)``: e4m3
    (``quantize_e4m3_rcp``), or ``INT8``: the correctly rounded quotient (the same correction)
    rounded to the nearest integer, ties to even as torch.round (float32 addition of 1.5·2²³
    rounds there), clamped to ±127."""
    if INT8:
        q = v * rcp
        q = tl.fma(tl.fma(-q, scale, v), rcp, q)
        q = tl.minimum(tl.maximum((q + _RINT) - _RINT, -_INT8_MAX), _INT8_MAX)
        codes = q.to(tl.int8).to(tl.uint8, bitcast=True)
    else:
        codes = quantize_e4m3_rcp(v, scale, rcp, HW_CAST)
    return codes


@triton.jit
def _e4m3(y, HW_CAST: tl.constexpr):
    """float32 y → e4m3 bits (uint8), saturated to ±448, rounded to nearest even: the
    reference's clamp, then cast (NaN stays NaN)."""
    if HW_CAST:  # cvt.rn.satfinite on sm 8.9+: nearest even, as torch, saturating by itself
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return _e4m3_bits(tl.minimum(tl.maximum(y, -_MAX), _MAX))


@triton.jit
def silu_rounded(gate, DT: tl.constexpr, HW: tl.constexpr = False):
    """silu of float32 ``gate`` (values of the dtype), rounded to the dtype: F.silu of a 16-bit
    tensor; ``HW`` as in ``round_dtype``."""
    return round_dtype(gate / (1.0 + tl.exp(-gate)), DT, HW)
