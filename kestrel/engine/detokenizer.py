"""Incremental detokenization that only ever emits complete characters.

Byte-level BPE splits multi-byte UTF-8 characters across tokens, and SentencePiece models decide
spacing from context, so text is decoded over a small window of previous tokens and released
only once it no longer ends in a replacement character.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens kept as decoding context for the first output tokens


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
