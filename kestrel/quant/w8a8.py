"""W8A8: int8 weights with one scale per output row, int8 activations with one scale per token
computed at run time, one exact int8 product (SmoothQuant's O3 setting, Xiao et al., 2023).

    y = (round(x / s_x) · round(W / s_w)ᵀ) · s_x · s_wᵀ,  s_x per token, s_w per output row

Without help this loses to the few activation channels of a transformer that are 10-100× larger
than the rest (each token's scale follows its largest channel). ``kestrel quantize --method
smoothquant`` (quant/smoothquant.py) moves that range into the weights offline and writes a
compressed-tensors W8A8 folder, which this method loads; ``--quantization w8a8`` quantizes a
float model on load without smoothing (the baseline SmoothQuant is measured against). All linear
layers of the decoder blocks, never the embedding or the LM head. Unlike LLM.int8() nothing reads
back to the host, so decode runs in CUDA graphs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims
from kestrel.quant.base import LayerPlace, register_quant, register_rowwise_weight
from kestrel.quant.fp8 import HF_PARTS
from kestrel.quant.fp8_ops import QuantInput

COMPRESSED = "compressed-tensors"
_SHARDS = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}  # the loader's shard ids
INT8_MAX = 127
_SCALE_FLOOR = 1e-12  # an all-zero row quantizes to zeros with this scale
SMALL_M = 16  # rows up to which the GPU path streams the weights (decode) instead of a GEMM


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


def w8a8_matmul_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [T, K] float, wq [N, K] int8, w_scale [N, 1] float32 → [T, N] in x's dtype: each token
    row quantized by its own absmax, one exact int8 product, rescaled."""
    xq, x_scale = quantize_rows_int8(x)
    return _scaled_product_ref(xq, x_scale, wq, w_scale, x.dtype)


def _scaled_product_ref(xq, x_scale, wq, w_scale, out_dtype: torch.dtype) -> torch.Tensor:
    return (int8_matmul(xq, wq).float() * x_scale * w_scale.t()).to(out_dtype)


def scaled_int8_product(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                        w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq · wqᵀ) · x_scale · w_scaleᵀ in out_dtype from int8 codes: on CUDA up to SMALL_M rows
    a skinny GEMM that streams the weights, more torch._int_mm and one scaling kernel
    (kestrel.kernels.int8_w8a8); elsewhere the reference's exact sums."""
    t, k = xq.shape
    n = wq.shape[0]
    if not xq.is_cuda or k % 8 or n % 8:
        return _scaled_product_ref(xq, x_scale, wq, w_scale, out_dtype)
    from kestrel.kernels.int8_w8a8 import int8_gemm_small_m, scale_int32

    if t <= SMALL_M:
        return int8_gemm_small_m(xq, x_scale, wq, w_scale, out_dtype)
    return scale_int32(torch._int_mm(xq, wq.t()), x_scale, w_scale, out_dtype)


def w8a8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``w8a8_matmul_ref``'s function; on CUDA x is quantized by one Triton kernel (the same
    codes and scales) and multiplied by ``scaled_int8_product``."""
    if not x.is_cuda:
        return w8a8_matmul_ref(x, wq, w_scale)
    from kestrel.kernels.int8_w8a8 import per_token_quant_int8

    xq, x_scale = per_token_quant_int8(x)
    return scaled_int8_product(xq, x_scale, wq, w_scale, x.dtype)


class W8A8LinearMethod(QuantMethod):
    """int8 ``weight`` [out, in] + float32 ``weight_scale`` [out, 1]. ``serialized``: both come
    from the checkpoint (a parameter each, every shard checked); else float rows arrive and are
    quantized as they load (``weight_scale`` a buffer). ``takes_codes``: a fused RMSNorm or
    SwiGLU may hand it int8 codes and scales (a QuantInput) instead of its float input."""

    takes_codes = True

    def __init__(self, serialized: bool = False, prefix: str = "") -> None:
        self.serialized = serialized
        self.prefix = prefix

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        register_rowwise_weight(layer, torch.int8, output_size, input_size, 1.0,
                                self.serialized)
        layer.w8a8_shards = {"weight": set(), "weight_scale": set()}
        layer.w8a8_out_dtype = dtype  # of outputs computed from a QuantInput
        layer.weight_loader = functools.partial(self._weight_loader, layer, layer.weight_loader)

    def _name(self, shard_id: Any, suffix: str) -> str:
        """The checkpoint tensor of one shard, for error messages."""
        head, _, last = self.prefix.rpartition(".")
        if last in HF_PARTS and shard_id is not None:
            key = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
            last = HF_PARTS[last][key]
        return f"{head}.{last}.{suffix}"

    def _weight_loader(self, layer, default, param, loaded: torch.Tensor, shard_id=None) -> None:
        if param is layer.weight:
            name = self._name(shard_id, "weight")
            if self.serialized != (loaded.dtype == torch.int8):
                want = ("int8 (a W8A8 checkpoint)" if self.serialized
                        else "float (this method quantizes float checkpoints)")
                raise ValueError(f"{name}: dtype {loaded.dtype}, expected {want}")
            if self.serialized:
                default(layer.weight, loaded, shard_id)
            else:  # whole checkpoint rows: scales that do not depend on the parallel layout
                q, s = quantize_rows_int8(loaded.to(layer.weight.device))
                default(layer.weight, q, shard_id)
                set_param_dims(layer.weight_scale, 0, None)  # a buffer loses its attributes
                default(layer.weight_scale, s, shard_id)
                layer.w8a8_shards["weight_scale"].add(shard_id)
            layer.w8a8_shards["weight"].add(shard_id)
        elif self.serialized and param is layer.weight_scale:
            name = self._name(shard_id, "weight_scale")
            if loaded.dim() != 2 or loaded.shape[1] != 1:
                raise ValueError(f"{name}: shape {tuple(loaded.shape)}, expected "
                                 "[out_features, 1] (one scale per output row)")
            loaded = loaded.float()
            if not (torch.isfinite(loaded).all() and (loaded > 0).all()):
                raise ValueError(f"{name}: scales must be finite and > 0")
            default(layer.weight_scale, loaded, shard_id)
            layer.w8a8_shards["weight_scale"].add(shard_id)
        else:
            default(param, loaded, shard_id)

    @torch.no_grad()
    def process_weights_after_loading(self, layer) -> None:
        got = layer.w8a8_shards
        if not got["weight"] and not got["weight_scale"]:  # random init (dummy weights)
            q, s = quantize_rows_int8(layer.weight.float() * 0.01)
            layer.weight.data.copy_(q)
            layer.weight_scale.data.copy_(s)
            return
        fused = _SHARDS.get(self.prefix.rpartition(".")[2], {None})
        want = {None} if None in got["weight"] | got["weight_scale"] else fused
        for suffix, have in got.items():
            missing = sorted(want - have, key=str)
            if missing:
                raise ValueError("checkpoint is missing "
                                 + ", ".join(self._name(s, suffix) for s in missing))

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] → [T, N]."""
        return w8a8_matmul(x, layer.weight, layer.weight_scale)

    def apply(self, layer, x: torch.Tensor | QuantInput,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantInput):  # int8 codes from a fused producer (quant.fp8_fused)
            y = scaled_int8_product(x.q, x.scale, layer.weight, layer.weight_scale,
                                    layer.w8a8_out_dtype)
            return y if bias is None else y + bias
        lead = x.shape[:-1]
        y = self.matmul(layer, x.reshape(-1, x.shape[-1]))
        y = y.reshape(*lead, y.shape[-1])
        return y if bias is None else y + bias


@register_quant("w8a8")
def _w8a8(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if place.layer_idx is None or place.kind == "other":
        return None
    return W8A8LinearMethod(cfg.extra.get("checkpoint_format") == COMPRESSED, place.prefix)


def quant_config_from_compressed_int8(config: dict[str, Any]) -> QuantConfig | None:
    """A compressed-tensors W8A8 config.json (int8 per-channel static weights, int8 per-token
    dynamic activations: what SmoothQuant checkpoints ship as) → "w8a8"; None when it is not
    such a checkpoint; ValueError for another int8 layout."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != COMPRESSED:
        return None
    groups = list((q.get("config_groups") or {}).values())
    if not any(_is_int8(g.get("weights")) for g in groups):
        return None
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    if (len(groups) != 1 or w.get("strategy") != "channel" or not w.get("symmetric", True)
            or not (_is_int8(a) and a.get("strategy") == "token" and a.get("dynamic"))
            or list(groups[0].get("targets") or ["Linear"]) != ["Linear"]):
        raise ValueError("compressed-tensors int8: only one group of symmetric per-channel int8 "
                         "weights with dynamic per-token int8 activations on every Linear "
                         "(W8A8) is supported")
    return QuantConfig(method="w8a8", extra={"checkpoint_format": COMPRESSED})


def _is_int8(scheme: dict[str, Any] | None) -> bool:
    return bool(scheme) and scheme.get("type") == "int" and scheme.get("num_bits") == 8
