"""LLM.int8() (Dettmers et al., 2022; the seeds' talk, 003): 8-bit weights and activations with
the outlier features kept in the activation dtype.

    int8 linear ~ x · Wᵀ, with W stored as int8 codes × one scale per output row

Vector-wise quantization: each weight row has its own absmax scale (computed once, from the
whole checkpoint row, before a row-parallel layer cuts its input shard, so the codes do not
depend on the parallel layout), each token row of the activation gets one at run time. The
*mixed-precision decomposition*: input columns (features) where any token reaches
``threshold`` (6.0, the paper's) are left out of the int8 product and multiplied in float
against the same columns of the dequantized weight: the few large-magnitude features that
appear at scale would otherwise stretch every row's scale and wipe out the small ones. The int8
product accumulates exactly (int32 ``torch._int_mm`` on CUDA, float64 on CPU: every partial sum
of products ≤ 127² is an integer below 2⁵³).

Finding the outlier columns reads them back to the host (as bitsandbytes does), so layers of
this method cannot run inside CUDA graphs: the runner decodes eagerly (``cuda_graphs``).
Quantized on load from float checkpoints (`--quantization int8`); all linear layers of the
decoder blocks, never the embedding or the LM head.
"""

from __future__ import annotations

import torch

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod
from kestrel.quant.base import LayerPlace, register_quant
from kestrel.quant.w8a8 import (
    _SCALE_FLOOR,
    INT8_MAX,
    W8A8LinearMethod,
    int8_matmul,
)

DEFAULT_THRESHOLD = 6.0


def llm_int8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """x [T, K] float, wq [N, K] int8, w_scale [N, 1] → [T, N] in x's dtype: the int8 product
    of the regular columns plus the float product of the outlier columns (|x| ≥ threshold in
    any row)."""
    xf = x.float()
    cols = (xf.abs() >= threshold).any(dim=0).nonzero().squeeze(1)  # host sync (see module doc)
    regular = xf.index_fill(1, cols, 0.0) if cols.numel() else xf
    x_scale = (regular.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(_SCALE_FLOOR)
    xq = torch.round(regular / x_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    y = int8_matmul(xq, wq).float() * x_scale * w_scale.t()
    if cols.numel():
        y += xf[:, cols] @ (wq[:, cols].float() * w_scale).t()
    return y.to(x.dtype)


class Int8LinearMethod(W8A8LinearMethod):
    """W8A8's storage and loading (int8 ``weight`` + float32 ``weight_scale`` per row, float
    checkpoint rows quantized as they load); the product keeps the outlier columns in float
    (``llm_int8_matmul``)."""

    cuda_graphs = False  # the outlier columns are found on the host
    takes_codes = False  # the outlier columns need the float input

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, prefix: str = "") -> None:
        if not threshold > 0:
            raise ValueError(f"int8 outlier threshold must be > 0, got {threshold}")
        super().__init__(serialized=False, prefix=prefix)
        self.threshold = threshold

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        return llm_int8_matmul(x, layer.weight, layer.weight_scale, self.threshold)


@register_quant("int8")
def _int8(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if place.layer_idx is None or place.kind == "other":
        return None
    return Int8LinearMethod(float(cfg.extra.get("int8_threshold", DEFAULT_THRESHOLD)),
                            place.prefix)
