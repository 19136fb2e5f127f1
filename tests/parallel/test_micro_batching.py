"""Micro-batching on the engine side, in one process: a fake pipeline of depth p runs each
micro-batch when it is collected, so the scheduler's in-flight bookkeeping, preemption and the
micro-batch beyond the stages are tested fast, without worker processes (test_tp_pp.py runs
real ones).
"""

from __future__ import annotations

import contextlib

import pytest

from kestrel import LLM
from kestrel.config import EngineConfig
from kestrel.core.scheduler import SchedulerOutput
from kestrel.engine.args import EngineArgs
from kestrel.engine.engine import Engine
from kestrel.executor.factory import UniProcExecutor
from tests.parallel.common import GREEDY, greedy_tokens, run_stream


@pytest.fixture(scope="module")
def ref_llm(tiny4) -> LLM:
    """One process, no pipeline: the tokens every micro-batched run must reproduce."""
    return LLM(str(tiny4), debug_checks=True)


class _FakePipeline:
    """A pipeline of depth ``cfg.parallel.pipeline_parallel_size`` in one process: a
    micro-batch runs when it is collected, oldest first (as the last stage returns them)."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.inner = UniProcExecutor(cfg)
        self.num_blocks = self.inner.num_blocks
        self.queue: list[SchedulerOutput] = []
        self.max_depth = 0

    def submit(self, out: SchedulerOutput) -> None:
        self.queue.append(out)
        self.max_depth = max(self.max_depth, len(self.queue))

    def collect(self):
        return self.inner.execute(self.queue.pop(0))

    def landing(self):
        return contextlib.nullcontext()

    def execute(self, out):
        return self.inner.execute(out)

    def shutdown(self) -> None:
        pass


def test_engine_micro_batching_depth3_in_one_process(tiny4, ref_llm):
    """The scheduler/engine side of micro-batching alone (fast): 3 in flight, preemption."""
    cfg = EngineArgs(model=str(tiny4), pipeline_parallel_size=3, max_model_len=160,
                     max_num_batched_tokens=40, num_kv_blocks=20, debug_checks=True,
                     pipeline_micro_batches=3).create_config()
    fake = _FakePipeline(cfg)
    engine = Engine(cfg, None, executor=fake)
    prompts = [[3 + (11 * i + j) % 470 for j in range(5 + (23 * i) % 50)] for i in range(16)]
    want = greedy_tokens(ref_llm, prompts)
    got, aborted = run_stream(engine, prompts)
    assert fake.max_depth == 3 and engine.scheduler.num_preemptions > 0
    assert all(got[str(i)] == want[i] for i in range(16) if str(i) != aborted)
    assert len(got) == 15
    engine.pool.check_invariants(expect_idle=True)


def test_pp_keeps_one_micro_batch_more_than_stages_by_default(tiny4, ref_llm):
    """PP=2 keeps three micro-batches in flight, while prompts wait and in the decode-only
    tail (the running requests split three ways), so the driver's stage always has one queued;
    ``pipeline_micro_batches=2`` keeps two."""
    prompts = [[3 + (7 * i + j) % 470 for j in range(20 + (13 * i) % 30)] for i in range(12)]
    want = greedy_tokens(ref_llm, prompts)
    for micro_batches, depth in ((None, 3), (2, 2)):
        cfg = EngineArgs(model=str(tiny4), pipeline_parallel_size=2, max_model_len=160,
                         max_num_batched_tokens=40, num_kv_blocks=40, debug_checks=True,
                         pipeline_micro_batches=micro_batches).create_config()
        fake = _FakePipeline(cfg)
        engine = Engine(cfg, None, executor=fake)
        decode_depths: list[int] = []  # in flight after submitting a decode-only micro-batch
        submit = fake.submit

        def record(out, submit=submit, fake=fake, engine=engine, decode_depths=decode_depths):
            submit(out)
            if not engine.scheduler.waiting and all(
                    s.start >= engine.requests[s.request_id].num_prompt_tokens
                    for s in out.scheduled):
                decode_depths.append(len(fake.queue))

        fake.submit = record  # type: ignore[method-assign]
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
        assert all(got[str(i)] == want[i] for i in range(12))
        assert fake.max_depth == depth and max(decode_depths) == depth
        engine.pool.check_invariants(expect_idle=True)


def test_fewer_micro_batches_than_stages_is_refused(tiny4):
    with pytest.raises(ValueError, match="pipeline_micro_batches"):
        EngineArgs(model=str(tiny4), pipeline_parallel_size=3,
                   pipeline_micro_batches=2).create_config()
