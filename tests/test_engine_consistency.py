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


def test_long_prefill_token_threshold(default_model_path, prompts, alone):
    """No request computes more than 24 prompt tokens a step (the budget would hold whole
    prompts): the same tokens."""
    llm = LLM(str(default_model_path), debug_checks=True, long_prefill_token_threshold=24)
    sched, chunks = llm.engine.scheduler, []
    schedule = sched.schedule

    def spy(*a, **kw):
        out = schedule(*a, **kw)
        chunks.extend(s.num_new_tokens for s in out.scheduled)
        return out

    sched.schedule = spy
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    llm.engine.pool.check_invariants(expect_idle=True)
    assert got == alone and max(chunks) == 24


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


# ---- overlapped steps (async scheduling): step N+1 launched before step N's tokens land --------

def test_overlapped_steps_same_tokens_through_preemption(default_model_path, prompts, alone):
    llm, got = _batched(default_model_path, prompts, async_scheduling=True, max_model_len=256,
                        num_kv_blocks=20, enable_prefix_caching=False,
                        max_num_batched_tokens=64)
    assert llm.engine.overlap and llm.engine.scheduler.num_preemptions > 0
    assert got == alone
    assert all(r.num_pending == 0 for r in llm.engine.requests.values())


def _mixed_params(stop_text, stop_token):
    """Plain sampling only (nothing that needs host-side token history), with early stops."""
    return [SamplingParams(temperature=0.0, max_tokens=9),
            SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=12),
            SamplingParams(temperature=1.0, n=3, seed=4, max_tokens=7),
            SamplingParams(temperature=0.0, max_tokens=20, stop=[stop_text]),
            SamplingParams(temperature=0.0, max_tokens=15, stop_token_ids=[stop_token])]


def _run(path, prompts, alone, overlap):
    llm = LLM(str(path), debug_checks=True, async_scheduling=overlap, max_num_seqs=5)
    stop_text = llm.get_tokenizer().decode(alone[3][4:6])  # greedy text of prompt 3
    outs = llm.generate(prompts[:5], _mixed_params(stop_text, alone[4][6]))
    llm.engine.pool.check_invariants(expect_idle=True)
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


def test_overlapped_steps_match_sync_with_seeds_stops_and_n(default_model_path, prompts, alone):
    sync = _run(default_model_path, prompts, alone, overlap=False)
    assert sync[3][0][2] == sync[4][0][2] == "stop"  # stopped early, by string and by token
    assert _run(default_model_path, prompts, alone, overlap=True) == sync


def test_overlapped_steps_fall_back_for_penalties_and_logprobs(default_model_path, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=10, logprobs=3),
              GREEDY]
    got = {}
    for overlap in (False, True):
        llm = LLM(str(default_model_path), debug_checks=True, async_scheduling=overlap)
        outs = llm.generate(prompts[:3], params)
        got[overlap] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    assert got[True] == got[False]
    assert all(len(lp) == 10 for lp in [got[True][1][1]])


def test_abort_while_a_step_is_in_flight(default_model_path, prompts):
    llm = LLM(str(default_model_path), debug_checks=True, async_scheduling=True)
    eng = llm.engine
    for i, p in enumerate(prompts[:4]):
        eng.add_request(f"r{i}", p, GREEDY)
    eng.step()
    eng.step()
    assert eng._pending is not None  # a launched step has not landed yet
    eng.abort_request("r1")
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert "r1" not in outs and all(len(outs[f"r{i}"].outputs[0].token_ids) == 24
                                    for i in (0, 2, 3))
    eng.pool.check_invariants(expect_idle=True)


def test_last_layer_carries_only_the_rows_read(default_model_path, prompts, monkeypatch):
    """Past attention, the model's last layer runs its MLP only on rows whose output is read:
    a prompt's last row when it samples, none for a middle chunk, every prompt row of a
    request that wants prompt logprobs; the first layer runs every row. Tokens, logprobs and
    prompt logprobs as when every row goes through (``ForwardBatch.keep`` forced to None)."""
    from kestrel.executor.model_runner import ForwardBatch

    params = [SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=1,
                             ignore_eos=True)]
    texts = [prompts[5], prompts[2]]  # ~130 and ~50 tokens: chunks of 64 split the first

    def run() -> tuple[list, dict[str, list[int]]]:
        llm = LLM(str(default_model_path), max_num_batched_tokens=64)
        layers = list(llm.engine.executor.runner.model.layers.values())
        rows: dict[str, list[int]] = {"first": [], "last": []}
        for key, layer in (("first", layers[0]), ("last", layers[-1])):
            forward = layer.mlp.forward
            layer.mlp.forward = lambda x, f=forward, k=key: rows[k].append(len(x)) or f(x)
        return llm.generate(texts, params), rows

    pruned, rows = run()
    n_prompt = len(pruned[1].prompt_token_ids)
    assert max(rows["first"]) == 64  # the first layer: every row of a full chunk
    assert len(rows["last"]) < len(rows["first"])  # a middle chunk: no row past attention
    assert max(rows["last"]) <= 2 + n_prompt - 1 < 64  # sampled rows + the prompt-logprob rows
    monkeypatch.setattr(ForwardBatch, "keep", property(lambda self: None))
    full, rows = run()
    assert rows["last"] == rows["first"]
    for a, b in zip(pruned, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)
    got, want = pruned[1].prompt_logprobs, full[1].prompt_logprobs
    assert len(got) == len(want) == n_prompt
    for x, y in zip(got[1:], want[1:]):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
