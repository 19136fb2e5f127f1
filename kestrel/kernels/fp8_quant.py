"""Per-token FP8 (e4m3) activation quantization in Triton, plain and fused with its producer.

    per_token_quant_fp8    ~ kestrel.quant.fp8_ops.quantize_rowwise_ref
    silu_and_mul_quant_fp8 ~ kestrel.quant.fp8_ops.silu_and_mul_quant_ref
    rms_norm_quant_fp8     ~ kestrel.quant.fp8_ops.rms_norm_quant_ref

Per token row: amax → clamp to [AMAX_FLOOR, scale_ub] → scale = amax/448 → x / scale saturated
to ±448 → e4m3. Many rows (prefill): one program per row; rows that fit one block are read once,
longer rows take a second pass (the amax must be known before the first element can be cast).
Few rows (decode): one program per row would leave all SMs but T idle (a 14336-wide SwiGLU row
took ~7 µs on one H200 SM), so each row is split into CHUNK-column pieces over two launches:
phase 1 writes each piece's amax (and, fused with SwiGLU, the activation in the input dtype),
phase 2 reduces the row's amaxes to its scale and quantizes its piece. Both give the same bits:
a max does not depend on the order it is taken in.
The rounding primitives (e4m3 codes, bf16 rounding points, the reciprocal division) are in
``kestrel.kernels.rounding``. With ``int8=True`` the same kernels emit W8A8's int8 codes and
scales instead (amax / 127, no bound; kestrel.quant.w8a8.quantize_rows_int8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kestrel.kernels.pdl import pdl_args, pdl_enter
from kestrel.kernels.rounding import (
    DTYPE_CODES,
    hw_fp8_cast,
    round_dtype,
    row_codes,
    row_scale,
    silu_rounded,
)
from kestrel.quant.fp8_ops import FP8_DTYPE

_MAX_ONE_PASS = 16384  # longest row held in registers at once
_SPLIT_MAX_ROWS = 32  # up to this many rows (decode batches), each row is split over programs
_CHUNK = 1024  # columns per program of a split row: 14336 → 14 programs per row


@triton.jit
def _load_act(x_row, n_cols, offs, mask, SILU: tl.constexpr, DT: tl.constexpr,
              HW: tl.constexpr):
    """Row x_row's columns offs as float32: x itself, or silu(gate) * up of [gate | up] with the
    reference's rounding points (silu rounded to the dtype, then the product); ``HW`` as in
    ``round_dtype``."""
    if SILU:
        gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        v = round_dtype(silu_rounded(gate, DT, HW) * up, DT, HW)
    else:
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _per_token_quant_kernel(
    x_ptr,  # [T, N] (SILU: [T, 2N] gate | up)
    q_ptr,  # [T, N] uint8 (e4m3 or int8 bits)
    s_ptr,  # [T] float32
    n_cols,
    stride_x,
    stride_q,
    scale_ub,
    SILU: tl.constexpr,
    DT: tl.constexpr,
    HW_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
    INT8: tl.constexpr,  # int8 codes (W8A8) instead of e4m3: rounding.row_codes
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        v = _load_act(x_row, n_cols, offs, mask, SILU, DT, HW_CAST)
        scale = row_scale(tl.max(tl.abs(v), axis=0), scale_ub, INT8)
        rcp = tl.math.div_rn(1.0, scale)
        tl.store(q_row + offs, row_codes(v, scale, rcp, HW_CAST, INT8), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = _load_act(x_row, n_cols, offs, offs < n_cols, SILU, DT, HW_CAST)
            amax = tl.maximum(amax, tl.abs(v))
        scale = row_scale(tl.max(amax, axis=0), scale_ub, INT8)
        rcp = tl.math.div_rn(1.0, scale)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            v = _load_act(x_row, n_cols, offs, mask, SILU, DT, HW_CAST)
            tl.store(q_row + offs, row_codes(v, scale, rcp, HW_CAST, INT8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _chunk_amax_kernel(
    x_ptr,  # [T, N] (SILU: [T, 2N] gate | up)
    act_ptr,  # [T, N] silu(gate) * up in x's dtype (written only if SILU)
    amax_ptr,  # [T, C] float32: amax of each chunk
    n_cols,
    stride_x,
    SILU: tl.constexpr,
    DT: tl.constexpr,
    HW_CAST: tl.constexpr,  # compiled for sm 8.9+: hardware roundings (round_dtype's HW)
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Phase 1 of a split row: program (row, c) takes the amax of chunk c. The activation is
    stored in x's dtype, exactly: _load_act already rounded it to that dtype."""
    pdl_enter(PDL)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n_cols
    v = _load_act(x_ptr + row * stride_x, n_cols, offs, mask, SILU, DT, HW_CAST)
    if SILU:
        tl.store(act_ptr + row * n_cols + offs, v.to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(amax_ptr + row * tl.num_programs(1) + c, tl.max(tl.abs(v), axis=0))


@triton.jit
def _chunk_quant_kernel(
    a_ptr,  # [T, N] the values to quantize: x, or phase 1's activation
    amax_ptr,  # [T, C] float32 from phase 1
    q_ptr,  # [T, N] uint8 (e4m3 or int8 bits)
    s_ptr,  # [T] float32
    n_cols,
    stride_a,
    stride_q,
    scale_ub,
    HW_CAST: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two of C
    INT8: tl.constexpr,
    PDL: tl.constexpr,
):
    """Phase 2 of a split row: program (row, c) reduces the row's C chunk amaxes to its scale
    (every program of the row gets the same one) and quantizes chunk c."""
    pdl_enter(PDL)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    n_chunks = tl.num_programs(1)
    chunks = tl.arange(0, BLOCK_C)
    parts = tl.load(amax_ptr + row * n_chunks + chunks, mask=chunks < n_chunks, other=0.0)
    scale = row_scale(tl.max(parts, axis=0), scale_ub, INT8)
    rcp = tl.math.div_rn(1.0, scale)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n_cols
    v = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_q + offs, row_codes(v, scale, rcp, HW_CAST, INT8),
             mask=mask)
    tl.store(s_ptr + row, scale, mask=c == 0)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H] residual in (unused if not HAS_RES)
    w_ptr,  # [H]
    q_ptr,  # [T, H] uint8 (e4m3 or int8 bits)
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
    HW_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
    INT8: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_dtype(x + r, DT, HW_CAST)  # the reference rounds the sum to the dtype first
        tl.store(res_out_ptr + row * stride_ro + offs,
                 x.to(res_out_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # cast back, then scale (HF order)
    v = round_dtype(w * round_dtype(x * rstd, DT, HW_CAST), DT, HW_CAST)
    scale = row_scale(tl.max(tl.abs(v), axis=0), scale_ub, INT8)
    rcp = tl.math.div_rn(1.0, scale)
    tl.store(q_ptr + row * stride_q + offs, row_codes(v, scale, rcp, HW_CAST, INT8),
             mask=mask)
    tl.store(s_ptr + row, scale)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name}: expected [T, C], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"{name}: dtype {x.dtype} not supported; use one of {list(DTYPE_CODES)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _ub(scale_ub: float | None) -> float:
    return float("inf") if scale_ub is None else float(scale_ub)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _launch_split(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, n_cols: int, silu: bool,
                  scale_ub: float | None, chunk: int, int8: bool) -> None:
    """The two phases of split rows (module docstring)."""
    t, n_chunks = x.shape[0], triton.cdiv(n_cols, chunk)
    amax = torch.empty(t, n_chunks, dtype=torch.float32, device=x.device)
    act = torch.empty(t, n_cols, dtype=x.dtype, device=x.device) if silu else x
    grid = (t, n_chunks)
    _chunk_amax_kernel[grid](x, act, amax, n_cols, x.stride(0), SILU=silu,
                             DT=DTYPE_CODES[x.dtype], HW_CAST=hw_fp8_cast(x.device), CHUNK=chunk,
                             num_warps=_warps(chunk), **pdl_args(x.device))
    _chunk_quant_kernel[grid](
        act, amax, q, s, n_cols, act.stride(0), q.stride(0), _ub(scale_ub),
        HW_CAST=hw_fp8_cast(x.device), CHUNK=chunk, BLOCK_C=triton.next_power_of_2(n_chunks),
        INT8=int8, num_warps=_warps(chunk), **pdl_args(x.device))


def _codes(q: torch.Tensor, int8: bool) -> torch.Tensor:
    """The kernels' code bytes as what they are."""
    return q.view(torch.int8 if int8 else FP8_DTYPE)


def _launch_rowwise(x: torch.Tensor, n_cols: int, silu: bool, scale_ub: float | None,
                    max_one_pass: int, chunk: int | None, int8: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of x's rows (``silu``: of silu(gate)·up), e4m3 or ``int8``
    codes; checked inputs (``_rows``). ``chunk`` as in per_token_quant_fp8."""
    t = x.shape[0]
    q = torch.empty(t, n_cols, dtype=torch.uint8, device=x.device)
    s = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if chunk is None:
        chunk = _CHUNK if t <= _SPLIT_MAX_ROWS else n_cols
    elif chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    if t == 0 or n_cols == 0:
        return _codes(q, int8), s
    if n_cols > chunk:
        _launch_split(x, q, s, n_cols, silu, scale_ub, chunk, int8)
    else:
        block = triton.next_power_of_2(n_cols)
        one_pass = block <= max_one_pass
        block = block if one_pass else triton.next_power_of_2(max_one_pass)
        _per_token_quant_kernel[(t,)](
            x, q, s, n_cols, x.stride(0), q.stride(0), _ub(scale_ub),
            SILU=silu, DT=DTYPE_CODES[x.dtype], HW_CAST=hw_fp8_cast(x.device), BLOCK=block,
            ONE_PASS=one_pass, INT8=int8, num_warps=_warps(block), **pdl_args(x.device),
        )
    return _codes(q, int8), s


def per_token_quant_fp8(
    x: torch.Tensor, scale_ub: float | None = None, *, max_one_pass: int = _MAX_ONE_PASS,
    chunk: int | None = None, int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] (fp32/bf16/fp16) → (fp8 [T, N], scale [T, 1] float32), one scale per token.

    ``chunk`` (a power of two): split rows longer than it into pieces of that many columns;
    None: _CHUNK for up to _SPLIT_MAX_ROWS rows, else one program per row (tests force both).
    ``int8``: int8 codes and W8A8's scales (``scale_ub`` unused).
    """
    x = _rows(x, "per_token_quant_fp8")
    return _launch_rowwise(x, x.shape[1], False, scale_ub, max_one_pass, chunk, int8)


def silu_and_mul_quant_fp8(
    x: torch.Tensor, scale_ub: float | None = None, *, max_one_pass: int = _MAX_ONE_PASS,
    chunk: int | None = None, int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 2I] gate | up → silu(gate)·up as (fp8 [T, I], scale [T, 1]); ``chunk`` as in
    per_token_quant_fp8. One row per program: the [T, I] float activation never reaches
    memory; split rows pass it between the two phases in x's dtype."""
    x = _rows(x, "silu_and_mul_quant_fp8")
    if x.shape[1] % 2:
        raise ValueError(f"silu_and_mul_quant_fp8 needs an even last dimension, got {x.shape[1]}")
    return _launch_rowwise(x, x.shape[1] // 2, True, scale_ub, max_one_pass, chunk, int8)


def rms_norm_quant_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    scale_ub: float | None = None, *, int8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + residual) → RMSNorm → (fp8 [T, H], scale [T, 1], new residual [T, H]); ``int8``:
    int8 codes with W8A8's scales instead (no bound).

    The new residual is x itself when no residual is given, as in ``rms_norm_ref``. One program
    per row even for one token: a 4096-wide row is a small job for one SM.
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
            HAS_RES=residual is not None, DT=DTYPE_CODES[x.dtype],
            HW_CAST=hw_fp8_cast(x.device), BLOCK=block, INT8=int8, num_warps=_warps(block),
            **pdl_args(x.device),
        )
    return _codes(q, int8), s, res_out
