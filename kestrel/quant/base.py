"""The quantization seam: a registry from method name to a per-layer QuantMethod factory.

A factory sees the layer's place in the model (its dotted name, its decoder-layer index and
the layer count) and returns the QuantMethod for it, or None to keep the layer unquantized.
That is where recipes such as "FFN only, first and last layers in BF16" live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod


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
