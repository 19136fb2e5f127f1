"""Shared test utilities: random Hugging Face checkpoints and direct model-runner calls."""

from __future__ import annotations

from pathlib import Path

import torch

from kestrel.config import ModelConfig
from kestrel.core.scheduler import ScheduledRequest, SchedulerOutput
from kestrel.loader.dummy import preset_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_hf_checkpoint(preset: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight transformers model of a tiny preset's shape, saved as safetensors.

    Biases and norm weights are randomised too, so a loader that drops them is caught.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg: ModelConfig = preset_config(preset)
    hf = mcfg.to_hf()
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def prompt_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, V] of every prompt position, straight from the engine's model runner."""
    engine = llm.engine
    bs = engine.cfg.cache.block_size
    blocks = engine.pool.allocate(-(-len(token_ids) // bs))
    try:
        out = engine.executor.execute(SchedulerOutput(
            [ScheduledRequest("probe", list(token_ids), 0, blocks, True, prompt_logprobs=True)]))
        return out.prompt_logits["probe"].clone()
    finally:
        engine.pool.free(blocks)


def hf_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())
