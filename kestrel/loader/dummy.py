"""Random weights in real model shapes, by preset name: speed does not depend on the values."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

from kestrel.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama(vocab, hidden, inter, layers, heads, kv, ctx, theta=500000.0, rope=None, tied=False,
           eos=(128001, 128009), arch="LlamaForCausalLM", bias=False) -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=hidden // heads, rms_norm_eps=1e-5,
                       rope_theta=theta, rope_scaling=rope, max_position_embeddings=ctx,
                       tie_word_embeddings=tied, qkv_bias=bias, bos_token_id=1,
                       eos_token_id=tuple(eos))


PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072, rope=_LLAMA3_ROPE),
    "llama-3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072, rope=_LLAMA3_ROPE),
    "llama-3.1-405b": _llama(128256, 16384, 53248, 126, 128, 8, 131072, rope=_LLAMA3_ROPE),
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, 8192, theta=100000.0, tied=True,
                           eos=(2,)),
    # Tiny shapes for tests: fast on CPU, but every feature of the real ones.
    "tiny-llama": _llama(512, 128, 256, 2, 4, 2, 1024, theta=10000.0, eos=(2,)),
    "tiny-llama3": _llama(512, 128, 256, 2, 4, 2, 16384, rope={**_LLAMA3_ROPE,
                          "original_max_position_embeddings": 256}, eos=(2,)),
    "tiny-qwen2": _llama(512, 128, 256, 2, 4, 2, 1024, theta=1000000.0, tied=True, eos=(2,),
                         arch="Qwen2ForCausalLM", bias=True),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def save_random_checkpoint(preset: str, folder: Path, seed: int = 0,
                           dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """A preset's shape with random weights, written by transformers as a Hugging Face folder
    (config.json + safetensors): a real file to load, for tests and for timing start-up with a
    checkpoint's read (presets draw their weights on the device and read nothing). Biases and
    norm weights are randomised too, so a loader that drops them is caught."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = preset_config(preset).to_hf()
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter in place (on its device, no host copy); norms stay at one.

    Quantized parameters (fp8/int8 storage) are drawn in float32 and cast, then each layer's
    quant method post-processes them as it would a loaded checkpoint.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        # fp8/int8 storage is drawn in float32 at a scale its quant method undoes.
        wide = p.dtype.is_floating_point and p.element_size() >= 2
        scale = std if wide else std * 100
        if p.numel() < 2**24:
            chunk = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
        else:  # large tensors: draw on the device (a CPU draw of 8B weights takes a minute)
            g = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            if wide:
                p.normal_(0.0, scale, generator=g)
                continue
            chunk = torch.empty(p.shape, device=p.device).normal_(0.0, scale, generator=g)
        p.copy_(chunk.to(p.dtype))
    for module in model.modules():
        qm = getattr(module, "quant_method", None)
        if qm is not None:
            qm.process_weights_after_loading(module)
