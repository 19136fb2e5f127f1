"""The step loop: schedule → execute → sample → update, emitting RequestOutputs."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from kestrel.config import EngineConfig
from kestrel.core.block_pool import BlockPool, KVCacheManager
from kestrel.core.scheduler import Scheduler, SchedulerOutput
from kestrel.engine.group import RequestGroup
from kestrel.engine.stats import EngineStats
from kestrel.layers.sampler import Sampler
from kestrel.outputs import RequestOutput
from kestrel.parallel.pipeline import micro_batch_seq_cap
from kestrel.request import Request, RequestStatus
from kestrel.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Engine:
    """Single-process engine core. Not thread-safe: the async wrapper owns the only caller."""

    def __init__(self, cfg: EngineConfig, tokenizer: Any, executor: Any | None = None) -> None:
        from kestrel.executor.factory import make_executor

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.executor = executor or make_executor(cfg)
        num_blocks = self.executor.num_blocks
        max_len = cfg.scheduler.max_model_len
        if num_blocks * cfg.cache.block_size < max_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * cfg.cache.block_size} tokens "
                f"({num_blocks} blocks) but max_model_len is {max_len}: lower max_model_len or "
                f"give the cache more memory")
        self.pool = BlockPool(num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(cfg.scheduler, self.kv)
        self.sampler = Sampler(cfg.seed)
        self.requests: dict[str, Request] = {}  # live samples, by their own id
        self.groups: dict[str, RequestGroup] = {}  # live user requests, by the user's id
        self.stats = EngineStats()
        # Pipeline parallelism: up to pp micro-batches in flight (executor.submit / collect).
        pp = cfg.parallel.pipeline_parallel_size
        self.pipeline_depth = pp if pp > 1 and hasattr(self.executor, "submit") else 1
        self._in_flight: deque[tuple[SchedulerOutput, list[Request]]] = deque()
        eos = cfg.model_config.eos_token_id
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) + ((tok_eos,) if tok_eos is not None and
                                           tok_eos not in eos else ())
        log.info("engine ready: %s on %s, %d KV blocks of %d tokens", cfg.model, cfg.device,
                 num_blocks, cfg.cache.block_size)

    # ---- requests in --------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (random-weight preset): "
                             "give prompts as token ids")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) on bad input."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self._check_prompt(ids, params)
        if (self.cfg.scheduler.max_waiting is not None
                and len(self.scheduler.waiting) >= self.cfg.scheduler.max_waiting):
            raise QueueFullError(f"waiting queue is full ({self.cfg.scheduler.max_waiting})")
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        samples = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            samples.append(Request(rid, ids, params, max_tokens, self.eos_token_ids, arrival,
                                   priority, text, request_id, i,
                                   first_sibling=samples[0] if samples else None))
        self.groups[request_id] = RequestGroup(request_id, text, ids, params, samples,
                                               self.tokenizer)
        for r in samples:
            self.requests[r.request_id] = r
            self.scheduler.add(r)

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> int:
        """Reject prompts that cannot run; return max_tokens bounded by the context."""
        max_len = self.cfg.scheduler.max_model_len
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= max_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the context holds "
                             f"max_model_len={max_len} tokens, including at least one generated")
        vocab = self.cfg.model_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        room = max_len - len(ids)
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def abort_request(self, request_id: str) -> None:
        """Stop a request at once and free its KV blocks; unknown ids are ignored."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for r in group.samples:
            if not r.is_finished:
                self._finish(r, RequestStatus.FINISHED_ABORTED)
            self.requests.pop(r.request_id, None)
        self._check_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        self._on_scheduled(out)
        result = self.executor.execute(out)
        return self._update(out, result)

    def _on_scheduled(self, out: SchedulerOutput) -> None:
        now = time.monotonic()
        self.stats.on_schedule(out, self.scheduler.num_preemptions)
        for s in out.scheduled:
            r = self.requests[s.request_id]
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now

    def _step_pipelined(self) -> list[RequestOutput]:
        """Fill the pipeline with up to pp micro-batches, then land the oldest one."""
        sched = self.scheduler
        while len(self._in_flight) < self.pipeline_depth:
            ready = (sum(1 for r in sched.running if id(r) not in sched.in_flight)
                     + len(sched.waiting))
            out = sched.schedule(micro_batch_seq_cap(
                ready, self.pipeline_depth - len(self._in_flight)))
            if out.is_empty:
                break
            self._on_scheduled(out)
            reqs = [self.requests[s.request_id] for s in out.scheduled]
            sched.in_flight.update(id(r) for r in reqs)
            self.executor.submit(out)
            self._in_flight.append((out, reqs))
        if not self._in_flight:
            return []
        out, reqs = self._in_flight.popleft()
        result = self.executor.collect()
        sched.in_flight.difference_update(id(r) for r in reqs)
        out, result = self._drop_gone(out, reqs, result)
        return self._update(out, result)

    def _drop_gone(self, out: SchedulerOutput, reqs: list[Request], result: Any
                   ) -> tuple[SchedulerOutput, Any]:
        """Requests aborted while their micro-batch was in flight: discard their rows."""
        live = [self.requests.get(s.request_id) is r and not r.is_finished
                for s, r in zip(out.scheduled, reqs)]
        if all(live):
            return out, result
        sampled_live = [ok for s, ok in zip(out.scheduled, live) if s.sample]
        rows = [i for i, ok in enumerate(sampled_live) if ok]  # sample_logits rows to keep
        kept = [s for s, ok in zip(out.scheduled, live) if ok]
        kept_ids = {s.request_id for s in kept}
        prompt = {rid: x for rid, x in result.prompt_logits.items() if rid in kept_ids}
        return (SchedulerOutput(kept, out.preempted_ids),
                type(result)(result.sample_logits[rows], prompt))

    def _update(self, out: SchedulerOutput, result: Any) -> list[RequestOutput]:
        """After a step ran: advance, sample, append tokens, finish, emit outputs."""
        if out.is_empty:
            return []
        self.scheduler.advance(out, self.requests)
        sampled = [self.requests[s.request_id] for s in out.scheduled if s.sample]
        samp = self.sampler(result.sample_logits, sampled) if sampled else None
        touched: dict[str, RequestGroup] = {}
        for rid, logits in result.prompt_logits.items():
            r = self.requests[rid]
            s = next(x for x in out.scheduled if x.request_id == rid)
            self.groups[r.parent_id].add_prompt_logprobs(r, s.start, logits)
        now = time.monotonic()
        for i, r in enumerate(sampled):
            group = self.groups[r.parent_id]
            status = group.append_token(r, samp.token_ids[i], samp.logprobs[i], now)
            if status is not None:
                self._finish(r, status)
            touched[group.request_id] = group
        outputs = [g.output() for g in touched.values()]
        for g in touched.values():
            if g.finished:
                self.groups.pop(g.request_id, None)
                for r in g.samples:
                    self.requests.pop(r.request_id, None)
                self.stats.on_finished(g)
        self._check_idle()
        return outputs

    def _finish(self, r: Request, status: RequestStatus) -> None:
        r.finished_time = time.monotonic()
        self.scheduler.finish(r, status)

    def _check_idle(self) -> None:
        if self.cfg.debug_checks:
            self.pool.check_invariants(expect_idle=not self.scheduler.has_unfinished())


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 503 with Retry-After."""
