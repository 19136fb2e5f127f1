"""FP8 (e4m3) numerics: quantization references, the scaled GEMM and where each GEMM runs.

Split from ``kestrel.quant.fp8`` (which re-exports these names) so the QuantMethod reads on its
own. Everything here is a pure function of tensors; the references are the oracles of the Triton
kernels in ``kestrel.kernels.fp8_quant`` and ``kestrel.kernels.fp8_gemm``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch

from kestrel.layers.activation import silu_and_mul_ref
from kestrel.layers.norm import rms_norm_ref

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# scale = amax · (1/448): a multiply rounds the same way everywhere, while "amax / 448" is an
# IEEE division on CPU but a multiply by the reciprocal in torch's CUDA kernels (scalar divisor).
INV_FP8_MAX = 1.0 / FP8_MAX
AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny positive scale instead of 0/0
_CHUNK_ELEMS = 1 << 24  # float32 temporaries of weight (de)quantization stay under 64 MiB
# Batches of up to this many rows go to the Triton skinny GEMM on CUDA (a weight stream, where
# torch._scaled_mm pads tiles of 64+ rows); larger ones to _scaled_mm. Tune it on the GPU with
# tests/quant/bench_fp8_gemm.py, which prints the crossover for the Llama 3 8B FFN shapes.
SMALL_M_MAX = 16


class QuantInput(NamedTuple):
    """An activation its producer already quantized (fused RMSNorm / SwiGLU + quantize).

    Handed to a row-wise FP8 or a W8A8 layer's forward in place of the float tensor: the layer's
    own forward (bias, all-reduce, gather) runs unchanged while its method's ``apply`` skips the
    quantize pass.
    """

    q: torch.Tensor  # [T, in] fp8 codes (FP8 layers) or int8 codes (W8A8)
    scale: torch.Tensor  # float32 [T, 1]

# ----------------------------------------------------------------------------- references


def quantize_rowwise_ref(
    x: torch.Tensor, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] → (fp8 [R, C], scale [R, 1] float32) with x ≈ fp8 · scale, row by row.

    scale = clamp(row amax, AMAX_FLOOR, scale_ub) · (1/448); values past a clamped amax saturate
    at ±448. This is the oracle of the Triton kernel in ``kestrel.kernels.fp8_quant``.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    ub = math.inf if scale_ub is None else scale_ub
    scale = amax.clamp(min=AMAX_FLOOR, max=ub) * INV_FP8_MAX
    return cast_fp8(xf / scale), scale


def cast_fp8(y: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even cast (a plain cast turns |y| > 448 into NaN)."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale  # fp8 [R, C] · scale ([R, 1], [1, C] or scalar) → float32


def silu_and_mul_quant_ref(
    x: torch.Tensor, scale_ub: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 2I] gate | up → fp8 [T, I] + scales [T, 1]: the unfused model path, then quantize."""
    return quantize_rowwise_ref(silu_and_mul_ref(x), scale_ub)


def rms_norm_quant_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    scale_ub: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + residual) → RMSNorm → fp8: returns (fp8 [T, H], scale [T, 1], new residual [T, H])."""
    normed, res = rms_norm_ref(x, weight, eps, residual)
    q, s = quantize_rowwise_ref(normed, scale_ub)
    return q, s, res


def quantize_weight(
    w: torch.Tensor, per_tensor: bool = False, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float → (fp8 [out, in], scale [out, 1] float32), in row chunks.

    Chunking bounds the float32 temporaries, so a 405B projection can be quantized on the GPU it
    is loaded to. Per-tensor: every row gets the one tensor scale. Raises ValueError (naming
    ``name``) when the weight holds inf or NaN.
    """
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    rows = max(1, _CHUNK_ELEMS // max(1, w.shape[1]))
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    if per_tensor:
        amax = torch.stack([c.float().abs().amax() for c in w.split(rows)]).amax()  # NaN stays
        scale.copy_((amax.clamp(min=AMAX_FLOOR) * INV_FP8_MAX).expand_as(scale))
    for start in range(0, w.shape[0], rows):
        chunk = w[start:start + rows]
        if per_tensor:
            q[start:start + rows] = cast_fp8(chunk.float() / scale[start:start + rows])
        else:
            q[start:start + rows], scale[start:start + rows] = quantize_rowwise_ref(chunk)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}: weight holds inf or NaN values; cannot quantize it to FP8")
    return q, scale


def quantize_activation(
    x: torch.Tensor, scale_ub: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 quantization of x [T, C]: the Triton kernel on CUDA, the reference elsewhere."""
    if x.is_cuda:
        from kestrel.kernels.fp8_quant import per_token_quant_fp8

        return per_token_quant_fp8(x, scale_ub)
    return quantize_rowwise_ref(x, scale_ub)


# ----------------------------------------------------------------------------- GEMM


def fp8_matmul_emulated(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq [T, in] fp8, x_scale [T, 1], wq [out, in] fp8, w_scale [out, 1] → [T, out].

    The same function as the fused GEMM, in float32: dequantize both operands, multiply, cast.
    The weight is dequantized a chunk of rows at a time so no float32 copy of it persists.
    """
    xd = dequantize(xq, x_scale)  # [T, in]
    out = torch.empty(xq.shape[0], wq.shape[0], dtype=out_dtype, device=xq.device)
    rows = max(1, _CHUNK_ELEMS // max(1, wq.shape[1]))
    for start in range(0, wq.shape[0], rows):
        wd = dequantize(wq[start:start + rows], w_scale[start:start + rows])  # [rows, in]
        out[:, start:start + rows] = (xd @ wd.t()).to(out_dtype)
    return out


def fp8_matmul(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype, use_scaled_mm: bool, small_m_max: int = 0,
    fast_accum: bool = False,
) -> torch.Tensor:
    """Row-wise scaled FP8 GEMM: [T, in] × [out, in]ᵀ → [T, out] in ``out_dtype``.

    The one place that picks the kernel by T, from what the layer found at load time: T ≤
    ``small_m_max`` (decode) → the Triton skinny GEMM; else torch._scaled_mm (``fast_accum``:
    its partial sums stay at the tensor cores' precision, not promoted to float32); else
    emulation (float32 sums either way).
    """
    t = xq.shape[0]
    if 0 < t <= small_m_max:
        from kestrel.kernels.fp8_gemm import fp8_gemm_small_m

        return fp8_gemm_small_m(xq, x_scale, wq, w_scale, out_dtype)
    if not use_scaled_mm or t == 0:
        return fp8_matmul_emulated(xq, x_scale, wq, w_scale, out_dtype)
    # wq [out, in] row-major is wq.t() [in, out] column-major: the layout _scaled_mm wants.
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


@functools.cache
def _scaled_mm_works(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Does row-wise torch._scaled_mm run here, and agree with the emulation? Probed once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen).to(device)
    w = torch.randn(16, 32, generator=gen).to(device)
    xq, xs = quantize_rowwise_ref(x)
    wq, ws = quantize_rowwise_ref(w)
    try:
        got = fp8_matmul(xq, xs, wq, ws, out_dtype, use_scaled_mm=True).float()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    want = fp8_matmul_emulated(xq, xs, wq, ws, torch.float32)
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))


def select_fp8_gemm(device: torch.device, out_dtype: torch.dtype, in_features: int,
                    out_features: int) -> bool:
    """True: use torch._scaled_mm; False: emulate. The one place that picks the FP8 GEMM."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            warnings.warn(f"GPU capability {cap[0]}.{cap[1]} has no FP8 matmul (needs 8.9+): "
                          "emulating FP8 layers in float32 (correct, slow)", RuntimeWarning,
                          stacklevel=2)
            return False
        if in_features % 16 or out_features % 16:
            warnings.warn(f"FP8 layer {out_features}x{in_features} is not a multiple of 16: "
                          "emulating it in float32", RuntimeWarning, stacklevel=2)
            return False
    ok = _scaled_mm_works(device, out_dtype)
    if not ok and device.type == "cuda":
        warnings.warn(f"torch._scaled_mm with row-wise scales and {out_dtype} output fails on "
                      f"{device}: emulating FP8 layers in float32", RuntimeWarning, stacklevel=2)
    return ok


@functools.cache
def _small_m_works(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Does the Triton skinny GEMM compile here and agree with the emulation? Probed once."""
    from kestrel.kernels.fp8_gemm import fp8_gemm_small_m

    gen = torch.Generator().manual_seed(0)
    for t in (1, 5):  # both inner products: CUDA-core FMA (one row) and tensor-core dot
        xq, xs = quantize_rowwise_ref(torch.randn(t, 256, generator=gen).to(device))
        wq, ws = quantize_rowwise_ref(torch.randn(48, 256, generator=gen).to(device))
        try:
            got = fp8_gemm_small_m(xq, xs, wq, ws, out_dtype).float()
        except Exception as e:  # noqa: BLE001 - Triton compile errors have many types
            warnings.warn(f"Triton FP8 skinny GEMM fails on {device}: {e!r}", RuntimeWarning,
                          stacklevel=2)
            return False
        want = fp8_matmul_emulated(xq, xs, wq, ws, torch.float32)
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
            return False
    return True


def select_small_m_gemm(device: torch.device, out_dtype: torch.dtype) -> int:
    """Rows up to which ``fp8_matmul`` runs the Triton skinny GEMM on this device (0: never).

    CUDA with native FP8 conversion (8.9+) only: on CPU the interpreter would be slow, and
    _scaled_mm or the emulation already serve every T there.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return 0
    if not _small_m_works(device, out_dtype):
        warnings.warn(f"Triton FP8 skinny GEMM disagrees or fails on {device}: small batches "
                      "use torch._scaled_mm", RuntimeWarning, stacklevel=2)
        return 0
    return SMALL_M_MAX
