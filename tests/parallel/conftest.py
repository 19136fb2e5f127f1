"""Fixtures of the parallel tests: one tiny checkpoint and its one-process reference, shared
by the test modules of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from kestrel import LLM
from tests.helpers import prompt_logits
from tests.parallel.common import LONG, PROMPTS, greedy_tokens, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny4(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny4") / "tiny4")


@pytest.fixture(scope="session")
def tiny_ref(tiny4):
    llm = LLM(str(tiny4), debug_checks=True)
    tokens = greedy_tokens(llm, PROMPTS)
    return llm, tokens, prompt_logits(llm, LONG)
