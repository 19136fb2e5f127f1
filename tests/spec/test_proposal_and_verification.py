"""Prompt-lookup proposals and their verification: greedy keeps what argmax would produce,
sampling keeps the target's distribution exactly (counted over many draws)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kestrel.config import SpeculativeConfig
from kestrel.layers.sampler import Sampler
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams
from kestrel.spec.ngram import ngram_lookup
from kestrel.spec.proposer import make_proposer
from kestrel.spec.rejection import accept_greedy, accept_sampled_batch

# The device verification runs on: the batched acceptance's gathers, draws and one host copy
# on CUDA tensors with CUDA generators, as the engine runs it there.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _look(ids: list[int], k: int, lo: int = 1, hi: int = 3) -> list[int]:
    return ngram_lookup(np.asarray(ids, dtype=np.int32).tobytes(), k, lo, hi)


def _brute_force(ids: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The definition: longest suffix first, its latest earlier occurrence."""
    for n in range(hi, lo - 1, -1):
        for s in range(len(ids) - n - 1, -1, -1):
            if ids[s: s + n] == ids[-n:]:
                return ids[s + n: s + n + k]
    return []


def test_ngram_proposes_what_followed_the_latest_match():
    # the suffix [7, 8] occurred at 1 and 5; the latest one (5) was followed by 9, 1, 7
    assert _look([0, 7, 8, 2, 3, 7, 8, 9, 1, 7, 8], 3) == [9, 1, 7]
    assert _look([0, 7, 8, 2, 3, 7, 8, 9, 1, 7, 8], 1) == [9]
    # fewer tokens follow the match than asked for: what there is
    assert _look([5, 6, 5], 4) == [6, 5]


def test_ngram_prefers_the_longest_suffix_and_stops_at_min():
    # 3-gram [1, 2, 3] matched at 0 (→ 40) though the 1-gram [3] matched later (→ 50)
    assert _look([1, 2, 3, 40, 9, 3, 50, 1, 2, 3], 1) == [40]
    assert _look([4, 3, 50, 1, 3], 2, lo=2) == []  # only a 1-gram matches
    assert _look([1, 2, 3, 4], 4) == []  # nothing repeats
    assert _look([1], 4) == [] and _look([1, 1], 0) == []
    # as bytes, [0] (00 00 00 00) occurs three times inside 7, 2^24 (07 00 00 00 00 00 00 01)
    # after the token 0: not token matches
    assert _look([0, 7, 1 << 24, 0], 2, hi=1) == [7, 1 << 24]


@pytest.mark.parametrize("lo, hi", [(1, 1), (1, 3), (2, 4), (3, 3)])
def test_ngram_lookup_is_the_brute_force_search(lo, hi):
    g = torch.Generator().manual_seed(lo * 10 + hi)
    for _ in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        # 4 symbols: many repeats; 0 and 256 also match across token boundaries as bytes
        ids = torch.tensor([0, 1, 256, 3])[torch.randint(0, 4, (n,), generator=g)].tolist()
        k = int(torch.randint(0, 5, (1,), generator=g))
        assert _look(ids, k, lo, hi) == _brute_force(ids, k, lo, hi), (ids, k)


def test_the_proposer_extends_its_copy_of_a_request_and_forgets_it():
    p = make_proposer(SpeculativeConfig("ngram", 4, 3, 1))
    req = Request("r", [5, 6, 7, 5], SamplingParams(), 200)
    assert p.propose(req, 2) == [6, 7]
    for t in [6, 7, 9] + list(range(100, 180)):  # grows past the buffer's first size
        req.output_token_ids.append(t)
        assert p.propose(req, 3) == _brute_force(req.all_token_ids, 3, 1, 3)
    p.release("r")
    assert "r" not in p._seen


def test_config_is_validated():
    with pytest.raises(ValueError, match="ngram"):
        SpeculativeConfig("eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig("ngram", 4, 2, 3)
    with pytest.raises(ValueError, match="disable_batch_size"):
        SpeculativeConfig("ngram", disable_batch_size=0)
    assert make_proposer(SpeculativeConfig()) is None


def test_greedy_keeps_guesses_while_they_are_the_argmax():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all kept, plus its own
    assert accept_greedy([4, 5, 6, 7], [4, 9, 6]) == [4, 5]
    assert accept_greedy([4, 5, 6, 7], [1, 5, 6]) == [4]


def _counts(samples: list[int], v: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(samples), minlength=v).double() / len(samples)


@pytest.mark.parametrize("dev", DEVICES)
def test_sampled_verification_keeps_the_target_distribution(dev):
    """Two guesses against fresh random targets: the first emitted token is distributed as p0,
    and the second, given the first guess was kept, as p1 (total variation under 0.02 over
    20k draws; the proposer's guess is a point mass, so without the residual draw the first
    token would be the guess far too often; the same with p0's least likely token)."""
    torch.manual_seed(0)
    v, n = 6, 20000
    probs = torch.softmax(torch.randn(3, v) * 1.5, -1)
    drafts = [int(probs[0].argsort()[-2]), int(probs[1].argmax())]  # p0's second choice
    gen = torch.Generator(device=dev).manual_seed(1)
    probs = probs.to(dev)
    outs = accept_sampled_batch(probs.repeat(n, 1), [drafts] * n, [gen] * n)
    first = _counts([o[0] for o in outs], v)
    probs = probs.cpu()
    assert (first - probs[0].double()).abs().sum() / 2 < 0.02
    kept = [o for o in outs if o[0] == drafts[0]]
    second = _counts([o[1] for o in kept], v)
    assert len(kept) > 500 and (second - probs[1].double()).abs().sum() / 2 < 0.05
    assert all(1 <= len(o) <= 3 for o in outs)
    rare = [o[0] for o in accept_sampled_batch(probs[:2].repeat(n, 1).to(dev),
                                               [[int(probs[0].argmin())]] * n, [gen] * n)]
    assert (_counts(rare, v) - probs[0].double()).abs().sum() / 2 < 0.02


def test_a_guess_the_target_excludes_is_never_kept():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    gen = torch.Generator().manual_seed(0)
    outs = {tuple(o) for o in accept_sampled_batch(probs.repeat(200, 1), [[2]] * 200,
                                                    [gen] * 200)}
    assert outs == {(0,), (1,)}


@pytest.mark.parametrize("dev", DEVICES)
def test_a_batch_of_requests_is_decided_row_by_row(dev):
    """Requests of 1, 3 and 2 guesses end to end, with certain outcomes: a guess of
    probability one is kept, one of probability zero rejected (the position then takes the
    other token of its row), and a request's own generator makes its draws repeatable."""
    def one_hot(tok: int, v: int = 4) -> list[float]:
        return [1.0 if t == tok else 0.0 for t in range(v)]

    probs = torch.tensor([one_hot(1), one_hot(2),  # r0: guess 1 kept, then 2
                          one_hot(3), [0.0, 0.0, 0.5, 0.5], one_hot(0), one_hot(1),  # r1
                          one_hot(2), one_hot(0), one_hot(3)]).to(dev)  # r2: guesses 2, 1
    drafts = [[1], [3, 2, 1], [2, 1]]

    def gen(seed: int) -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(seed)
    shared, seeded = gen(5), [gen(9) for _ in range(2)]
    got = accept_sampled_batch(probs, drafts, [shared, seeded[0], shared])
    assert got[0] == [1, 2]
    assert got[1][:1] == [3] and got[1][1] in (2, 3) and got[1][1:] in ([2, 0], [3])
    assert got[2] == [2, 0]  # guess 1 has probability 0 at its row: the row's other token
    again = accept_sampled_batch(probs, drafts, [gen(5), seeded[1], gen(5)])
    assert again == got


def test_sampler_verify_greedy_and_filtered_requests_together():
    """One call for a batch: greedy requests by their argmax, sampled ones through their
    filters (top_k=1 leaves one token per position, so it must agree with greedy too)."""
    torch.manual_seed(0)
    chunks, expected = [], []
    for i, params in enumerate([SamplingParams(temperature=0),
                                SamplingParams(temperature=0.8, top_k=1, seed=3),
                                SamplingParams(temperature=0)]):
        logits = torch.randn(i + 3, 40)
        best = logits.argmax(-1).tolist()
        guesses = best[:i + 1] + [(best[i + 1] + 1) % 40]  # the last guess is wrong
        chunks.append((logits, guesses, Request(f"r{i}", [1, 2], params, 16)))
        expected.append(best[:i + 2])
    assert Sampler().verify(chunks) == expected
