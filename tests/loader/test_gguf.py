"""GGUF -> Hugging Face conversion: dequantization, q/k un-permute, names, config, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kestrel.loader.gguf import gguf_to_hf_folder, read_gguf, unpermute_qk
from kestrel.loader.pull import default_gguf_path, pull_default_model

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 256, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
          "in the beginning there was the word and the word was there"] * 20


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permute, rewritten from its definition:
    rows viewed as [n_head, 2, rows/n_head/2], the two middle axes swapped."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def toy_bpe() -> Tokenizer:
    """A byte-level BPE of about 300 tokens trained on a few sentences (GPT-2 pre-tokenizer)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def add_toy_tokenizer(w: GGUFWriter, tok: Tokenizer, pre: str = "gpt-2") -> None:
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}")


def hf_state(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face names and shapes ([out, in])."""
    rng = np.random.default_rng(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,),
              "output.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                   f"blk.{i}.attn_k.weight": (kv, HIDDEN), f"blk.{i}.attn_v.weight": (kv, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


def fake_q6_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q6_K blocks (gguf-py cannot quantize K-quants) with a sane fp16 scale d."""
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, 210), np.uint8)
    blocks[..., 208:210] = np.array([0.01], np.float16).view(np.uint8)  # d is the last field
    return blocks.reshape(rows, cols // 256 * 210)


# Layer 0 and the embeddings are quantized; layer 1 stays exact (F32/F16) except ffn_down.
TYPES = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_0,
         "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q8_0,
         "blk.0.attn_output.weight": Q.Q4_1, "blk.0.ffn_gate.weight": Q.BF16,
         "blk.0.ffn_up.weight": Q.Q4_0, "blk.0.ffn_down.weight": Q.Q6_K,
         "blk.1.attn_output.weight": Q.F16, "blk.1.ffn_down.weight": Q.Q8_0}


def write_tiny_gguf(path: Path, state: dict[str, np.ndarray], types: dict[str, Q],
                    tok: Tokenizer) -> dict[str, tuple[np.ndarray, Q]]:
    """Write a llama GGUF the way llama.cpp's convert does (q/k rows permuted); return what
    was stored for each tensor (raw data, type)."""
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(tok.get_vocab_size())
    add_toy_tokenizer(w, tok)
    stored = {}
    for name, hf_arr in state.items():
        arr = hf_arr
        if ".attn_q." in name or ".attn_k." in name:
            arr = llamacpp_permute(hf_arr, HEADS if ".attn_q." in name else KV_HEADS)
        qtype = types.get(name, Q.F32)
        data = fake_q6_k(*arr.shape) if qtype == Q.Q6_K else quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        stored[name] = (data, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("tiny")
    tok = toy_bpe()
    state = hf_state(tok.get_vocab_size())
    stored = write_tiny_gguf(tmp / "tiny.gguf", state, TYPES, tok)
    out = gguf_to_hf_folder(tmp / "tiny.gguf", tmp / "hf", progress=False)
    return tmp / "tiny.gguf", out, {"state": state, "stored": stored}


@pytest.mark.parametrize("n_head,head_dim", [(1, 4), (4, 16), (3, 64), (9, 64)])
def test_unpermute_inverts_llamacpp_permute(n_head: int, head_dim: int) -> None:
    x = np.random.default_rng(1).standard_normal((n_head * head_dim, 5)).astype(np.float32)
    permuted = llamacpp_permute(x, n_head)
    assert not np.array_equal(permuted, x)
    assert torch.equal(unpermute_qk(torch.from_numpy(permuted), n_head), torch.from_numpy(x))
    bias = x[:, 0].copy()  # llama.cpp permutes q/k biases with the same function
    assert torch.equal(unpermute_qk(torch.from_numpy(llamacpp_permute(bias, n_head)), n_head),
                       torch.from_numpy(bias))


def test_tensors_equal_dequantized_originals(tiny: tuple[Path, Path, dict]) -> None:
    _, out, ref = tiny
    saved = load_file(str(out / "model.safetensors"))
    assert len(saved) == len(ref["stored"])
    for name, (data, qtype) in ref["stored"].items():
        key = _hf_name(name)
        got = saved[key].numpy()
        assert got.dtype == np.float32, key
        if ".attn_q." in name or ".attn_k." in name:
            got = llamacpp_permute(got, HEADS if ".attn_q." in name else KV_HEADS)
        np.testing.assert_array_equal(got, dequantize(data, qtype).reshape(got.shape), err_msg=key)
    # Unquantized tensors come back bit-exact, un-permuted q/k included.
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "output_norm.weight"):
        key = _hf_name(name)
        np.testing.assert_array_equal(saved[key].numpy(), ref["state"][name], err_msg=key)


def _hf_name(gguf_name: str) -> str:
    table = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    if gguf_name in table:
        return table[gguf_name]
    _, layer, stem, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{table[stem]}.{kind}"


def test_config_and_tokenizer_files(tiny: tuple[Path, Path, dict]) -> None:
    _, out, _ = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 64, 256)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["tie_word_embeddings"] is False  # output.weight is present
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, 300)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_converted_tiny_model_matches_reference(tiny: tuple[Path, Path, dict]) -> None:
    """transformers' LlamaForCausalLM on the converted folder equals one built by hand from the
    original (unpermuted) weights: checks names, the q/k un-permute and config together."""
    _, out, ref = tiny
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = {k: torch.from_numpy(v) for k, v in ref["state"].items()}
    saved = load_file(str(out / "model.safetensors"))
    for name, (_, qtype) in ref["stored"].items():  # quantized ones: dequantized originals
        if qtype != Q.F32:
            expected[name] = saved[_hf_name(name)]
    ref_model = AutoModelForCausalLM.from_config(model.config).eval()
    ref_model.load_state_dict({_hf_name(k): v for k, v in expected.items()})
    ids = torch.tensor([[5, 17, 42, 99, 250, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=0, atol=0)


def test_truncated_gguf_names_file(tiny: tuple[Path, Path, dict], tmp_path: Path) -> None:
    src, _, _ = tiny
    data = src.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(bad.name)):
            gguf_to_hf_folder(bad, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"tensor '(blk|output|token)"):
        read_gguf(bad)


def test_failed_conversion_keeps_previous_folder(tiny: tuple[Path, Path, dict],
                                                 tmp_path: Path) -> None:
    src, _, _ = tiny
    out = gguf_to_hf_folder(src, tmp_path / "hf", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out = gguf_to_hf_folder(src, out, progress=False)  # replacing a folder works
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(ValueError, match="bad.gguf"):
        gguf_to_hf_folder(bad, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "hf"]


@pytest.fixture(scope="session")
def default_model() -> Path:
    return pull_default_model(progress=False)


def test_default_model_config(default_model: Path) -> None:
    cfg = json.loads((default_model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert (cfg["hidden_size"], *heads) == (576, 9, 3)
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert default_gguf_path().is_file()


def test_default_model_says_paris(default_model: Path) -> None:
    """A wrong q/k un-permute scrambles rope and gives garbage; a right one knows Paris."""
    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
