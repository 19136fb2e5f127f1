"""The same greedy tokens however a request is batched, chunked, cached or preempted."""

from __future__ import annotations

import pydoc_data.topics as topics
import pytest

from kestrel import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _texts(n: int) -> list[str]:
    docs = [v for v in topics.topics.values() if len(v) > 2000][:n]
    # mixed lengths: 20 .. ~170 tokens
    return [d[: 80 + 40 * (i % 8) * 2] for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def prompts():
    return _texts(16)


@pytest.fixture(scope="module")
def alone(default_model_path, prompts):
    llm = LLM(str(default_model_path), debug_checks=True)
    return [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]


def _batched(path, prompts, **kw):
    llm = LLM(str(path), debug_checks=True, **kw)
    outs = llm.generate(prompts, GREEDY)
    llm.engine.pool.check_invariants(expect_idle=True)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_batch_of_16_mixed_lengths(default_model_path, prompts, alone):
    _, got = _batched(default_model_path, prompts)
    assert got == alone


def test_chunked_prefill_32(default_model_path, prompts, alone):
    llm, got = _batched(default_model_path, prompts, max_num_batched_tokens=32)
    assert got == alone
    assert llm.engine.stats.num_steps > len(prompts) * 3  # prompts really were split


def test_prefix_cache_hits(default_model_path, prompts, alone):
    llm = LLM(str(default_model_path), debug_checks=True)
    first = llm.generate(prompts, GREEDY)
    again = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in first] == alone
    assert [o.outputs[0].token_ids for o in again] == alone
    assert all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 16)


def test_preemption_with_tiny_pool(default_model_path, prompts, alone):
    llm, got = _batched(default_model_path, prompts, max_model_len=256, num_kv_blocks=20,
                        enable_prefix_caching=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == alone
