"""FP8 GEMM for a few rows (decode): y [M, N] = (xs·xq)(ws·wq)ᵀ, reading each weight byte once.

    fp8_gemm_small_m ~ kestrel.quant.fp8_ops.fp8_matmul_emulated

At M ≤ 16 a GEMM is a weight stream (2·M flops per weight byte), so its time should be weight
bytes / copy bandwidth. torch._scaled_mm (CUTLASS, tuned for large M) pads M to its tile and
launches few blocks for a skinny problem. Here each program owns a BLOCK_N slice of the output
columns (and with split-K a slice of K), streams its fp8 weight rows along K in 16-byte vectors,
and multiplies by x_scale · w_scale once, at the end.

Two inner products, picked by the config (``default_config``: by M; the loops live in
``skinny_loops``):
  FMA (one x row per program): CUDA-core multiply-add into a [BLOCK_N, BLOCK_K] float32
      accumulator, reduced along K once after the loop, so the loop has no cross-lane traffic.
  dot (M > 1): tensor-core tl.dot of the fp8 tiles, computed transposed, acc [BLOCK_N, BLOCK_M]
      = w · xᵀ, so the weight slice fills the MMA's 64-row side and x pads only to 16 rows.
      fp8 MMAs on Hopper accumulate in reduced precision; promoting to float32 after every
      BLOCK_K (``max_num_imprecise_acc``) limits that to BLOCK_K products per partial sum.
Split-K writes float32 partials [S, M, N]; a second kernel sums them in a fixed order (the
result does not depend on scheduling, unlike atomics). Outputs are rounded half-to-even
explicitly (``round_dtype``), as torch casts, also under the interpreter (which truncates).

    bf16_gemm_small_m(x, w) ~ x.float() @ w.float().T, rounded to x's dtype

The same kernel without scales (``SCALED=False``) for 16-bit or float32 weights, to measure it
against cuBLAS at decode (``bench_fp8_gemm.py --sweep-bf16``); configs count K in elements, so
``default_config(..., elem_bytes=2)`` halves block_k to keep 16-byte vectors. Its tensor-core
dot needs no imprecise-accumulation bound (16-bit MMAs accumulate in float32) and runs float32
inputs in full precision (``input_precision="ieee"``: no TF32 rounding, and no tensor cores).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kestrel.kernels.pdl import pdl_args, pdl_enter, pdl_release, pdl_wait
from kestrel.kernels.rounding import DTYPE_CODES, round_dtype, scale_of, silu_rounded
from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model, sm_count
from kestrel.kernels.skinny_loops import dot_loop, fma_loop, load_w
from kestrel.quant.fp8_ops import FP8_DTYPE

_SUM_BLOCK = 1024  # outputs per program of the split-K reduction


@triton.jit
def _rounded_out(y, cols, silu_cols, DT: tl.constexpr, SILU: tl.constexpr, HW: tl.constexpr):
    """Float32 outputs rounded to the output dtype; ``SILU``: columns below ``silu_cols`` (the
    gate half of gate_up) then through silu, rounded again, as F.silu on the rounded gate."""
    y = round_dtype(y, DT)
    if SILU:
        y = tl.where(cols < silu_cols, silu_rounded(y, DT, HW), y)
    return y


@triton.jit
def _swiglu(gate, up, DT: tl.constexpr, HW: tl.constexpr):
    """silu(gate)·up of float32 gate_up outputs, with silu_and_mul_ref's rounding points on
    gate_up's rounded output."""
    return round_dtype(silu_rounded(round_dtype(gate, DT, HW), DT, HW)
                       * round_dtype(up, DT, HW), DT, HW)


@triton.jit
def _swiglu_out(y, pid_n, offs_m, M, n_act, out_ptr, amax_ptr, BLOCK_N: tl.constexpr,
                DT: tl.constexpr, HW: tl.constexpr):
    """PAIR_GLU's epilogue: y [BLOCK_N, BLOCK_M] holds gate and up of columns pid_n·BLOCK_N/2 +
    0, 1, ... in turn; silu(gate)·up goes to out [M, n_act], and each row's amax of it into
    amax_ptr (atomic max, so in any order: the same value as per_token_quant_fp8's)."""
    BLOCK_M: tl.constexpr = y.shape[1]
    pairs = tl.permute(tl.reshape(y, [BLOCK_N // 2, 2, BLOCK_M]), (0, 2, 1))
    gate, up = tl.split(pairs)  # [BLOCK_N // 2, BLOCK_M] each
    act = _swiglu(gate, up, DT, HW)
    cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask = (cols < n_act)[:, None] & (offs_m < M)[None, :]
    tl.store(out_ptr + offs_m[None, :] * n_act + cols[:, None],
             act.to(out_ptr.dtype.element_ty), mask=mask)
    tl.atomic_max(amax_ptr + offs_m, tl.max(tl.where(mask, tl.abs(act), 0.0), axis=0),
                  mask=offs_m < M)


@triton.jit
def _skinny_kernel(
    x_ptr,  # [M, K] fp8 (SCALED) or w's dtype, K contiguous; GLU: [M, 2K]
    xs_ptr,  # [M] float32; not read unless SCALED
    w_ptr,  # [N, K] fp8 (SCALED) or bf16 / fp16 / float32, K contiguous
    ws_ptr,  # [N] float32; not read unless SCALED
    out_ptr,  # [M, N] output dtype; [S, M, N] float32 partials when SPLIT
    M, N, K,
    stride_xm,
    stride_wn,
    k_per_split,  # a multiple of BLOCK_K
    silu_cols,  # SILU: output columns below it go through silu (see _rounded_out)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    DT: tl.constexpr,
    W_EVICT: tl.constexpr,  # eviction policy of weight loads: "" or "evict_first"
    BROADCAST_X: tl.constexpr,
    PREFETCH: tl.constexpr,  # FMA: tiles loaded a step ahead (SkinnyConfig.prefetch)
    SCALED: tl.constexpr,  # fp8 operands with row scales; False: plain x·wᵀ
    DOT_F32: tl.constexpr,  # unscaled dot in float32, IEEE (float32 operands; see _launch)
    GLU: tl.constexpr,  # x is [silu(gate) | up], multiplied as loaded (skinny_loops._load_x)
    SILU: tl.constexpr,
    HW: tl.constexpr,  # compiled for a GPU: round_dtype's hardware rounding
    RELEASE_LATE: tl.constexpr,  # PDL: the next kernel is a GEMV (see kernels.pdl)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels.pdl)
    AHEAD: tl.constexpr,  # FMA: K steps loaded together (SkinnyConfig.ahead)
    amax_ptr,  # [M] float32: PAIR_GLU's row amaxes (atomic max), QUANT_X's x amaxes
    scale_ub,  # QUANT_X: upper bound of x's amax (scale_of)
    PAIR_GLU: tl.constexpr,  # fp8 gate_up → silu(gate)·up [M, silu_cols] and its row amaxes
    QUANT_X: tl.constexpr,  # fp8 w, 16-bit x quantized as loaded (scale from amax_ptr)
):
    if not RELEASE_LATE:
        pdl_release(PDL)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamped rows: loads need no mask along N or M; the duplicates are computed, never stored.
    if PAIR_GLU:  # rows gate c, up c, gate c + 1, up c + 1, ... (silu_cols: up's offset)
        pairs = tl.arange(0, BLOCK_N)
        cols = pid_n * (BLOCK_N // 2) + pairs // 2
        offs_n = tl.minimum(cols, silu_cols - 1) + (pairs % 2) * silu_cols
        rows_n = offs_n.to(tl.int64)
        cols_in = cols < silu_cols
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
        cols_in = offs_n < N
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # Every split has at least one K step. Its weights are loaded before waiting for the kernel
    # that writes x: under PDL they stream while that kernel still runs.
    w_first = load_w(w_ptrs, offs_k, K, EVEN_K, W_EVICT)
    pdl_wait(PDL)
    xs = tl.full([BLOCK_M], 1.0, tl.float32)
    if QUANT_X:  # x's scales from the amaxes its producer accumulated (fp8_gemm_dynamic_x)
        xs = scale_of(tl.load(amax_ptr + rows_m), scale_ub)
    x_scale, x_rcp = xs[:, None], tl.math.div_rn(1.0, xs)[:, None]  # QUANT_X's, [BLOCK_M, 1]
    if USE_DOT:
        acc = dot_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_M, BLOCK_N,
                       BLOCK_K, EVEN_K, W_EVICT, SCALED, DOT_F32, GLU, DT, HW, QUANT_X,
                       x_scale, x_rcp)
    else:
        acc = fma_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_N, BLOCK_K,
                       EVEN_K, W_EVICT, BROADCAST_X, PREFETCH, GLU, DT, HW, AHEAD, QUANT_X,
                       x_scale, x_rcp)
    if RELEASE_LATE:
        pdl_release(PDL)
    if SCALED:
        ws = tl.load(ws_ptr + rows_n)
        if not QUANT_X:
            xs = tl.load(xs_ptr + rows_m)
        y = acc * ws[:, None] * xs[None, :]  # [BLOCK_N, BLOCK_M]
    else:
        y = acc
    mask = cols_in[:, None] & (offs_m < M)[None, :]
    offs = offs_m[None, :] * N + offs_n[:, None]  # out is [M, N] row-major: N is contiguous
    if SPLIT:  # PAIR_GLU too: the partials of gate_up's columns, SwiGLU in the sum
        tl.store(out_ptr + pid_k * M * N + offs, y, mask=mask)
    elif PAIR_GLU:
        _swiglu_out(y, pid_n, offs_m, M, silu_cols, out_ptr, amax_ptr, BLOCK_N, DT, HW)
    else:
        y = _rounded_out(y, offs_n[:, None], silu_cols, DT, SILU, HW)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits(p_ptr, offs, mask, numel, SPLIT_K: tl.constexpr):
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, numel, n_cols, silu_cols, amax_ptr,
                       SPLIT_K: tl.constexpr, DT: tl.constexpr, SILU: tl.constexpr,
                       PAIR_GLU: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    """p [SPLIT_K, numel] float32 → out [numel]: the partials summed in split order, rounded
    (rows of ``n_cols``; ``SILU`` as in the skinny kernel). ``PAIR_GLU``: out [M, silu_cols]
    is silu(gate)·up of gate_up's partials, its row amaxes max-ed into amax_ptr."""
    pdl_enter(PDL)
    if PAIR_GLU:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [M, silu_cols] elements
        row = offs // silu_cols
        mask = row * n_cols < numel
        gate_at = row * n_cols + offs % silu_cols
        act = _swiglu(_sum_splits(p_ptr, gate_at, mask, numel, SPLIT_K),
                      _sum_splits(p_ptr, gate_at + silu_cols, mask, numel, SPLIT_K), DT, HW)
        tl.store(out_ptr + offs, act.to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_max(amax_ptr + row, tl.abs(act), mask=mask)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        y = _rounded_out(_sum_splits(p_ptr, offs, mask, numel, SPLIT_K), offs % n_cols,
                         silu_cols, DT, SILU, HW)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _operands(xq, x_scale, wq, w_scale, out_dtype):
    """Validate; return K-contiguous fp8 operands and flat float32 scales."""
    if xq.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm_small_m: operands must be {FP8_DTYPE}, got {xq.dtype}")
    if xq.dim() != 2 or x_scale.numel() != xq.shape[0]:
        raise ValueError(f"fp8_gemm_small_m: x {tuple(xq.shape)} with scales "
                         f"{tuple(x_scale.shape)}: expected [M, K] and one per row")
    wq, ws = _weight(wq, w_scale, xq.shape[1], out_dtype)
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    return xq, x_scale.reshape(-1).to(torch.float32).contiguous(), wq, ws


def _weight(wq, w_scale, k: int, out_dtype):
    """Validate the fp8 weight [N, k] and its row scales; K-contiguous weight, flat scales."""
    if wq.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm_small_m: operands must be {FP8_DTYPE}, got {wq.dtype}")
    if wq.dim() != 2 or wq.shape[1] != k:
        raise ValueError(f"fp8_gemm_small_m: shapes [M, {k}] × {tuple(wq.shape)}ᵀ "
                         "do not multiply ([M, K] and [N, K] expected)")
    if w_scale.numel() != wq.shape[0]:
        raise ValueError(f"fp8_gemm_small_m: weight scales {tuple(w_scale.shape)}, expected "
                         "one per row of w")
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"fp8_gemm_small_m: out_dtype {out_dtype} not one of "
                         f"{list(DTYPE_CODES)}")
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    return wq, w_scale.reshape(-1).to(torch.float32).contiguous()


def _out_tensor(name: str, out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name}: out must be a contiguous [{m}, {n}] {dtype} "
                         f"tensor, got {tuple(out.shape)} {out.dtype}")
    return out


def _launch(x: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
            out: torch.Tensor, cfg: SkinnyConfig, scaled: bool, silu_cols: int = 0,
            glu: bool = False, pair_glu: bool = False, amax: torch.Tensor | None = None,
            scale_ub: float = math.inf) -> torch.Tensor:
    """The skinny kernel (and the split-K sum) on validated, K-contiguous operands, M, N, K > 0
    (``silu_cols``, ``glu``: see bf16_gemm_small_m; ``pair_glu``: fp8_gate_up_silu_mul;
    ``amax`` without ``pair_glu``: fp8_gemm_dynamic_x, x's amaxes)."""
    m, (n, k) = x.shape[0], w.shape
    dt = DTYPE_CODES[out.dtype]
    block_m = min(64, max(16, triton.next_power_of_2(m))) if cfg.use_dot else 1
    k_steps = triton.cdiv(k, cfg.block_k)
    steps_per_split = triton.cdiv(k_steps, min(cfg.split_k, k_steps))
    split = triton.cdiv(k_steps, steps_per_split)  # no empty split
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    col_blocks = triton.cdiv(silu_cols, cfg.block_n // 2) if pair_glu else triton.cdiv(
        n, cfg.block_n)
    grid = (col_blocks, split, triton.cdiv(m, block_m))
    # float32 dots in IEEE precision; also bf16 ones under the interpreter, whose tl.dot
    # (Triton 3.9) multiplies bf16 tiles as their raw 16-bit integers. bf16 products are exact
    # in float32, so this is the same function as the GPU's bf16 MMA.
    dot_f32 = not scaled and (w.dtype == torch.float32
                              or (w.dtype == torch.bfloat16 and not _compiled()))
    _skinny_kernel[grid](
        x, xs, w, ws, dst, m, n, k, x.stride(0), w.stride(0),
        steps_per_split * cfg.block_k, silu_cols,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=cfg.use_dot,
        EVEN_K=k % cfg.block_k == 0, SPLIT=split > 1, DT=dt,
        W_EVICT="evict_first" if cfg.evict_first else "", BROADCAST_X=cfg.broadcast_x,
        PREFETCH=cfg.prefetch, AHEAD=run_ahead(cfg, k), SCALED=scaled, DOT_F32=dot_f32, GLU=glu,
        SILU=silu_cols > 0 and not pair_glu,
        HW=_compiled(), RELEASE_LATE=silu_cols > 0 and split == 1, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, amax_ptr=xs if amax is None else amax, scale_ub=scale_ub,
        PAIR_GLU=pair_glu, QUANT_X=amax is not None and not pair_glu,
        **pdl_args(x.device),
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(out.numel(), _SUM_BLOCK),)](
            dst, out, m * n, n, silu_cols, xs if amax is None else amax, SPLIT_K=split, DT=dt,
            SILU=silu_cols > 0 and not pair_glu, PAIR_GLU=pair_glu, HW=_compiled(),
            BLOCK=_SUM_BLOCK, num_warps=4, **pdl_args(x.device))
    return out


def run_ahead(cfg: SkinnyConfig, k: int) -> int:
    """The K-step group a launch of ``cfg`` over K = k uses: cfg.ahead where its groups tile
    every split exactly, else 1 (one step at a time)."""
    k_steps = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(k_steps, min(cfg.split_k, k_steps))
    return cfg.ahead if k_steps % per_split == 0 and per_split % cfg.ahead == 0 else 1


def _compiled() -> bool:
    """Compiled for a GPU, not run by the interpreter (TRITON_INTERPRET=1)?"""
    return isinstance(_skinny_kernel, triton.runtime.JITFunction)


def fp8_gemm_small_m(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, config: SkinnyConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """xq [M, K] fp8, x_scale [M, 1], wq [N, K] fp8, w_scale [N, 1] (or [1, N]) → [M, N].

    Computes ``fp8_matmul_emulated``'s function with float32 accumulation; ``config``
    overrides ``default_config`` (tests, tuning); ``out``: a contiguous [M, N] tensor of
    ``out_dtype`` to write. CUDA-graph safe: no host synchronisation.
    """
    xq, xs, wq, ws = _operands(xq, x_scale, wq, w_scale, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    out = _out_tensor("fp8_gemm_small_m", out, m, n, out_dtype, xq.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    cfg = config or _config(m, n, k, xq.device, 1)
    return _launch(xq, xs, wq, ws, out, cfg, scaled=True)


def fp8_gate_up_silu_mul(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    amax: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """gate_up's FP8 GEMV with SwiGLU in its epilogue, for ``fp8_gemm_dynamic_x`` after it:
    xq [M, K] fp8, x_scale [M, 1], wq [2I, K] fp8 (gate rows, then up rows), w_scale [2I, 1]
    → silu(gate)·up [M, I] in ``out_dtype``, the bits of silu_and_mul_ref on
    ``fp8_gemm_small_m``'s rounded output; each row's amax of it is max-ed into ``amax`` [M]
    float32, which must hold zeros (``rms_norm_quant_fp8``'s ``amax_reset``).

    Each program multiplies gate row c beside up row I + c, so the product is formed in
    registers: no SwiGLU kernel, no quantize kernel between the two GEMVs (with split-K, in
    the kernel that sums the partials).
    """
    xq, xs, wq, ws = _operands(xq, x_scale, wq, w_scale, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    if n % 2:
        raise ValueError(f"fp8_gate_up_silu_mul: {n} weight rows, expected gate and up halves")
    if amax.shape != (m,) or amax.dtype != torch.float32:
        raise ValueError(f"fp8_gate_up_silu_mul: amax must be [{m}] float32, got "
                         f"{tuple(amax.shape)} {amax.dtype}")
    out = torch.empty(m, n // 2, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    cfg = config or _config(m, n, k, xq.device, 1)
    if cfg.block_n < 2 or cfg.block_n % 2:
        raise ValueError(f"fp8_gate_up_silu_mul: block_n {cfg.block_n} must be even")
    return _launch(xq, xs, wq, ws, out, cfg, scaled=True, silu_cols=n // 2, pair_glu=True,
                   amax=amax)


def fp8_gemm_dynamic_x(
    x: torch.Tensor, amax: torch.Tensor, scale_ub: float | None, wq: torch.Tensor,
    w_scale: torch.Tensor, config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or float32), quantized per token as it is loaded (the scale from ``amax`` [M], x's
    row amaxes, as ``per_token_quant_fp8``: clamped to ``scale_ub``, / 448), × wq [N, K] fp8,
    w_scale [N, 1] → [M, N] in x's dtype: ``fp8_gemm_small_m`` of per_token_quant_fp8(x),
    bit for bit, without the quantize pass (down_proj after ``fp8_gate_up_silu_mul``)."""
    if x.dtype not in DTYPE_CODES or x.dim() != 2:
        raise ValueError(f"fp8_gemm_dynamic_x: x must be [M, K] of {list(DTYPE_CODES)}, got "
                         f"{tuple(x.shape)} {x.dtype}")
    wq, ws = _weight(wq, w_scale, x.shape[1], x.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    (m, k), n = x.shape, wq.shape[0]
    if amax.shape != (m,) or amax.dtype != torch.float32:
        raise ValueError(f"fp8_gemm_dynamic_x: amax must be [{m}] float32, got "
                         f"{tuple(amax.shape)} {amax.dtype}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    cfg = config or _config(m, n, k, x.device, 1)
    return _launch(x, amax, wq, ws, out, cfg, scaled=True, amax=amax,
                   scale_ub=math.inf if scale_ub is None else float(scale_ub))


def _config(m: int, n: int, k: int, dev: torch.device, elem_bytes: int) -> SkinnyConfig:
    return default_config(m, n, k, sm_count(dev.type, dev.index), elem_bytes=elem_bytes,
                          gpu=gpu_model(dev.type, dev.index))


def bf16_gemm_small_m(x: torch.Tensor, w: torch.Tensor, config: SkinnyConfig | None = None,
                      out: torch.Tensor | None = None, *, silu_cols: int = 0,
                      glu: bool = False) -> torch.Tensor:
    """x [M, K], w [N, K] of one dtype (bf16, fp16 or float32) → x·wᵀ [M, N] in that dtype.

    ``fp8_gemm_small_m``'s kernel without scales: float32 accumulation, the output rounded
    once (half to even). ``config`` overrides ``default_config(..., elem_bytes)``, whose
    ``TUNED_16BIT`` is this function's table; ``out``: a contiguous [M, N] tensor of x's dtype.
    CUDA-graph safe: no host synchronisation.

    SwiGLU folded into two GEMVs, so no kernel runs between them: ``silu_cols`` = I applies
    F.silu to output columns [0, I) (gate_up's gate half), and ``glu=True`` takes such an
    output, x = [silu(gate) | up] of shape [M, 2K], as the input silu(gate)·up; together,
    bit for bit, ``silu_and_mul_ref`` between the two products.
    """
    if x.dtype not in DTYPE_CODES or w.dtype != x.dtype:
        raise ValueError(f"bf16_gemm_small_m: x and w must have one dtype of "
                         f"{list(DTYPE_CODES)}, got {x.dtype} and {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] * (2 if glu else 1):
        raise ValueError(f"bf16_gemm_small_m: shapes {tuple(x.shape)} × {tuple(w.shape)}ᵀ "
                         f"do not multiply ([M, {'2K' if glu else 'K'}] and [N, K] expected)")
    if not 0 <= silu_cols <= w.shape[0]:
        raise ValueError(f"bf16_gemm_small_m: silu_cols {silu_cols} outside [0, {w.shape[0]}]")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    m, (n, k) = x.shape[0], w.shape
    out = _out_tensor("bf16_gemm_small_m", out, m, n, x.dtype, x.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    cfg = config or _config(m, n, k, x.device, w.element_size())
    # x, w in place of the unread scales
    return _launch(x, x, w, w, out, cfg, scaled=False, silu_cols=silu_cols, glu=glu)
