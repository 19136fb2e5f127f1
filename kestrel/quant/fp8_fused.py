"""Activations quantized by the kernel that produces them: the decoder's norms and SwiGLU.

Unfused, an FP8 layer reads its float input a second time to quantize it (per_token_quant_fp8):
at 4096 tokens that pass costs down_proj most of its FP8 gain, and at one token it is one more
launch per layer. Here post_attention_layernorm emits fp8 + per-token scales for gate_up_proj
and input_layernorm for qkv_proj when attention is FP8 too (``rms_norm_quant_fp8``), and SwiGLU
emits them for down_proj (``silu_and_mul_quant_fp8``). Each layer still runs its own forward
(bias after the all-reduce, gather): it is handed a ``QuantInput`` instead of a float tensor,
and ``Fp8LinearMethod.apply`` skips its quantize pass. W8A8 layers (``takes_codes``) take the
same route with int8 codes: the kernels' ``int8`` mode.

``kestrel.executor.loading.use_triton_kernels`` installs ``fp8_norm_input`` and
``fp8_norm_mlp`` as a decoder layer's ``norm_input`` and ``norm_mlp`` (plain:
``kestrel.models.llama.norm_input_ref``, ``norm_mlp_ref``), the same swap as RMSNorm.impl, so
the CPU path never sees them. Oracles: the plain ones, with quantization inside the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kestrel.kernels.fp8_quant import rms_norm_quant_fp8, silu_and_mul_quant_fp8
from kestrel.models.llama import norm_input_ref
from kestrel.quant.fp8 import Fp8LinearMethod
from kestrel.quant.fp8_ops import QuantInput
from kestrel.quant.w8a8 import W8A8LinearMethod

if TYPE_CHECKING:
    from kestrel.layers.norm import RMSNorm
    from kestrel.models.llama import LlamaMLP


def row_quantized(layer: nn.Module) -> Fp8LinearMethod | W8A8LinearMethod | None:
    """The layer's method if it takes per-token codes and scales (what the fused kernels emit):
    row-wise FP8, or W8A8.

    Per-tensor layers need one scale for the whole batch, which a row kernel cannot know;
    LLM.int8() needs the float input for its outlier columns.
    """
    qm = getattr(layer, "quant_method", None)
    if isinstance(qm, Fp8LinearMethod) and not qm.per_tensor:
        return qm
    return qm if isinstance(qm, W8A8LinearMethod) and qm.takes_codes else None


def _codes_for(qm) -> dict:
    """The fused kernels' arguments for this method's codes: FP8's scale bound, or int8."""
    if isinstance(qm, W8A8LinearMethod):
        return {"scale_ub": None, "int8": True}
    return {"scale_ub": qm.activation_scale_ub}


def uses_fp8_producers(mlp: LlamaMLP) -> bool:
    """Would ``fp8_norm_mlp`` fuse anything in this MLP (else keep the plain path)?"""
    return row_quantized(mlp.gate_up_proj) is not None or row_quantized(mlp.down_proj) is not None


def fp8_norm_input(norm: RMSNorm, layer: nn.Module, x: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[QuantInput | torch.Tensor, torch.Tensor]:
    """Drop-in for norm_input_ref: (x + residual) → RMSNorm → the input of ``layer``, as its
    codes (fp8 or int8) and per-token scales in one kernel when ``row_quantized(layer)`` (else
    the float tensor, as on the plain path); and the new residual (x itself when none is
    given)."""
    qm = row_quantized(layer)
    if qm is None:
        return norm_input_ref(norm, layer, x, residual)
    q, s, residual = rms_norm_quant_fp8(norm.reduced(x), norm.weight, norm.eps, residual,
                                        **_codes_for(qm))  # [T, H] codes, [T, 1]
    return QuantInput(q, s), residual


def fp8_norm_mlp(norm: RMSNorm, mlp: LlamaMLP, x: torch.Tensor,
                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for norm_mlp_ref: (x + residual) → RMSNorm → gate_up → SwiGLU → down.

    x, residual [T, H] → (MLP output [T, H], new residual [T, H]). A layer that takes no codes
    (``row_quantized``) gets the float tensor, as on the plain path.
    """
    h, residual = fp8_norm_input(norm, mlp.gate_up_proj, x, residual)
    h = mlp.gate_up_proj(h)  # [T, 2I]
    qm = row_quantized(mlp.down_proj)
    if qm is None:
        return mlp.down_proj(mlp.act(h)), residual
    q, s = silu_and_mul_quant_fp8(h, **_codes_for(qm))  # [T, I] codes, [T, 1]
    return mlp.down_proj(QuantInput(q, s)), residual
