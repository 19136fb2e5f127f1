"""Build a model on its device and fill its weights: from a checkpoint folder or random."""

from __future__ import annotations

import torch
from torch import nn

from kestrel.attention.base import AttentionBackend
from kestrel.config import EngineConfig
from kestrel.loader.dummy import init_dummy_weights
from kestrel.loader.hf import iterate_weights
from kestrel.models.registry import get_model_cls
from kestrel.parallel.state import TPGroup


def build_model(cfg: EngineConfig, backend_cls: type[AttentionBackend], tp: TPGroup,
                layer_range: tuple[int, int] | None) -> nn.Module:
    cls = get_model_cls(cfg.model_config.architecture)
    with torch.device(cfg.device):
        model = cls(cfg.model_config, cfg.dtype, backend_cls, cfg.quant, tp, layer_range)
    if cfg.load_format == "dummy":
        init_dummy_weights(model, seed=cfg.seed)
    else:
        model.load_weights(iterate_weights(cfg.model, lazy=True))
    if backend_cls.name == "triton" and cfg.device.startswith("cuda"):
        use_triton_kernels(model)
    return model.eval()


def use_triton_kernels(model: nn.Module) -> None:
    """Swap the torch reference ops for fused Triton kernels: the one place GPU ops are chosen."""
    from kestrel.kernels import fused
    from kestrel.layers.norm import RMSNorm
    from kestrel.models.llama import LlamaDecoderLayer, LlamaMLP
    from kestrel.quant.fp8_fused import (
        fp8_norm_input,
        fp8_norm_mlp,
        rowwise_fp8,
        uses_fp8_producers,
    )

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.impl = fused.rms_norm
        elif isinstance(m, LlamaMLP):
            m.act, m.fold_act = fused.silu_and_mul, True
        elif isinstance(m, LlamaDecoderLayer):  # FP8 activations quantized by their producers
            if rowwise_fp8(m.self_attn.qkv_proj) is not None:
                m.norm_input = fp8_norm_input
            if uses_fp8_producers(m.mlp):
                m.norm_mlp = fp8_norm_mlp
