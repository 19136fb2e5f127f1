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

GiB = 2**30


class DoesNotFitError(RuntimeError):
    """The weights, the KV cache or the start-up forward do not fit the GPU memory given: a
    configuration to change, not a bug (the CLI prints the message, not a traceback)."""


def build_model(cfg: EngineConfig, backend_cls: type[AttentionBackend], tp: TPGroup,
                layer_range: tuple[int, int] | None) -> nn.Module:
    cls = get_model_cls(cfg.model_config.architecture)
    if cfg.device.startswith("cuda"):
        check_weights_fit(cfg, model_bytes(cfg, cls, backend_cls, tp, layer_range))
    with torch.device(cfg.device):
        model = cls(cfg.model_config, cfg.dtype, backend_cls, cfg.quant, tp, layer_range)
    if cfg.load_format == "dummy":
        init_dummy_weights(model, seed=cfg.seed)
    else:
        model.load_weights(iterate_weights(cfg.model, lazy=True))
    if backend_cls.name == "triton" and cfg.device.startswith("cuda"):
        use_triton_kernels(model)
    return model.eval()


def model_bytes(cfg: EngineConfig, cls: type[nn.Module], backend_cls: type[AttentionBackend],
                tp: TPGroup, layer_range: tuple[int, int] | None) -> int:
    """Bytes of this rank's parameters and buffers, counted on a meta-device copy of the model:
    no memory, and exactly the tensors and dtypes the quantization method creates."""
    with torch.device("meta"):
        meta = cls(cfg.model_config, cfg.dtype, backend_cls, cfg.quant, tp, layer_range)
    return sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])


def check_weights_fit(cfg: EngineConfig, need: int) -> None:
    """Fail before loading anything, saying what to change, when this rank's weights exceed
    what ``gpu_memory_utilization`` leaves of the GPU (instead of an allocator error mid-load)."""
    free, total = torch.cuda.mem_get_info(torch.device(cfg.device))
    util = cfg.cache.gpu_memory_utilization
    budget = total * util - (total - free)
    if need <= budget:
        return
    par = cfg.parallel
    share = (f", TP {par.tensor_parallel_size} x PP {par.pipeline_parallel_size}: this GPU's share"
             if par.world_size > 1 else "")
    quant = f", {cfg.quant.method}" if cfg.quant.method else ""
    raise DoesNotFitError(
        f"out of GPU memory for the weights: {cfg.model} ({str(cfg.dtype).removeprefix('torch.')}"
        f"{quant}{share}) needs {need / GiB:.1f} GiB, and gpu_memory_utilization {util} of this "
        f"GPU's {total / GiB:.1f} GiB leaves {max(budget, 0) / GiB:.1f} GiB "
        f"({(total - free) / GiB:.1f} GiB already in use); use --quantization fp8 (FFN weights "
        f"in one byte), more GPUs (--tensor-parallel-size, --pipeline-parallel-size) or a higher "
        f"--gpu-memory-utilization")


def use_triton_kernels(model: nn.Module) -> None:
    """Swap the torch reference ops for fused Triton kernels: the one place GPU ops are chosen."""
    from kestrel.kernels import fused
    from kestrel.layers.norm import RMSNorm
    from kestrel.models.llama import LlamaDecoderLayer, LlamaMLP
    from kestrel.quant.fp8_fused import (
        fp8_norm_input,
        fp8_norm_mlp,
        row_quantized,
        uses_fp8_producers,
    )

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.impl = fused.rms_norm
        elif isinstance(m, LlamaMLP):
            m.act, m.fold_act = fused.silu_and_mul, True
        elif isinstance(m, LlamaDecoderLayer):  # FP8 activations quantized by their producers
            if row_quantized(m.self_attn.qkv_proj) is not None:
                m.norm_input = fp8_norm_input
            if uses_fp8_producers(m.mlp):
                m.norm_mlp = fp8_norm_mlp
