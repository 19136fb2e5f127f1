"""The GGUF tokenizer must tokenize exactly as llama.cpp does, and survive a save/load trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer

from kestrel.loader.pull import default_gguf_path, pull_default_model, read_marker
from kestrel.loader.tokenizer import load_tokenizer, save_gguf_tokenizer, tokenizer_from_gguf

from .test_gguf import CORPUS, add_toy_tokenizer, toy_bpe

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
LLAMACPP = json.loads((FIXTURES / "smollm2_llamacpp_token_ids.json").read_text())
CASES = LLAMACPP["cases"]


@pytest.fixture(scope="session")
def default_model() -> Path:
    return pull_default_model(progress=False)


@pytest.fixture(scope="module", params=["gguf", "folder"])
def smol_tok(request: pytest.FixtureRequest, default_model: Path):
    """The tokenizer built from the GGUF in memory, and the one saved in the HF folder."""
    if request.param == "gguf":
        return tokenizer_from_gguf(default_gguf_path())
    return load_tokenizer(default_model)


def test_fixture_is_for_our_gguf(default_model: Path) -> None:
    assert read_marker(default_model)["gguf_sha256"] == LLAMACPP["gguf_sha256"]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:24] for c in CASES])
def test_matches_llamacpp_ids(smol_tok, case: dict) -> None:
    assert smol_tok.encode(case["text"], add_special_tokens=False) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:24] for c in CASES])
def test_decode_round_trip(smol_tok, case: dict) -> None:
    ids = smol_tok.encode(case["text"], add_special_tokens=False)
    assert smol_tok.decode(ids) == case["text"]


def test_special_tokens(smol_tok) -> None:
    assert smol_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert (smol_tok.bos_token, smol_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol_tok("Hi").input_ids == smol_tok.encode("Hi", add_special_tokens=False)  # no BOS
    assert smol_tok.decode([1, 4093, 198, 2], skip_special_tokens=True) == "user\n"


def test_chat_template(smol_tok) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    text = smol_tok.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert "<|im_start|>assistant\n4<|im_end|>" in text
    ids = smol_tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 3  # system, user, assistant turns


def _toy_gguf(path: Path, pre: str) -> Path:
    w = GGUFWriter(str(path), "llama")
    add_toy_tokenizer(w, toy_bpe(), pre=pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gpt2_pre_matches_reference_bpe(tmp_path: Path) -> None:
    """A GPT-2 byte-level BPE written to GGUF comes back tokenizing as the original."""
    reference: Tokenizer = toy_bpe()
    ours = tokenizer_from_gguf(_toy_gguf(tmp_path / "toy.gguf", "gpt-2"))
    save_gguf_tokenizer(tmp_path / "toy.gguf", tmp_path)
    saved = load_tokenizer(tmp_path)
    for text in [*CORPUS[:3], "  the  fox\n\n<|im_start|>jumps 1234 it's", "ünï 東京 🙂"]:
        want = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == want, text
        assert saved.encode(text, add_special_tokens=False) == want, text
        assert ours.decode(want) == text


def test_smollm_pre_splits_digits(tmp_path: Path) -> None:
    ours = tokenizer_from_gguf(_toy_gguf(tmp_path / "toy.gguf", "smollm"))
    pieces = ours.convert_ids_to_tokens(ours.encode("in 2024", add_special_tokens=False))
    assert pieces[-4:] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("pre", ["default", "llama-bpe", "gpt2", "qwen2"])
def test_other_pre_types_build(tmp_path: Path, pre: str) -> None:
    ours = tokenizer_from_gguf(_toy_gguf(tmp_path / "toy.gguf", pre))
    text = "the quick brown fox, 12345!"
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_unknown_pre_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pre-tokenizer 'made-up'"):
        tokenizer_from_gguf(_toy_gguf(tmp_path / "toy.gguf", "made-up"))
