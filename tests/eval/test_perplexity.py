"""Perplexity: the default model on pydoc windows agrees with Hugging Face transformers."""

from __future__ import annotations

import math

import pytest
import torch

from kestrel.cli import main
from kestrel.eval.perplexity import (
    corpus_ids,
    hf_perplexity,
    load_corpus,
    perplexity,
    token_windows,
)


def test_default_model_matches_transformers(smollm_llm, default_model_path):
    from transformers import AutoModelForCausalLM

    windows = token_windows(corpus_ids(smollm_llm.get_tokenizer(), "pydoc"), 256, 3)
    ours = perplexity(smollm_llm, windows)
    hf_model = AutoModelForCausalLM.from_pretrained(default_model_path,
                                                    dtype=torch.float32).eval()
    ref = hf_perplexity(hf_model, windows)
    assert ours["tokens_scored"] == ref["tokens_scored"] == 3 * 255
    assert ours["perplexity"] == pytest.approx(
        math.exp(sum(ours["window_nll"]) / ours["tokens_scored"]))
    assert 1.0 < ours["perplexity"] < 1000.0  # real text, a real model: not noise
    assert abs(ours["perplexity"] / ref["perplexity"] - 1) < 0.005
    for a, b in zip(ours["window_nll"], ref["window_nll"]):
        assert a == pytest.approx(b, rel=0.005)


def test_pydoc_corpus_and_windows():
    text = load_corpus("pydoc")
    assert len(text) > 100_000 and "assert" in text
    assert load_corpus(None) == text
    ids = list(range(1000))
    w = token_windows(ids, 300)
    assert [len(x) for x in w] == [300] * 3  # the partial tail is dropped
    assert [t for x in w for t in x] == ids[:900]  # consecutive, not overlapping
    assert len(token_windows(ids, 100, max_windows=4)) == 4
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(ids[:50], 100)
    with pytest.raises(ValueError, match="window must be >= 2"):
        token_windows(ids, 1)


def test_unreadable_text_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=f"cannot read text file '{missing}'"):
        load_corpus(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="cannot read text file"):
        load_corpus(str(binary))
    # the CLI says so before loading any model
    assert main(["eval", "perplexity", "--text", str(missing)]) == 2
    assert f"cannot read text file '{missing}'" in capsys.readouterr().err
