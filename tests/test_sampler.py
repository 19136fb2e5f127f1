"""Sampling draws from the distribution it claims, reproducibly, with penalties as defined."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from kestrel import LLM, SamplingParams
from kestrel.layers.sampler import Sampler
from kestrel.request import Request


def _reqs(n: int, **kw) -> list[Request]:
    p = SamplingParams(**kw)
    return [Request(f"r{i}", [1, 2, 3], p, max_tokens=8) for i in range(n)]


def _reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                     min_p: float) -> np.ndarray:
    """Written independently of the sampler: sort, cut by k, then by cumulative p, then min-p."""
    z = logits / temperature
    order = np.argsort(-z)
    p = np.exp(z[order] - z[order].max())
    keep = np.zeros_like(p, dtype=bool)
    keep[: top_k or len(p)] = True
    pk = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    mass_before = np.concatenate([[0.0], np.cumsum(pk)[:-1]])
    keep &= mass_before <= top_p
    keep &= pk >= min_p * pk[0]
    out = np.zeros_like(p)
    out[order] = np.where(keep, p, 0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 6, 0.9, 0.05)])
def test_empirical_distribution_matches_reference(temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(temperature.__hash__() + top_k)
    logits = torch.randn(1, 10, generator=g) * 1.5
    n = 20000
    reqs = _reqs(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    toks = Sampler(seed=123)(logits.expand(n, -1).clone(), reqs).token_ids
    counts = np.bincount(toks, minlength=10)
    ref = _reference_probs(logits[0].double().numpy(), temperature, top_k, top_p, min_p)
    assert counts[ref == 0].sum() == 0  # nothing outside the allowed set is ever drawn
    live = ref > 0
    stat = chisquare(counts[live], ref[live] * n)
    assert stat.pvalue > 1e-3


def test_greedy_is_argmax_and_penalties_apply():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    r = _reqs(1, temperature=0.0)[0]
    assert Sampler()(logits.clone(), [r]).token_ids == [4]
    # Token 4 is in the prompt-or-output: repetition penalty 2 halves its positive logit (3 → 1.5).
    r = Request("x", [4], SamplingParams(temperature=0.0, repetition_penalty=2.0), 8)
    assert Sampler()(logits.clone(), [r]).token_ids == [0]
    # Frequency penalty counts output occurrences: token 4 (once) 3.0 → 2.2 still wins.
    r = Request("y", [9], SamplingParams(temperature=0.0, frequency_penalty=0.8), 8)
    r.output_token_ids = [4]
    assert Sampler()(logits.clone(), [r]).token_ids == [4]
    r.output_token_ids = [4, 4]  # 3.0 - 1.6 = 1.4 < 2.0
    assert Sampler()(logits.clone(), [r]).token_ids == [0]
    r.params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    r.output_token_ids = [0, 4, 4]
    assert Sampler()(logits.clone(), [r]).token_ids == [1]  # 0 and 4 both lose 2.0


def test_min_tokens_blocks_eos():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    r = Request("m", [0], SamplingParams(temperature=0.0, min_tokens=2), 8, eos_token_ids=(1,))
    assert Sampler()(logits.clone(), [r]).token_ids == [2]
    r.output_token_ids = [2, 2]
    assert Sampler()(logits.clone(), [r]).token_ids == [1]


def test_logprobs_are_normalised_and_include_chosen():
    logits = torch.randn(3, 50)
    reqs = _reqs(3, temperature=0.0, logprobs=3)
    out = Sampler()(logits.clone(), reqs)
    ref = logits.log_softmax(-1)
    for row, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in lp and len(lp) == 3  # greedy: the chosen token is the top-1
        for t, v in lp.items():
            assert abs(v - float(ref[row, t])) < 1e-5


def test_seeded_sampling_independent_of_batch():
    llm = LLM("tiny-llama", load_format="dummy")
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": [5, 6, 7]}, p)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(3, 3 + k))} for k in (4, 9, 17)]
    batch = llm.generate(others + [{"prompt_token_ids": [5, 6, 7]}],
                         [SamplingParams(temperature=1.0, max_tokens=12)] * 3 + [p])
    assert batch[-1].outputs[0].token_ids == alone
    again = llm.generate({"prompt_token_ids": [5, 6, 7]}, p)[0].outputs[0].token_ids
    assert again == alone


def test_min_tokens_end_to_end():
    llm = LLM("tiny-llama", load_format="dummy")
    eos = llm.engine.eos_token_ids[0]
    out = llm.generate({"prompt_token_ids": [1, 2, 3]},
                       SamplingParams(min_tokens=5, max_tokens=6, temperature=0))[0].outputs[0]
    assert len(out.token_ids) >= 5 and eos not in out.token_ids[:5]
