"""The quantization seam: a registry from method name to a per-layer QuantMethod factory.

A factory sees the layer's place in the model (its dotted name, its decoder-layer index and
the layer count) and returns the QuantMethod for it, or None to keep the layer unquantized.
That is where recipes such as "FFN only, first and last layers in BF16" live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims


@dataclass(frozen=True)
class LayerPlace:
    prefix: str  # e.g. "model.layers.3.mlp.gate_up_proj"
    layer_idx: int | None  # decoder layer index, None for embeddings / lm_head
    num_layers: int

    @property
    def kind(self) -> str:
        """'attn' for self-attention projections, 'mlp' for the feed-forward ones, else 'other'."""
        if ".self_attn." in self.prefix:
            return "attn"
        if ".mlp." in self.prefix:
            return "mlp"
        return "other"


def register_rowwise_weight(layer: nn.Module, weight_dtype: torch.dtype, output_size: int,
                            input_size: int, scale_fill: float, serialized: bool) -> None:
    """An 8-bit ``weight`` [out, in] and its float32 ``weight_scale`` [out, 1], one scale per
    output row (row-wise FP8, W8A8): the scale a parameter when the checkpoint carries it
    (``serialized``), else a buffer the method fills as float rows are quantized on load."""
    weight = nn.Parameter(torch.zeros(output_size, input_size, dtype=weight_dtype),
                          requires_grad=False)
    set_param_dims(weight, 0, 1)
    layer.register_parameter("weight", weight)
    scale = torch.full((output_size, 1), scale_fill, dtype=torch.float32)
    if serialized:
        scale = nn.Parameter(scale, requires_grad=False)
        set_param_dims(scale, 0, None)
        layer.register_parameter("weight_scale", scale)
    else:
        layer.register_buffer("weight_scale", scale)


QuantFactory = Callable[[QuantConfig, LayerPlace], "QuantMethod | None"]
_METHODS: dict[str, QuantFactory] = {}


def register_quant(name: str) -> Callable[[QuantFactory], QuantFactory]:
    def deco(fn: QuantFactory) -> QuantFactory:
        _METHODS[name] = fn
        return fn

    return deco


def quant_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def get_quant_method(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if cfg.method is None:
        return None
    _import_builtin_methods()
    if cfg.method not in _METHODS:
        raise ValueError(f"unknown quantization {cfg.method!r}; known: {sorted(_METHODS)}")
    return _METHODS[cfg.method](cfg, place)


def _import_builtin_methods() -> None:
    """Import the modules that register methods (each registers itself on import)."""
    import importlib
    import pkgutil

    import kestrel.quant as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "__init__"):
            importlib.import_module(f"kestrel.quant.{mod.name}")
