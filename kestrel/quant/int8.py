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

import functools

import torch
from torch import nn

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims
from kestrel.quant.base import LayerPlace, register_quant

INT8_MAX = 127
DEFAULT_THRESHOLD = 6.0
_SCALE_FLOOR = 1e-12  # an all-zero row quantizes to zeros with this scale


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float → (int8 codes [R, C], float32 scales [R, 1]): absmax per row, rounded
    half to even (torch.round)."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(_SCALE_FLOOR)
    q = torch.round(wf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [T, K] int8 · wq [N, K]ᵀ int8 → exact sums [T, N] (int32 on CUDA, float64 on CPU).

    torch._int_mm on CUDA wants more than 16 rows and K, N multiples of 8: fewer rows are
    padded with zeros; other K, N take the float64 route there too."""
    t, k = xq.shape
    n = wq.shape[0]
    if xq.is_cuda and k % 8 == 0 and n % 8 == 0:
        rows = max(t, 17)
        a = xq if rows == t else torch.cat([xq, xq.new_zeros(rows - t, k)])
        return torch._int_mm(a, wq.t())[:t]
    return xq.double() @ wq.double().t()


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


class Int8LinearMethod(QuantMethod):
    """int8 ``weight`` [out, in] + float32 ``weight_scale`` [out, 1] (a buffer: quantized on
    load, shard by shard as the checkpoint's float rows arrive; the float copy never lives on
    the device whole). Activations are quantized per call (``llm_int8_matmul``)."""

    cuda_graphs = False  # the outlier columns are found on the host

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, prefix: str = "") -> None:
        if not threshold > 0:
            raise ValueError(f"int8 outlier threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.prefix = prefix

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        weight = nn.Parameter(torch.zeros(output_size, input_size, dtype=torch.int8),
                              requires_grad=False)
        set_param_dims(weight, 0, 1)
        layer.register_parameter("weight", weight)
        layer.register_buffer("weight_scale", torch.ones(output_size, 1, dtype=torch.float32))
        layer.int8_loaded = False
        # LinearBase hands ``layer.weight_loader`` to every parameter after this returns; ours
        # quantizes whole checkpoint rows, then lets the class's loader cut this rank's shard.
        layer.weight_loader = functools.partial(self._weight_loader, layer, layer.weight_loader)

    def _weight_loader(self, layer, default, param, loaded: torch.Tensor, shard_id=None) -> None:
        if param is not layer.weight:
            return default(param, loaded, shard_id)
        if not loaded.dtype.is_floating_point:
            raise ValueError(f"{self.prefix}.weight: int8 quantizes float checkpoints, got "
                             f"{loaded.dtype}")
        q, s = quantize_rows_int8(loaded.to(layer.weight.device))
        default(layer.weight, q, shard_id)
        scale = layer.weight_scale
        set_param_dims(scale, 0, None)  # a buffer loses attributes when the module moves
        default(scale, s, shard_id)
        layer.int8_loaded = True

    @torch.no_grad()
    def process_weights_after_loading(self, layer) -> None:
        if not layer.int8_loaded:  # random init (dummy weights): codes drawn ~N(0, 2)
            q, s = quantize_rows_int8(layer.weight.float() * 0.01)
            layer.weight.data.copy_(q)
            layer.weight_scale.data.copy_(s)
            layer.int8_loaded = True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = llm_int8_matmul(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale,
                            self.threshold)
        y = y.reshape(*lead, y.shape[-1])
        return y if bias is None else y + bias


@register_quant("int8")
def _int8(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if place.layer_idx is None or place.kind == "other":
        return None
    return Int8LinearMethod(float(cfg.extra.get("int8_threshold", DEFAULT_THRESHOLD)),
                            place.prefix)
