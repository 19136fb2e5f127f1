"""Speculative decoding in the engine, on the real default model: greedy tokens equal plain
decoding's, the prefix cache never keeps a rejected guess's K/V, sampled requests finish as
asked, and the counters add up."""

from __future__ import annotations

import pytest

from kestrel import LLM, SamplingParams
from kestrel.engine.args import EngineArgs
from kestrel.executor.model_runner import verifies_as_decode
from kestrel.request import Request

# output that repeats its input, where prompt lookup finds guesses
PROMPTS = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):",
           "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
           "The cat sat on the mat. The cat sat on the mat. The cat"]


@pytest.fixture(scope="module")
def spec_llm(default_model_path):
    """Blocks of 4 tokens, so that verified steps often end mid-block and a rejected guess's
    K/V shares a block with kept tokens."""
    return LLM(str(default_model_path), dtype="float32", device="cpu", debug_checks=True,
               speculative_method="ngram", num_speculative_tokens=4, block_size=4)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_greedy_equals_plain_decoding_and_guesses_are_kept(spec_llm, smollm_llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    stats = spec_llm.engine.stats
    d0, a0, steps0 = stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_steps
    got = _tokens(spec_llm, PROMPTS, params)
    spec_steps = stats.num_steps - steps0
    plain_steps0 = smollm_llm.engine.stats.num_steps
    assert got == _tokens(smollm_llm, PROMPTS, params)
    assert all(len(t) == 40 for t in got)
    drafted, accepted = stats.num_draft_tokens - d0, stats.num_accepted_tokens - a0
    assert 0 < accepted <= drafted
    assert spec_steps < smollm_llm.engine.stats.num_steps - plain_steps0  # kept guesses save steps
    assert not spec_llm.engine.scheduler.proposer._seen  # finished requests were released


def test_prefix_cache_reuse_after_speculation(spec_llm, smollm_llm):
    """Prompts that continue earlier speculative requests (finished at several lengths) reuse
    their blocks from the prefix cache and give the greedy tokens of an engine that never
    speculated (the rejected-guess case is scripted in the next test)."""
    lengths = range(36, 44)
    firsts = spec_llm.generate([PROMPTS[i % 3] for i in range(len(lengths))],
                               [SamplingParams(temperature=0, max_tokens=n) for n in lengths])
    follows = [{"prompt_token_ids": o.prompt_token_ids + o.outputs[0].token_ids}
               for o in firsts]
    hits0 = spec_llm.engine.pool.hits
    nxt = SamplingParams(temperature=0, max_tokens=4)
    got = _tokens(spec_llm, follows, nxt)
    assert spec_llm.engine.pool.hits - hits0 >= sum(len(f["prompt_token_ids"]) - 8
                                                    for f in follows)
    assert got == _tokens(smollm_llm, follows, nxt)


def test_a_rejected_guess_never_enters_the_prefix_cache():
    """A request that ends on the target's own token right after rejecting every guess, that
    token completing a block: the step wrote a guess's K/V at its position, so that block must
    not be cached (scripted verification on a random-weight model; EOS id 2)."""
    llm = LLM("tiny-llama", load_format="dummy", device="cpu", block_size=4, debug_checks=True,
              speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    real = engine.sampler.verify

    def scripted(chunks):  # one request: the token it appends completes a block → EOS
        _, _, req = chunks[0]
        return [[2]] if (req.num_tokens + 1) % 4 == 0 else real(chunks)

    engine.sampler.verify = scripted
    prompt = [5, 6, 7, 8, 9] * 3  # guesses from the first step on
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0,
                                                                      max_tokens=30))[0]
    tokens = prompt + out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "stop" and tokens[-1] == 2 and len(tokens) % 4 == 0
    probe = Request("probe", tokens, SamplingParams(), 1)
    cached = engine.pool.find_cached(engine.kv.block_hashes(probe))
    assert len(cached) == len(tokens) // 4 - 1  # all but the block of the last token


def test_sampled_requests_finish_as_asked(spec_llm, smollm_llm):
    """Seeded sampling through verification: the same seed gives the same tokens, max_tokens
    and stop strings hold, n samples each run."""
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=30, seed=5, n=2)
    a = spec_llm.generate(PROMPTS, params)
    b = spec_llm.generate(PROMPTS, params)
    assert [[c.token_ids for c in o.outputs] for o in a] == \
        [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(c.token_ids) == 30 for o in a for c in o.outputs)
    # a stop string inside a run of kept guesses ends the request there, as without them
    stop = SamplingParams(temperature=0, max_tokens=40, stop=["9,"])
    got, plain = (llm.generate([PROMPTS[1]], stop)[0].outputs[0] for llm in (spec_llm, smollm_llm))
    assert (got.text, got.finish_reason, got.token_ids) == \
        (plain.text, "stop", plain.token_ids)


def test_requests_that_read_their_history_are_not_speculated(spec_llm):
    stats = spec_llm.engine.stats
    d0 = stats.num_draft_tokens
    spec_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20, logprobs=1))
    spec_llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20,
                                                   repetition_penalty=1.1))
    assert stats.num_draft_tokens == d0


def test_pipeline_parallel_is_refused():
    with pytest.raises(ValueError, match="pipeline"):
        EngineArgs(model="tiny-llama", load_format="dummy", device="cpu",
                   pipeline_parallel_size=2, speculative_method="ngram").create_config()


def test_speculative_flags_from_the_command_line():
    from kestrel.cli import build_parser
    from kestrel.engine.args import engine_args_from_cli

    ns = build_parser().parse_args(["serve", "--preset", "tiny-llama", "--device", "cpu",
                                    "--speculative-method", "ngram", "--num-speculative-tokens",
                                    "6", "--prompt-lookup-max", "4", "--prompt-lookup-min", "2",
                                    "--speculative-disable-batch-size", "32"])
    cfg = engine_args_from_cli(ns).create_config()
    assert (cfg.speculative.method, cfg.speculative.num_speculative_tokens,
            cfg.speculative.prompt_lookup_max, cfg.speculative.prompt_lookup_min,
            cfg.speculative.disable_batch_size) == ("ngram", 6, 4, 2, 32)
    assert not cfg.overlap_steps  # a verified step decides where the next one starts
    assert EngineArgs(model="tiny-llama", load_format="dummy", device="cpu").create_config() \
        .speculative.method is None


def test_preemption_under_a_tight_cache_loses_nothing():
    """A pool too small for every request at once: guesses are dropped before anyone is
    preempted for them, preempted requests recompute, and every request gets the tokens a
    plain engine with the same pool gives (random-weight model; block invariants checked)."""
    prompts = [{"prompt_token_ids": [3 + i, 5, 7, 9, 11] * 6} for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40)
    kw = {"load_format": "dummy", "device": "cpu", "block_size": 4, "num_kv_blocks": 40,
          "max_model_len": 128, "max_num_seqs": 6, "debug_checks": True}
    spec = LLM("tiny-llama", speculative_method="ngram", **kw)
    got = _tokens(spec, prompts, params)
    assert spec.engine.stats.num_preemptions > 0 and spec.engine.stats.num_accepted_tokens > 0
    assert got == _tokens(LLM("tiny-llama", **kw), prompts, params)


def test_verified_steps_as_rows_of_decode_give_the_same_tokens(spec_llm, smollm_llm,
                                                               monkeypatch):
    """On a GPU a step of decoding requests with guesses runs as a decode batch of one row per
    token (ModelRunner.flat_drafts, so the decode CUDA graphs serve it). Forced here without
    graphs: each row attends to its own context and greedy tokens still equal plain
    decoding's."""
    runner = spec_llm.engine.executor.runner
    metas = []
    real_prepare = runner.prepare

    def prepare(out, prev=None):
        batch = real_prepare(out, prev)
        metas.append((out, batch.meta))
        return batch

    monkeypatch.setattr(runner, "flat_drafts", lambda seqs, n: verifies_as_decode(seqs))
    monkeypatch.setattr(runner, "prepare", prepare)
    params = SamplingParams(temperature=0, max_tokens=40)
    assert _tokens(spec_llm, PROMPTS, params) == _tokens(smollm_llm, PROMPTS, params)
    flat = [(out, m) for out, m in metas if any(s.num_draft for s in out.scheduled)
            and m.is_decode_only]
    assert flat, "no verified step ran as decode rows"
    for out, meta in flat:
        lens = [s.start + j + 1 for s in out.scheduled for j in range(s.num_new_tokens)]
        assert meta.seq_lens.tolist() == lens and meta.num_seqs == out.num_batched_tokens


@pytest.mark.parametrize("disable_at", [2, 4])
def test_no_guesses_while_the_batch_is_large(default_model_path, smollm_llm, disable_at):
    """--speculative-disable-batch-size: three requests running together get guesses only
    when the bound is above three; the tokens are plain decoding's either way."""
    llm = LLM(str(default_model_path), dtype="float32", device="cpu",
              speculative_method="ngram", speculative_disable_batch_size=disable_at)
    params = SamplingParams(temperature=0, max_tokens=24)
    assert _tokens(llm, PROMPTS, params) == _tokens(smollm_llm, PROMPTS, params)
    drafted = llm.engine.stats.num_draft_tokens
    assert (drafted > 0) == (disable_at > 3)
