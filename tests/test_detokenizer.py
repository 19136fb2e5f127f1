"""The byte-table detokenizer against the tokenizer's own decode, on the default model's
byte-level BPE tokenizer: any token sequence, special tokens kept or skipped."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.engine.detokenizer import (ByteLevelDetokenizer, IncrementalDetokenizer,
                                        make_detokenizer)


@pytest.fixture(scope="module")
def tok(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path))


def _decode(tok, ids, skip):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.booleans())
def test_byte_table_text_is_the_tokenizers_decode(tok, data, skip):
    """Deltas concatenate to decode(ids) (incomplete trailing bytes held back, then flushed)
    and never end inside a character."""
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    d = make_detokenizer(tok, [], skip)
    assert isinstance(d, ByteLevelDetokenizer)
    deltas = [d.add(i) for i in ids]
    assert "".join(deltas) + d.utf8.decode(b"", final=True) == _decode(tok, ids, skip)
    # a complete character is released at once: the text so far is a prefix of decode(ids)
    # as soon as the bytes so far form complete UTF-8
    assert _decode(tok, ids, skip).startswith("".join(deltas))


def test_natural_text_streams_as_the_windowed_detokenizer_does(tok):
    """The same text, never later: the windowed one also holds back a space while the next
    character is incomplete; the byte table releases what is complete."""
    text = "Emoji 🙂👍🏽 and 東京, naïve café <|im_end|> ünïcödé … done."
    ids = tok.encode(text)
    for skip in (True, False):
        fast, ref = make_detokenizer(tok, ids[:3], skip), IncrementalDetokenizer(tok, ids[:3], skip)
        got = want = ""
        for i in ids:
            got, want = got + fast.add(i), want + ref.add(i)
            assert got.startswith(want)
        assert got == want


def test_non_byte_level_or_missing_tokenizers_take_the_windowed_path():
    assert isinstance(make_detokenizer(None, [1, 2], True), IncrementalDetokenizer)

    class Plain:  # no backend tokenizer: e.g. a slow SentencePiece tokenizer
        pass

    assert isinstance(make_detokenizer(Plain(), [], True), IncrementalDetokenizer)
