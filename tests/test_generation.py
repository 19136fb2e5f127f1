"""End-to-end generation on the default model: greedy parity with transformers and the API."""

from __future__ import annotations

import pytest
import torch

from kestrel import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three prime numbers: 2, 3,",
    "The chemical formula of water is",
    "In 1969, humans first",
    "Translate to French: Good morning! ->",
    "Q: What is 12 times 12?\nA:",
]


def test_greedy_64_tokens_match_transformers_generate(default_model_path, smollm_llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is sampled but does not stop
    tok = smollm_llm.get_tokenizer()
    outs = smollm_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64,
                                                       ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                              pad_token_id=tok.eos_token_id)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), prompt


def test_stop_string_across_token_boundary_is_excluded(smollm_llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = smollm_llm.generate(PROMPTS[2], greedy)[0].outputs[0]
    tok = smollm_llm.get_tokenizer()
    # A stop string made of the end of token 3 and the start of token 4 spans their boundary.
    a, b = tok.decode(full.token_ids[:4]), tok.decode(full.token_ids[:5])
    stop = a[-2:] + b[len(a):len(a) + 2]
    assert len(stop) == 4 and stop in full.text
    out = smollm_llm.generate(PROMPTS[2], greedy.clone(stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    kept = smollm_llm.generate(PROMPTS[2], greedy.clone(stop=[stop],
                                                       include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_eos_and_length(smollm_llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = smollm_llm.generate(PROMPTS[0], greedy)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_tok = full.token_ids[5]
    out = smollm_llm.generate(PROMPTS[0], greedy.clone(stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    chat = smollm_llm.chat([{"role": "user", "content": "Say hello."}],
                           SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in chat.text


def test_logprobs_and_prompt_logprobs(smollm_llm):
    p = SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2)
    out = smollm_llm.generate(PROMPTS[4], p)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert tok in lp and lp[tok] == max(lp.values())  # greedy picks the top logprob
        assert all(v <= 0 for v in lp.values())
    n = len(out.prompt_token_ids)
    assert len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
    for pos in range(1, n):
        assert out.prompt_token_ids[pos] in out.prompt_logprobs[pos]


def test_n_samples_share_prompt_blocks(smollm_llm):
    import pydoc_data.topics as topics

    engine = smollm_llm.engine
    prompt = topics.topics["assert"][:400] + "\nWrite a short poem about it:"  # > 4 blocks
    p = SamplingParams(n=3, temperature=1.5, seed=11, max_tokens=8)
    hits_before = engine.pool.hits
    out = smollm_llm.generate(prompt, p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct samples
    # samples 1 and 2 found every full prompt block of sample 0 in the cache (a fresh prompt)
    bs = engine.cfg.cache.block_size
    prompt_blocks = (len(out.prompt_token_ids) - 1) // bs
    assert prompt_blocks >= 4
    assert engine.pool.hits - hits_before == 2 * prompt_blocks * bs
    engine.pool.check_invariants(expect_idle=True)
    again = smollm_llm.generate(prompt, p)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert again.num_cached_tokens == prompt_blocks * engine.cfg.cache.block_size


def test_utf8_streaming_never_splits_characters(smollm_llm):
    tok = smollm_llm.get_tokenizer()
    text = "Emoji 🙂👍🏽 and 東京 and naïve café."
    ids = tok.encode(text)
    from kestrel.engine.detokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer(tok, [], True)
    pieces = [d.add(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("kw,needle", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must"),
])
def test_bad_sampling_params_raise_named_errors(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_bad_prompts_leave_engine_usable(smollm_llm):
    engine = smollm_llm.engine
    with pytest.raises(ValueError, match="empty"):
        smollm_llm.generate([{"prompt_token_ids": []}])
    too_long = [5] * engine.cfg.scheduler.max_model_len
    with pytest.raises(ValueError, match=f"max_model_len={engine.cfg.scheduler.max_model_len}"):
        smollm_llm.generate(["fine prompt", {"prompt_token_ids": too_long}])
    with pytest.raises(ValueError, match="token ids"):
        smollm_llm.generate([{"prompt_token_ids": [1, 10**9]}])
    assert not engine.has_unfinished_requests()
    engine.pool.check_invariants(expect_idle=True)
    out = smollm_llm.generate("still works", SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_unknown_model_path_is_a_clear_error():
    from kestrel import LLM

    with pytest.raises(ValueError, match="not found"):
        LLM("/nonexistent/model/folder")


def test_final_only_requests_emit_one_output_when_finished(smollm_llm):
    """output_kind="final_only" (what LLM.generate uses): no RequestOutput per step, one at the
    end with the same tokens as a streamed ("cumulative") request's last output."""
    engine = smollm_llm.engine
    prompt = smollm_llm.get_tokenizer().encode("The capital of France is")
    seen: dict[str, list] = {"stream": [], "final": []}
    for kind, rid in (("cumulative", "stream"), ("final_only", "final")):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=6, temperature=0,
                                                       ignore_eos=True, output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["stream"]) == 6 and len(seen["final"]) == 1 and seen["final"][0].finished
    assert seen["final"][0].outputs[0].token_ids == seen["stream"][-1].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="deltas")


def test_delta_outputs_add_up_to_the_cumulative_ones(smollm_llm):
    """output_kind="delta" (the server's streams): each output holds only what is new, and the
    pieces concatenate to the cumulative request's outputs step by step: text (held back
    around a stop string), token ids and logprobs per sample, prompt logprobs once; metrics come
    with the finished output only, in both kinds."""
    from kestrel.outputs import merge_delta

    engine = smollm_llm.engine
    prompt = smollm_llm.get_tokenizer().encode("Count: one, two, three, four,")
    seen: dict[str, list] = {"cumulative": [], "delta": []}
    for kind in seen:
        engine.add_request(kind, prompt, SamplingParams(
            max_tokens=24, temperature=0.8, seed=7, n=2, stop=[" seven,"], logprobs=2,
            prompt_logprobs=1, output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    cum, deltas = seen["cumulative"], seen["delta"]
    assert len(cum) == len(deltas) > 1
    assert all(o.metrics is None for o in cum[:-1] + deltas[:-1])
    assert cum[-1].metrics is not None and deltas[-1].metrics is not None
    assert deltas[0].prompt_logprobs == cum[0].prompt_logprobs is not None
    assert all(o.prompt_logprobs is None for o in deltas[1:])
    acc = deltas[0]
    for c, d in zip(cum[1:], deltas[1:]):
        acc = merge_delta(acc, d)
        for a, b in zip(acc.outputs, c.outputs):
            assert (a.text, a.token_ids) == (b.text, b.token_ids)
            assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
            # the two requests share batches in other rows: logprobs agree to float noise
            assert [list(e) for e in a.logprobs] == [list(e) for e in b.logprobs]
            assert [v for e in a.logprobs for v in e.values()] == pytest.approx(
                [v for e in b.logprobs for v in e.values()], abs=1e-4)
    assert acc.finished and all(c.stop_reason == " seven," for c in acc.outputs)


def test_heap_frozen_only_inside_its_block():
    """The serve and bench commands run with the start-up heap frozen, and unfreeze it after
    (else a dropped engine's reference cycles would never be collected)."""
    import gc

    from kestrel.engine.engine import heap_frozen

    before = gc.get_freeze_count()
    with heap_frozen():
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == before
    with pytest.raises(KeyError), heap_frozen():
        raise KeyError("the block fails")
    assert gc.get_freeze_count() == before
