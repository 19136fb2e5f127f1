"""Kestrel's decoder computes the same logits as Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM
from tests.helpers import hf_logits, make_hf_checkpoint, max_rel_err, prompt_logits


@pytest.mark.parametrize("preset,length", [
    ("tiny-llama", 256),
    ("tiny-qwen2", 256),  # qkv bias, tied embeddings
    ("tiny-llama3", 600),  # llama3 rope scaling: positions well past original_max_position (256)
])
def test_random_checkpoint_logits_match_transformers(tmp_path, preset, length):
    folder = make_hf_checkpoint(preset, tmp_path / preset, seed=length)
    ids = torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = LLM(str(folder), dtype="float32", device="cpu")
    ours = prompt_logits(llm, ids)
    ref = hf_logits(folder, ids)
    assert ours.shape == ref.shape
    assert max_rel_err(ours, ref) <= 1e-4


def test_default_model_logits_match_transformers(default_model_path, smollm_llm):
    ids = smollm_llm.get_tokenizer().encode(
        "The Python documentation says: " + "functions are first-class objects. " * 40)[:256]
    assert len(ids) == 256
    ours = prompt_logits(smollm_llm, ids)
    ref = hf_logits(default_model_path, ids)
    assert max_rel_err(ours, ref) <= 1e-4
