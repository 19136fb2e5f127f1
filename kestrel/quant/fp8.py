"""FP8 (e4m3) linear layers: the Llama 3 inference recipe (paper §6.2), as a QuantMethod.

Row-wise ("fp8"): one scale per weight output row (row amax / 448) and one per activation token,
computed at run time with the token's amax clamped to ``fp8_activation_scale_ub`` (1200): tokens
such as dates have huge activations, and an unbounded scale would flush the rest of the row to
zero. Per-token scales also keep one request's tokens from changing another's numerics.
Per-tensor ("fp8-tensor"), the comparison point: one scale per checkpoint weight tensor (q/k/v,
gate/up keep their own, laid out as rows) and one dynamic scale for the whole batch, or a static
one from ``QuantConfig.extra["activation_scale"]``.

Both compute ``y = (sx·xq)(sw·wq)ᵀ``: on CUDA a Triton skinny GEMM for decode-sized batches and
torch._scaled_mm ([T, 1] and [1, out] float32 scales) for larger ones, where the device runs it
(Ada/Hopper; CPU on torch 2.13), else a float32 emulation of the same function. What the device
offers is probed once per layer at load time; ``fp8_matmul`` picks by T (see fp8_ops).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import torch

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims
from kestrel.quant.base import LayerPlace, register_quant, register_rowwise_weight

# The numerics live in fp8_ops; their names stay importable from here.
from kestrel.quant.fp8_ops import (  # noqa: F401
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    INV_FP8_MAX,
    SMALL_M_MAX,
    QuantInput,
    cast_fp8,
    dequantize,
    fp8_matmul,
    fp8_matmul_emulated,
    quantize_activation,
    quantize_rowwise_ref,
    quantize_weight,
    rms_norm_quant_ref,
    select_fp8_gemm,
    select_small_m_gemm,
    silu_and_mul_quant_ref,
)

# init_dummy_weights draws 1-byte parameters as N(0, 100·std) in fp8; this maps them back to
# N(0, std) before they are re-quantized row-wise (see Fp8LinearMethod._requantize_dummy).
DUMMY_SCALE = 0.01
# Our fused projections → the Hugging Face modules they are loaded from, in shard order.
HF_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# ----------------------------------------------------------------------------- the method


@dataclass
class _LoadState:
    """Which shards of weight / weight_scale arrived through the loader (None: unfused)."""

    weight_shards: set = field(default_factory=set)
    scale_shards: set = field(default_factory=set)
    processed: bool = False


def _shard_key(shard_id: object) -> object:
    """QKV shards arrive as 'q'/'k'/'v', gate/up as 0/1: one key space for both."""
    return {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id) if isinstance(shard_id, str) \
        else shard_id


class Fp8LinearMethod(QuantMethod):
    """FP8 weight [out, in] + float32 ``weight_scale`` [out, 1]; activations quantized per call.

    serialized=False: the checkpoint holds float weights, quantized shard by shard inside the
    weight loader as they arrive (the float copy never lives on the device as a whole), and
    ``weight_scale`` is a buffer. serialized=True: the checkpoint holds fp8 ``weight`` and
    ``weight_scale`` tensors (fbgemm_fp8 / compressed-tensors), so ``weight_scale`` is a parameter.
    """

    def __init__(self, per_tensor: bool = False, activation_scale_ub: float | None = 1200.0,
                 static_activation_scale: float | None = None, serialized: bool = False,
                 prefix: str = "", fast_accum: bool = False) -> None:
        if activation_scale_ub is not None and not activation_scale_ub > 0:
            raise ValueError(f"fp8_activation_scale_ub must be > 0 (or None), got "
                             f"{activation_scale_ub}")
        if static_activation_scale is not None and not 0 < static_activation_scale < math.inf:
            raise ValueError("extra['activation_scale'] must be a finite number > 0, got "
                             f"{static_activation_scale!r}")
        self.per_tensor = per_tensor
        self.activation_scale_ub = activation_scale_ub
        self.static_activation_scale = static_activation_scale
        self.serialized = serialized
        self.prefix = prefix
        self.fast_accum = fast_accum

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        register_rowwise_weight(layer, FP8_DTYPE, output_size, input_size, DUMMY_SCALE,
                                self.serialized)
        layer.fp8_out_dtype = dtype
        layer.fp8_state = _LoadState()
        layer.fp8_use_scaled_mm = False
        layer.fp8_small_m_max = 0  # rows up to which the Triton skinny GEMM runs (0: never)
        # LinearBase hands ``layer.weight_loader`` to every parameter after this returns; ours
        # wraps the class's sharding loader to quantize or validate what it is given.
        layer.weight_loader = functools.partial(self._weight_loader, layer, layer.weight_loader)

    # -- loading

    def tensor_name(self, shard_id: object, suffix: str) -> str:
        """Checkpoint name of one shard's tensor, for error messages."""
        head, _, last = self.prefix.rpartition(".")
        key = _shard_key(shard_id)
        if last in HF_PARTS and isinstance(key, int) and key < len(HF_PARTS[last]):
            last = HF_PARTS[last][key]
        return f"{head}.{last}.{suffix}" if head else f"{last}.{suffix}"

    def _weight_loader(self, layer, default, param, loaded: torch.Tensor, shard_id=None) -> None:
        if param is layer.weight:
            load, suffix = self._load_weight, "weight"
        elif self.serialized and param is layer.weight_scale:
            load, suffix = self._load_scale, "weight_scale"
        else:
            return default(param, loaded, shard_id)
        try:
            load(layer, default, loaded, shard_id)
        except RuntimeError as e:  # a shard too short to slice: still the checkpoint's fault
            raise ValueError(f"{self.tensor_name(shard_id, suffix)}: shape "
                             f"{tuple(loaded.shape)} does not fit this layer ({e})") from None

    def _load_weight(self, layer, default, loaded: torch.Tensor, shard_id) -> None:
        name = self.tensor_name(shard_id, "weight")
        if loaded.dtype == FP8_DTYPE:
            if not self.serialized:
                raise ValueError(f"{name}: the checkpoint is already FP8; load it with the "
                                 "QuantConfig from fp8_checkpoint.quant_config_from_hf")
            default(layer.weight, loaded, shard_id)  # NaN codes: checked once all are in
        else:
            # Quantize whole checkpoint rows (before the layer cuts this rank's shard) so the
            # scales, like those of an FP8 checkpoint, do not depend on the parallel layout.
            q, s = quantize_weight(loaded.to(layer.weight.device), self.per_tensor, name)
            default(layer.weight, q, shard_id)
            scale = layer.weight_scale
            set_param_dims(scale, 0, None)  # a buffer loses attributes when the module moves
            default(scale, s, shard_id)
            layer.fp8_state.scale_shards.add(_shard_key(shard_id))
        layer.fp8_state.weight_shards.add(_shard_key(shard_id))

    def _load_scale(self, layer, default, loaded: torch.Tensor, shard_id) -> None:
        name = self.tensor_name(shard_id, "weight_scale")
        if loaded.dim() != 2 or loaded.shape[1] != 1:
            raise ValueError(f"{name}: shape {tuple(loaded.shape)}, expected [out_features, 1] "
                             "(one scale per output row)")
        loaded = loaded.float()
        _check_scale_values(loaded, name)
        default(layer.weight_scale, loaded, shard_id)
        layer.fp8_state.scale_shards.add(_shard_key(shard_id))

    def process_weights_after_loading(self, layer) -> None:
        """Validate shards and scales, and pick the GEMM; the weight layout is already final."""
        st: _LoadState = layer.fp8_state
        if st.weight_shards or st.scale_shards:
            self._check_complete(layer)
            if self.serialized:
                self._check_weight_values(layer)
        elif not st.processed:
            self._requantize_dummy(layer)
        _check_scale_values(layer.weight_scale, f"{self.prefix}.weight_scale")
        out_features, in_features = layer.weight.shape
        layer.fp8_use_scaled_mm = select_fp8_gemm(layer.weight.device, layer.fp8_out_dtype,
                                                  in_features, out_features)
        layer.fp8_small_m_max = select_small_m_gemm(layer.weight.device, layer.fp8_out_dtype)
        st.processed = True

    def _check_complete(self, layer) -> None:
        st: _LoadState = layer.fp8_state
        parts = getattr(layer, "output_sizes", None)
        fused = parts is not None and None not in st.weight_shards | st.scale_shards
        expected = set(range(len(parts))) if fused else {None}
        for have, suffix in ((st.weight_shards, "weight"), (st.scale_shards, "weight_scale")):
            missing = sorted(expected - have, key=str)
            if missing:
                names = [self.tensor_name(s, suffix) for s in missing]
                raise ValueError(f"checkpoint is missing {', '.join(names)}")

    def _check_weight_values(self, layer) -> None:
        """No e4m3fn NaN codes in this rank's weight. Checked here, on the loaded shard, not on
        the checkpoint tensor as it comes: that would read every rank's rows from disk."""
        nan = int(((layer.weight.view(torch.uint8) & 0x7F) == 0x7F).sum())
        if nan:
            names = [self.tensor_name(s, "weight")
                     for s in sorted(layer.fp8_state.weight_shards, key=str)]
            raise ValueError(f"{', '.join(names)}: {nan} NaN value(s) in the FP8 weight")

    @torch.no_grad()
    def _requantize_dummy(self, layer) -> None:
        """Nothing came through the loader (random init): give the layer real row-wise scales."""
        w = layer.weight.float() * DUMMY_SCALE
        q, s = quantize_weight(w, self.per_tensor, f"{self.prefix}.weight")
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(s)

    # -- forward

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] → (fp8 [T, in], scale [T, 1] float32)."""
        if not self.per_tensor:
            return quantize_activation(x, self.activation_scale_ub)
        xf = x.float()
        if self.static_activation_scale is not None:
            scale = xf.new_full((x.shape[0], 1), self.static_activation_scale)
        else:
            ub = math.inf if self.activation_scale_ub is None else self.activation_scale_ub
            amax = xf.abs().amax() if x.numel() else xf.new_zeros(())
            scale = (amax.clamp(AMAX_FLOOR, ub) * INV_FP8_MAX).expand(x.shape[0], 1).contiguous()
        return cast_fp8(xf / scale), scale

    def apply(self, layer, x: torch.Tensor | QuantInput,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantInput):  # the producer quantized it already (fused kernel)
            return self.apply_quantized(layer, x.q, x.scale, bias)
        lead = x.shape[:-1]
        xq, xs = self.quantize_input(x.reshape(-1, x.shape[-1]))
        y = self.apply_quantized(layer, xq, xs, bias)
        return y.reshape(*lead, y.shape[-1])

    def apply_quantized(self, layer, xq: torch.Tensor, x_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """Entry for producers that emit fp8 themselves (fused RMSNorm / SwiGLU + quantize)."""
        y = fp8_matmul(xq, x_scale, layer.weight, layer.weight_scale, layer.fp8_out_dtype,
                       layer.fp8_use_scaled_mm, layer.fp8_small_m_max, self.fast_accum)
        return y if bias is None else y + bias


def _check_scale_values(scale: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(scale)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} non-finite value(s) (inf/NaN) in the FP8 scales")
    if bool((scale < 0).any()):
        raise ValueError(f"{name}: negative FP8 scale(s)")


# ----------------------------------------------------------------------------- the recipe


def module_excluded(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Does a checkpoint's ``modules_to_not_convert`` / ``ignore`` list name this module?

    An entry matches whole dotted components anywhere in the name ("lm_head", "mlp.down_proj",
    "model.layers.0.mlp.up_proj"); "re:<regex>" entries match with re.match (compressed-tensors).
    """
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif f".{p}." in f".{name}.":
            return True
    return False


def hf_module_names(prefix: str) -> list[str]:
    """Our module name → the checkpoint modules fused into it."""
    head, _, last = prefix.rpartition(".")
    return [f"{head}.{p}" for p in HF_PARTS[last]] if last in HF_PARTS else [prefix]


def layer_selected(cfg: QuantConfig, place: LayerPlace) -> bool:
    """The recipe: which linear layers run in FP8.

    An FP8 checkpoint decides by its exclusion list. Otherwise: FFN layers (attention too with
    ``fp8_attention``), minus the first and last decoder layers with ``fp8_skip_layers``;
    embeddings and the LM head never.
    """
    if place.kind == "other" or place.layer_idx is None:
        return False
    if cfg.extra.get("checkpoint_format"):
        patterns = list(cfg.extra.get("modules_to_not_convert") or [])
        names = hf_module_names(place.prefix)
        excluded = [module_excluded(n, patterns) for n in names]
        if any(excluded) and not all(excluded):
            raise ValueError(f"{place.prefix}: the checkpoint keeps {names} partly unquantized; "
                             "a fused layer must be all FP8 or all dense")
        return not any(excluded)
    if place.kind == "attn" and not cfg.fp8_attention:
        return False
    return not (cfg.fp8_skip_layers and place.layer_idx in (0, place.num_layers - 1))


@register_quant("fp8")
def fp8_rowwise(cfg: QuantConfig, place: LayerPlace) -> Fp8LinearMethod | None:
    if not layer_selected(cfg, place):
        return None
    return Fp8LinearMethod(per_tensor=False, activation_scale_ub=cfg.fp8_activation_scale_ub,
                           serialized=bool(cfg.extra.get("checkpoint_format")),
                           prefix=place.prefix, fast_accum=cfg.fp8_fast_accum)


@register_quant("fp8-tensor")
def fp8_tensorwise(cfg: QuantConfig, place: LayerPlace) -> Fp8LinearMethod | None:
    if cfg.extra.get("checkpoint_format"):
        raise ValueError("fp8-tensor quantizes float checkpoints; an FP8 checkpoint loads as 'fp8'")
    if not layer_selected(cfg, place):
        return None
    static = cfg.extra.get("activation_scale")
    return Fp8LinearMethod(per_tensor=True, activation_scale_ub=cfg.fp8_activation_scale_ub,
                           static_activation_scale=None if static is None else float(static),
                           prefix=place.prefix, fast_accum=cfg.fp8_fast_accum)
