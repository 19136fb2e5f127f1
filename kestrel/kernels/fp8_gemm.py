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
int8 operands (W8A8) are summed exactly in int32 either way; one row of them goes through
``dp4a`` on 32-bit words of four codes (``dp4a_loop``: int8 → float conversions, a quarter of
the FMA rate, held that GEMV to 2/3 of fp8's bandwidth).
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

import torch
import triton
import triton.language as tl

from kestrel.kernels.pdl import pdl_args, pdl_enter, pdl_release, pdl_wait
from kestrel.kernels.rounding import DTYPE_CODES, round_dtype, silu_rounded
from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model, sm_count
from kestrel.kernels.skinny_loops import dot_loop, dp4a_loop, fma_loop, load_w, word_ptrs
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
    SCALED: tl.constexpr,  # fp8 (or INT8: int8) operands with row scales; False: plain x·wᵀ
    INT8: tl.constexpr,
    DP4A: tl.constexpr,  # INT8, one row, in whole 32-bit words: skinny_loops.dp4a_loop
    DOT_F32: tl.constexpr,  # unscaled dot in float32, IEEE (float32 operands; see _launch)
    GLU: tl.constexpr,  # x is [silu(gate) | up], multiplied as loaded (skinny_loops._load_x)
    SILU: tl.constexpr,
    HW: tl.constexpr,  # compiled for a GPU: round_dtype's hardware rounding
    RELEASE_LATE: tl.constexpr,  # PDL: the next kernel is a GEMV (see kernels.pdl)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (kernels.pdl)
    AHEAD: tl.constexpr,  # FMA: K steps loaded together (SkinnyConfig.ahead)
):
    if not RELEASE_LATE:
        pdl_release(PDL)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamped rows: loads need no mask along N or M; the duplicates are computed, never stored.
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if DP4A:  # int8 read as 32-bit words: offsets and K count words
        k_end = K // 4
        offs_k = k_lo // 4 + tl.arange(0, BLOCK_K // 4)
        w_ptrs = word_ptrs(w_ptr, rows_n, stride_wn, offs_k)  # [BLOCK_N, BLOCK_K / 4]
        x_ptrs = word_ptrs(x_ptr, rows_m, stride_xm, offs_k)  # [1, BLOCK_K / 4]
    else:
        k_end = K
        offs_k = k_lo + tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    # Every split has at least one K step. Its weights are loaded before waiting for the kernel
    # that writes x: under PDL they stream while that kernel still runs.
    w_first = load_w(w_ptrs, offs_k, k_end, EVEN_K, W_EVICT)
    pdl_wait(PDL)
    if DP4A:
        acc = dp4a_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, k_end, BLOCK_K, EVEN_K,
                        W_EVICT, HW)
    elif USE_DOT:
        acc = dot_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_M, BLOCK_N,
                       BLOCK_K, EVEN_K, W_EVICT, SCALED, DOT_F32, GLU, DT, HW, INT8)
    else:
        acc = fma_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_N, BLOCK_K,
                       EVEN_K, W_EVICT, BROADCAST_X, PREFETCH, GLU, DT, HW, AHEAD, INT8)
    if RELEASE_LATE:
        pdl_release(PDL)
    if SCALED:
        ws = tl.load(ws_ptr + rows_n)
        xs = tl.load(xs_ptr + rows_m)
        y = acc * xs[None, :] * ws[:, None]  # [BLOCK_N, BLOCK_M], the references' order
    else:
        y = acc
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    offs = offs_m[None, :] * N + offs_n[:, None]  # out is [M, N] row-major: N is contiguous
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + offs, y, mask=mask)
    else:
        y = _rounded_out(y, offs_n[:, None], silu_cols, DT, SILU, HW)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, numel, n_cols, silu_cols, SPLIT_K: tl.constexpr,
                       DT: tl.constexpr, SILU: tl.constexpr, HW: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    """p [SPLIT_K, numel] float32 → out [numel]: the partials summed in split order, rounded
    (rows of ``n_cols``; ``SILU`` as in the skinny kernel)."""
    pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
    y = _rounded_out(acc, offs % n_cols, silu_cols, DT, SILU, HW)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _operands(xq, x_scale, wq, w_scale, out_dtype):
    """Validate; return K-contiguous 8-bit operands (both fp8, or both int8) and flat float32
    scales."""
    if xq.dtype != wq.dtype or xq.dtype not in (FP8_DTYPE, torch.int8):
        raise ValueError(f"fp8_gemm_small_m: operands must be {FP8_DTYPE} (or both int8), got "
                         f"{xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"fp8_gemm_small_m: shapes {tuple(xq.shape)} × {tuple(wq.shape)}ᵀ "
                         "do not multiply ([M, K] and [N, K] expected)")
    if x_scale.numel() != xq.shape[0] or w_scale.numel() != wq.shape[0]:
        raise ValueError(f"fp8_gemm_small_m: scales {tuple(x_scale.shape)} and "
                         f"{tuple(w_scale.shape)}, expected one per row of x and of w")
    if out_dtype not in DTYPE_CODES:
        raise ValueError(f"fp8_gemm_small_m: out_dtype {out_dtype} not one of "
                         f"{list(DTYPE_CODES)}")
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).to(torch.float32).contiguous()
    return xq, xs, wq, ws


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
            glu: bool = False) -> torch.Tensor:
    """The skinny kernel (and the split-K sum) on validated, K-contiguous operands, M, N, K > 0
    (``silu_cols``, ``glu``: see bf16_gemm_small_m)."""
    m, (n, k) = x.shape[0], w.shape
    dt = DTYPE_CODES[out.dtype]
    block_m = min(64, max(16, triton.next_power_of_2(m))) if cfg.use_dot else 1
    k_steps = triton.cdiv(k, cfg.block_k)
    steps_per_split = triton.cdiv(k_steps, min(cfg.split_k, k_steps))
    split = triton.cdiv(k_steps, steps_per_split)  # no empty split
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, block_m))
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
        PREFETCH=cfg.prefetch, AHEAD=run_ahead(cfg, k), SCALED=scaled,
        INT8=w.dtype == torch.int8, DP4A=_dp4a_fits(x, w, cfg), DOT_F32=dot_f32, GLU=glu,
        SILU=silu_cols > 0,
        HW=_compiled(), RELEASE_LATE=silu_cols > 0 and split == 1, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_args(x.device),
    )
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
            dst, out, m * n, n, silu_cols, SPLIT_K=split, DT=dt, SILU=silu_cols > 0,
            HW=_compiled(), BLOCK=_SUM_BLOCK, num_warps=4,
            **pdl_args(x.device))
    return out


def _dp4a_fits(x: torch.Tensor, w: torch.Tensor, cfg: SkinnyConfig) -> bool:
    """int8 operands of one row per program that read as whole 32-bit words (else the FMA
    loop's int32 products, the same sums)."""
    return (w.dtype == torch.int8 and not cfg.use_dot and cfg.block_k % 4 == 0
            and all(t.shape[1] % 4 == 0 and t.stride(0) % 4 == 0 and t.data_ptr() % 4 == 0
                    for t in (x, w)))


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
    """xq [M, K] fp8, x_scale [M, 1], wq [N, K] fp8, w_scale [N, 1] (or [1, N]) → [M, N]; or
    both operands int8 (W8A8's codes: kernels/int8_w8a8.int8_gemm_small_m).

    Computes ``fp8_matmul_emulated``'s function with float32 accumulation; ``config``
    overrides ``default_config`` (tests, tuning); ``out``: a contiguous [M, N] tensor of
    ``out_dtype`` to write. CUDA-graph safe: no host synchronisation.
    """
    xq, xs, wq, ws = _operands(xq, x_scale, wq, w_scale, out_dtype)
    (m, k), n = xq.shape, wq.shape[0]
    out = _out_tensor("fp8_gemm_small_m", out, m, n, out_dtype, xq.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    dev = xq.device
    cfg = config or default_config(m, n, k, sm_count(dev.type, dev.index),
                                   gpu=gpu_model(dev.type, dev.index),
                                   int8=wq.dtype == torch.int8)
    return _launch(xq, xs, wq, ws, out, cfg, scaled=True)


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
    dev = x.device
    cfg = config or default_config(m, n, k, sm_count(dev.type, dev.index),
                                   elem_bytes=w.element_size(), gpu=gpu_model(dev.type, dev.index))
    # x, w in place of the unread scales
    return _launch(x, x, w, w, out, cfg, scaled=False, silu_cols=silu_cols, glu=glu)
