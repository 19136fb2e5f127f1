"""Tokenizers: rebuild a GGUF's byte-level BPE as a Hugging Face tokenizer, and load one.

A GGUF stores the vocabulary, the merges and the *name* of llama.cpp's pre-tokenizer
(`tokenizer.ggml.pre`), not its regexes. The regexes below are those llama.cpp's
llama-vocab.cpp runs for each name: llama.cpp applies them in order, each splitting the
pieces of the previous one and keeping the unmatched spans, which is what a chain of
`Split(..., behavior="isolated")` does. An unknown name raises rather than tokenizing wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gguf import GGUFReader, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kestrel.loader.gguf import gguf_field, read_gguf

# GPT-2's pattern as llama.cpp writes it (no trailing `|\s+`: leftover whitespace is kept as an
# unmatched span, which gives the same pieces).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

_SMOLLM = (r"\p{N}", _GPT2)  # one digit per piece, then GPT-2
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
}
# llama.cpp's per-type defaults: llama3 looks whole words up before merging, and adds BOS.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}
_ADD_BOS_DEFAULT = {"llama3", "llama-v3", "llama-bpe"}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer matching llama.cpp's split for `tokenizer.ggml.pre`."""
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                         f"supported: {sorted(PRE_TOKENIZER_REGEXES)}")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
              for r in PRE_TOKENIZER_REGEXES[pre]]
    # The regex splits happen above; ByteLevel only maps bytes to its printable alphabet.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _token_name(tokens: list[str], reader: GGUFReader, kind: str) -> str | None:
    """The text of the bos/eos/unknown/padding token, if the GGUF names an id for it."""
    idx = gguf_field(reader, f"tokenizer.ggml.{kind}_token_id")
    return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None


def _gguf_tokenizer_settings(reader: GGUFReader) -> dict[str, Any]:
    """tokenizer_config.json content: special tokens, BOS/EOS policy, chat template."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    arch = gguf_field(reader, "general.architecture", "llama")
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token_name(tokens, reader, "bos"),
        "eos_token": _token_name(tokens, reader, "eos"),
        "unk_token": _token_name(tokens, reader, "unknown"),
        "pad_token": _token_name(tokens, reader, "padding"),
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token",
                                         pre in _ADD_BOS_DEFAULT)),
        "add_eos_token": bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,  # decode(encode(s)) must give s back
        "model_max_length": int(gguf_field(reader, f"{arch}.context_length", 1 << 30)),
    }
    template = gguf_field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return cfg


def _post_processor(cfg: dict[str, Any], vocab: dict[str, int]) -> processors.PostProcessor:
    """Adds BOS/EOS around a sequence exactly when the GGUF says llama.cpp adds them."""
    bos = cfg["bos_token"] if cfg["add_bos_token"] and cfg["bos_token"] else None
    eos = cfg["eos_token"] if cfg["add_eos_token"] and cfg["eos_token"] else None
    pre, post = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
    pair = f"{pre}$A:0{post} {pre.replace(':0', ':1')}$B:1{post.replace(':0', ':1')}"
    special = [(t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=f"{pre}$A:0{post}", pair=pair,
                                         special_tokens=special)


def build_gguf_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE) equivalent to llama.cpp's for this GGUF."""
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE "
                         "('gpt2') is supported")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = []
    for m in gguf_field(reader, "tokenizer.ggml.merges", []):
        left, sep, right = m.partition(" ")
        if not sep or " " in right:
            raise ValueError(f"malformed GGUF merge {m!r}")
        merges.append((left, right))
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary holds duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens verbatim before any splitting.
    added = [AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
             for t, ty in zip(tokens, types, strict=True)
             if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    tok.post_processor = _post_processor(_gguf_tokenizer_settings(reader), vocab)
    return tok


def _as_reader(reader_or_path: GGUFReader | str | os.PathLike[str]) -> GGUFReader:
    return reader_or_path if isinstance(reader_or_path, GGUFReader) else read_gguf(reader_or_path)


def tokenizer_from_gguf(reader_or_path: GGUFReader | str | os.PathLike[str],
                        ) -> PreTrainedTokenizerFast:
    """The Hugging Face tokenizer of a GGUF, built in memory (same as the saved folder's)."""
    reader = _as_reader(reader_or_path)
    cfg = _gguf_tokenizer_settings(reader)
    cfg.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_object=build_gguf_tokenizer(reader), **cfg)


def save_gguf_tokenizer(reader_or_path: GGUFReader | str | os.PathLike[str],
                        out_dir: str | os.PathLike[str]) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir,
    so that `AutoTokenizer.from_pretrained(out_dir)` behaves as `tokenizer_from_gguf`."""
    reader = _as_reader(reader_or_path)
    out = Path(out_dir)
    tok = build_gguf_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))
    cfg = _gguf_tokenizer_settings(reader)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special_map = {k: cfg[k] for k in names if cfg[k] is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer of a model: a Hugging Face folder (or hub id), or a `.gguf` file."""
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return tokenizer_from_gguf(p)
    return AutoTokenizer.from_pretrained(str(path))
