"""Incremental detokenization that only ever emits complete characters.

Byte-level BPE splits multi-byte UTF-8 characters across tokens, and SentencePiece models decide
spacing from context, so in general text is decoded over a small window of previous tokens and
released only once it no longer ends in a replacement character (two ``tokenizer.decode`` calls
per token: ~17 µs, 4 ms a step at 256 running requests).

Byte-level tokenizers (GPT-2 style: Llama 3, SmolLM2) need no context: a token is a fixed byte
string and the text is the UTF-8 decoding of their concatenation. For them ``make_detokenizer``
looks each token's bytes up in a table built once per tokenizer and feeds them to an
incremental UTF-8 decoder, which also releases only complete characters (~1 µs a token).
"""

from __future__ import annotations

import codecs
import weakref
from typing import Any

_CONTEXT = 5  # prompt tokens kept as decoding context for the first output tokens
_BYTE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_detokenizer(tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True
                     ) -> IncrementalDetokenizer | ByteLevelDetokenizer:
    """The byte-table detokenizer where the tokenizer is byte-level, else the windowed one."""
    table = byte_table(tokenizer, skip_special_tokens) if tokenizer is not None else None
    if table is None:
        return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return ByteLevelDetokenizer(table)


def byte_table(tokenizer: Any, skip_special_tokens: bool) -> list[bytes] | None:
    """Each token id's bytes (special tokens empty when skipped), or None when the tokenizer's
    decoder is not plain ByteLevel. Built once per tokenizer and setting."""
    try:
        cached = _BYTE_TABLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build, do not cache
        cached = {}
    if skip_special_tokens not in cached:
        cached[skip_special_tokens] = _build_byte_table(tokenizer, skip_special_tokens)
    return cached[skip_special_tokens]


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 256
    for b in range(256):
        if b not in printable:
            table[chr(extra)] = b
            extra += 1
    return table


def _build_byte_table(tokenizer: Any, skip_special_tokens: bool) -> list[bytes] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    byte_of = _byte_of_char()
    # added tokens decode as their text, or to nothing when special and skipped: ask decode
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    added.update(tokenizer.get_added_vocab().values())
    table: list[bytes] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in added or piece is None:
            table.append(tokenizer.decode([i], skip_special_tokens=skip_special_tokens,
                                          clean_up_tokenization_spaces=False).encode())
        else:
            try:
                table.append(bytes(byte_of[c] for c in piece))
            except KeyError:  # a piece outside the byte alphabet: not plain byte-level
                return None
    return table


class ByteLevelDetokenizer:
    """``IncrementalDetokenizer``'s contract for byte-level tokenizers, from a byte table."""

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        piece = self.table[token_id] if 0 <= token_id < len(self.table) else b""
        delta = self.utf8.decode(piece)
        self.text += delta
        return delta


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True
                 ) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop(text: str, stops: list[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last ``new_chars`` characters of ``text``."""
    if not stops or not new_chars:
        return None
    best: tuple[int, str] | None = None
    for s in stops:
        lo = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, lo)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best
