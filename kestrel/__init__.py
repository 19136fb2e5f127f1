"""Kestrel: a fast, correct LLM inference engine."""

from __future__ import annotations

from kestrel.sampling_params import SamplingParams
from kestrel.structured import StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and loaders; import it lazily so `import kestrel` stays light.
    if name == "LLM":
        from kestrel.engine.llm import LLM

        return LLM
    raise AttributeError(name)
