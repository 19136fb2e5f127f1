"""Shared pieces of the quantization tests: tiny models, HF-named weights, a one-sequence prefill.

TRITON_INTERPRET must be set before triton decorates a kernel, so before kestrel.kernels is
imported; pytest imports this conftest before the test modules of this folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import save_file

from kestrel.attention.base import AttentionMetadata
from kestrel.attention.torch_ref import TorchAttention
from kestrel.config import ModelConfig, QuantConfig
from kestrel.loader.dummy import init_dummy_weights, preset_config
from kestrel.models.llama import LlamaForCausalLM

Weights = dict[str, torch.Tensor]


def tiny_config(num_layers: int = 4) -> ModelConfig:
    """tiny-llama (hidden 128, GQA 4/2 heads, vocab 512) with ``num_layers`` decoder layers."""
    return dataclasses.replace(preset_config("tiny-llama"), num_hidden_layers=num_layers)


def build(cfg: ModelConfig, quant: QuantConfig | None = None,
          weights: Weights | None = None) -> LlamaForCausalLM:
    """A float32 model; loads ``weights`` (HF names) when given, else leaves it empty."""
    model = LlamaForCausalLM(cfg, torch.float32, TorchAttention, quant=quant or QuantConfig())
    if weights is not None:
        model.load_weights(weights.items())
    return model


def hf_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> Weights:
    """Random weights in Hugging Face naming (q/k/v and gate/up separate), from a dense model."""
    model = build(cfg)
    init_dummy_weights(model, seed=seed, std=std)
    gen = torch.Generator().manual_seed(seed + 1)
    out: Weights = {}
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if name.endswith("norm.weight"):  # non-trivial norms, so a dropped one shows
            t += 0.1 * torch.randn(t.shape, generator=gen)
        hf = name if name.startswith("lm_head.") else f"model.{name}"
        if ".qkv_proj." in hf:
            parts = t.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            out.update({hf.replace("qkv_proj", f"{c}_proj"): x for c, x in zip("qkv", parts)})
        elif ".gate_up_proj." in hf:
            gate, up = t.chunk(2)
            out[hf.replace("gate_up_proj", "gate_proj")] = gate
            out[hf.replace("gate_up_proj", "up_proj")] = up
        else:
            out[hf] = t
    return out


def write_folder(folder: Path, cfg: ModelConfig, weights: Weights,
                 quantization_config: dict | None = None) -> Path:
    """A Hugging Face folder: config.json + model.safetensors (+ a tokenizer stand-in file)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = cfg.to_hf()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


@torch.no_grad()
def prefill_logits(model: LlamaForCausalLM, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [T, V] of one sequence prefilled from an empty paged cache."""
    cfg, t = model.cfg, len(ids)
    nb = -(-t // block_size)
    dtype = model.embed_tokens.weight.dtype
    kv = [(torch.zeros(nb, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(nb, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype))
          for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t), query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.arange(nb, dtype=torch.int32)[None], max_query_len=t, max_seq_len=t,
        seq_lens_cpu=[t], query_lens_cpu=[t])
    hidden, _ = model(torch.tensor(ids), torch.arange(t), kv, meta)
    return model.compute_logits(hidden)


@pytest.fixture
def h() -> SimpleNamespace:
    """The helpers above, for test modules (a conftest is not imported by name)."""
    return SimpleNamespace(tiny_config=tiny_config, build=build, hf_weights=hf_weights,
                           write_folder=write_folder, prefill_logits=prefill_logits)
