"""Shared test utilities: random Hugging Face checkpoints and direct model-runner calls."""

from __future__ import annotations

from pathlib import Path

import torch

from kestrel.core.scheduler import ScheduledRequest, SchedulerOutput
from kestrel.loader.dummy import save_random_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_hf_checkpoint(preset: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight transformers model of a tiny preset's shape, saved as safetensors
    (float32; biases and norm weights randomised too)."""
    return save_random_checkpoint(preset, folder, seed)


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
