"""The scheduler's side of overlapped steps, driven by hand: pending tokens, placeholders,
the max_tokens gate, and preempted requests waiting for their in-flight token."""

from __future__ import annotations

import pytest

from kestrel.config import SchedulerConfig
from kestrel.core.block_pool import BlockPool, KVCacheManager
from kestrel.core.scheduler import Scheduler
from kestrel.request import Request, RequestStatus
from kestrel.sampling_params import SamplingParams


def _setup(num_blocks: int = 16, budget: int = 64) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks=num_blocks, block_size=4))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_model_len=64), kv)


def _req(rid: str, n_prompt: int, max_tokens: int) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)


def _land(req: Request, token: int) -> None:
    """What the engine does when a step's sampled token reaches the host."""
    req.num_pending -= 1
    req.output_token_ids.append(token)


def test_next_step_extends_by_a_placeholder_before_the_token_lands():
    s = _setup()
    r = _req("a", 6, max_tokens=3)
    s.add(r)
    first = s.schedule().scheduled[0]
    assert (first.start, first.token_ids, first.sample) == (0, [1, 2, 3, 4, 5, 6], True)
    assert (r.num_computed_tokens, r.num_pending) == (6, 1)
    second = s.schedule().scheduled[0]  # step 1 has not landed: its token is a placeholder
    assert (second.start, second.token_ids, second.sample) == (6, [-1], True)
    assert r.num_pending == 2 and len(second.block_ids) == 2  # position 6 needs block 2
    _land(r, 50)
    third = s.schedule().scheduled[0]  # the third token would be the last one allowed
    assert (third.start, third.token_ids) == (7, [-1])
    assert s.schedule().is_empty  # max_tokens reached counting pending tokens: nothing more
    _land(r, 51)
    _land(r, 52)
    assert r.output_token_ids == [50, 51, 52] and r.num_pending == 0


def test_landed_tokens_replace_placeholders_in_later_steps():
    s = _setup()
    r = _req("a", 3, max_tokens=8)
    s.add(r)
    s.schedule()
    _land(r, 40)  # landed before the next schedule: a plain (non-overlapped) step
    step = s.schedule().scheduled[0]
    assert (step.start, step.token_ids) == (3, [40])


def test_chunked_prompt_samples_only_at_its_end():
    s = _setup(budget=4)
    r = _req("a", 10, max_tokens=2)
    s.add(r)
    chunks = [s.schedule().scheduled[0] for _ in range(3)]
    assert [(c.start, len(c.token_ids), c.sample) for c in chunks] == [
        (0, 4, False), (4, 4, False), (8, 2, True)]
    assert r.num_pending == 1 and -1 not in sum((c.token_ids for c in chunks), [])


def test_preempted_request_waits_for_its_in_flight_token():
    s = _setup(num_blocks=3)  # 12 token slots
    a, b = _req("a", 4, max_tokens=20), _req("b", 4, max_tokens=20)
    s.add(a)
    s.add(b)
    s.schedule()  # both prefills: 2 blocks used, both sample
    out = s.schedule()  # each needs a new block for position 4: only one left, b preempted
    assert out.preempted_ids == ["b"] and b.status is RequestStatus.PREEMPTED
    assert [x.request_id for x in out.scheduled] == ["a"] and b.num_pending == 1
    s.finish(a, RequestStatus.FINISHED_ABORTED)  # room again, but b's token is in flight
    assert s.schedule().is_empty
    _land(b, 77)
    again = s.schedule().scheduled[0]  # prompt block from the prefix cache, then the landed
    assert (again.request_id, again.start, again.token_ids, again.sample) == (  # token
        "b", 4, [77], True)
    assert again.block_ids[0] in s.kv.pool.cached.values()


def test_long_prefill_token_threshold_caps_each_request_per_step():
    """threshold 4: a 10-token prompt computes 4 + 4 + 2 tokens while a short prompt beside it
    goes in whole and decodes; without it the budget takes the whole prompt."""
    kv = KVCacheManager(BlockPool(num_blocks=16, block_size=4))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64,
                                  long_prefill_token_threshold=4), kv)
    a, b = _req("a", 10, max_tokens=2), _req("b", 3, max_tokens=4)
    s.add(a)
    s.add(b)
    steps = []
    for _ in range(4):
        out = s.schedule().scheduled
        steps.append([(x.request_id, x.num_new_tokens, x.sample) for x in out])
        for r in (a, b):
            while r.num_pending:
                _land(r, 7)
    assert steps == [[("a", 4, False), ("b", 3, True)], [("a", 4, False), ("b", 1, True)],
                     [("a", 2, True), ("b", 1, True)], [("a", 1, True), ("b", 1, True)]]
    s2 = _setup()
    s2.add(_req("a", 10, max_tokens=2))
    assert s2.schedule().scheduled[0].num_new_tokens == 10


def test_long_prefill_token_threshold_is_checked():
    with pytest.raises(ValueError, match=">= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="chunked prefill"):
        SchedulerConfig(max_num_batched_tokens=64, max_model_len=64,
                        enable_chunked_prefill=False, long_prefill_token_threshold=8)
