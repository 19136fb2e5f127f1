"""The step loop: schedule → execute → sample → update, emitting RequestOutputs."""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kestrel.config import EngineConfig
from kestrel.core.block_pool import BlockPool, KVCacheManager
from kestrel.core.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from kestrel.engine.detokenizer import byte_table
from kestrel.engine.group import RequestGroup
from kestrel.engine.stats import EngineStats
from kestrel.executor.model_runner import PrevTokens, select_backend
from kestrel.layers.sampler import Sampler, SamplerOutput
from kestrel.outputs import RequestOutput
from kestrel.parallel.pipeline import micro_batch_seq_cap
from kestrel.request import Request, RequestStatus
from kestrel.sampling_params import SamplingParams
from kestrel.spec.proposer import make_proposer
from kestrel.structured import GrammarCompiler

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
        self.scheduler = Scheduler(cfg.scheduler, self.kv, make_proposer(cfg.speculative))
        self.sampler = Sampler(cfg.seed, fast_argmax=select_backend(cfg) == "triton")
        self.requests: dict[str, Request] = {}  # live samples, by their own id
        self.groups: dict[str, RequestGroup] = {}  # live user requests, by the user's id
        self.stats = EngineStats()
        # Pipeline parallelism: micro-batches in flight (executor.submit / collect), by default
        # one more than there are stages: the driver is also the first stage, and with only pp
        # in flight that stage idles while the driver lands the oldest one, samples and
        # schedules (2×H200, llama3-paper at 256 requests: pp+1 1.08x pp).
        par = cfg.parallel
        pp = par.pipeline_parallel_size
        self.pipeline_depth = ((par.pipeline_micro_batches or pp + 1)
                               if pp > 1 and hasattr(self.executor, "submit") else 1)
        self._in_flight: deque[tuple[SchedulerOutput, list[Request]]] = deque()
        # Overlapped steps (one process): launch step N+1 before landing step N.
        self.overlap = (cfg.overlap_steps and self.pipeline_depth == 1
                        and getattr(self.executor, "supports_overlap", False))
        self._pending: _Launched | None = None
        self._num_history_groups = 0  # live groups whose sampling needs the host-known tokens
        self._grammar_compiler: GrammarCompiler | None = None
        if tokenizer is not None:  # the detokenizers' byte table, built before any request
            byte_table(tokenizer, skip_special_tokens=True)
        eos = cfg.model_config.eos_token_id
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) + ((tok_eos,) if tok_eos is not None and
                                           tok_eos not in eos else ())
        log.info("engine ready: %s on %s, %d KV blocks of %d tokens (%s), overlapped steps %s",
                 cfg.model, cfg.device, num_blocks, cfg.cache.block_size,
                 cfg.cache.kv_cache_dtype, "on" if self.overlap else "off")

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
        if params.structured is not None:
            for r in samples:
                r.grammar = self._grammars().matcher(params.structured)
        self.groups[request_id] = RequestGroup(request_id, text, ids, params, samples,
                                               self.tokenizer)
        self._num_history_groups += params.needs_token_history
        for r in samples:
            self.requests[r.request_id] = r
            self.scheduler.add(r)

    def _grammars(self) -> GrammarCompiler:
        """The structured-output compiler, made on the first request that asks for one."""
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer; this model "
                                 "has none")
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.cfg.model_config.vocab_size, self.eos_token_ids)
        return self._grammar_compiler

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
        group = self._pop_group(request_id)
        if group is None:
            return
        for r in group.samples:
            if not r.is_finished:
                self._finish(r, RequestStatus.FINISHED_ABORTED)
            self.requests.pop(r.request_id, None)
        self._check_idle()

    def _pop_group(self, request_id: str) -> RequestGroup | None:
        group = self.groups.pop(request_id, None)
        if group is not None:
            self._num_history_groups -= group.params.needs_token_history
        return group

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        if self.overlap and not self._num_history_groups:
            return self._step_overlapped()
        landed = self._land() if self._pending is not None else []
        out = self.scheduler.schedule()
        if out.is_empty:
            return landed
        self._on_scheduled(out)
        result = self.executor.execute(out)
        return landed + self._update(out, result)

    def _on_scheduled(self, out: SchedulerOutput) -> None:
        now = time.monotonic()
        self.stats.on_schedule(out, self.scheduler.num_preemptions)
        for s in out.scheduled:
            r = self.requests[s.request_id]
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now

    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule and launch step N+1, then land step N: the host prepares the next step while
        the device runs the previous one, and waits only to read its sampled tokens. Requests
        whose sampling reads earlier tokens on the host (penalties, logprobs) turn it off."""
        out = self.scheduler.schedule()
        launched = self._launch(out) if not out.is_empty else None
        landed = self._land() if self._pending is not None else []
        self._pending = launched
        return landed

    def _launch(self, out: SchedulerOutput) -> _Launched:
        self._on_scheduled(out)
        prev = self._pending
        result = self.executor.execute(out, prev.prev_tokens() if prev is not None else None,
                                       share_sampled=True)
        reqs = [self.requests[s.request_id] for s in out.scheduled]
        sampled = [r for s, r in zip(out.scheduled, reqs) if s.sample]
        tokens = (self.sampler.sample(result.sample_logits, sampled) if sampled
                  else torch.zeros(0, dtype=torch.long, device=result.sample_logits.device))
        self.executor.share_sampled(out, tokens)  # other TP ranks fill placeholders from it
        return _Launched(out, reqs, sampled, result, tokens)

    def _land(self) -> list[RequestOutput]:
        """Wait for the pending step's tokens and apply them (requests finished or aborted since
        it was launched are skipped: its work for them is discarded)."""
        item, self._pending = self._pending, None
        token_ids = item.host_tokens()
        live = [self.requests.get(s.request_id) is r and not r.is_finished
                for s, r in zip(item.out.scheduled, item.reqs)]
        kept = SchedulerOutput([s for s, ok in zip(item.out.scheduled, live) if ok],
                               item.out.preempted_ids)
        live_ids = {id(r) for r, ok in zip(item.reqs, live) if ok}
        tokens = [t for r, t in zip(item.sampled, token_ids) if id(r) in live_ids]
        samp = SamplerOutput(tokens, [None] * len(tokens))
        return self._update(kept, item.result, samp)

    def _step_pipelined(self) -> list[RequestOutput]:
        """Fill the pipeline with up to ``pipeline_depth`` micro-batches, then land the oldest
        one."""
        sched = self.scheduler
        while (n := len(self._in_flight)) < self.pipeline_depth:
            ready = (sum(1 for r in sched.running if id(r) not in sched.in_flight)
                     + len(sched.waiting))
            out = sched.schedule(micro_batch_seq_cap(ready, self.pipeline_depth - n))
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
        with self.executor.landing():  # sampling must not queue behind later micro-batches
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

    def _update(self, out: SchedulerOutput, result: Any, samp: SamplerOutput | None = None
                ) -> list[RequestOutput]:
        """After a step ran: sample (unless done already), append tokens, finish, emit outputs."""
        self.stats.on_landed(out)
        if out.is_empty:
            return []
        sampled = [self.requests[s.request_id] for s in out.scheduled if s.sample]
        if samp is None and sampled:
            samp = self.sampler(result.sample_logits, sampled)
        touched: dict[str, RequestGroup] = {}
        verified = {s.request_id: s for s in out.scheduled if s.num_draft}
        for rid, logits in result.prompt_logits.items():
            if rid in verified:
                continue
            r = self.requests[rid]
            s = next(x for x in out.scheduled if x.request_id == rid)
            self.groups[r.parent_id].add_prompt_logprobs(r, s.start, logits)
        now = time.monotonic()
        if verified:
            reqs = [self.requests[rid] for rid in verified]
            accepted = self.sampler.verify([(result.prompt_logits[rid], s.token_ids[1:], r)
                                            for (rid, s), r in zip(verified.items(), reqs)])
            for r, s, tokens in zip(reqs, verified.values(), accepted):
                touched[r.parent_id] = self._append_verified(r, s, tokens, now)
        for i, r in enumerate(sampled):
            r.num_pending -= 1
            group = self.groups[r.parent_id]
            status = group.append_token(r, samp.token_ids[i], samp.logprobs[i], now)
            if status is not None:
                self._finish(r, status)
            touched[group.request_id] = group
        outputs = [g.output() for g in touched.values()
                   if g.finished or g.params.output_kind != "final_only"]
        for g in touched.values():
            if g.finished:
                self._pop_group(g.request_id)
                for r in g.samples:
                    self.requests.pop(r.request_id, None)
                self.stats.on_finished(g)
        self._check_idle()
        return outputs

    def _append_verified(self, r: Request, s: ScheduledRequest, tokens: list[int], now: float
                         ) -> RequestGroup:
        """Speculative decoding: append the guesses the target kept and its own next token
        (``tokens``), stopping where the request finishes. The cache holds valid K/V for the
        known token and the kept guesses only: the request counts as computed that far, and no
        block past it enters the prefix cache (a rejected guess's K/V is overwritten by the
        next step)."""
        self.stats.on_verified(s.num_draft, len(tokens) - 1)
        r.num_computed_tokens = s.start + len(tokens)
        self.kv.computed_up_to(r, r.num_computed_tokens)
        group = self.groups[r.parent_id]
        for t in tokens:
            status = group.append_token(r, t, None, now)
            if status is not None:
                self._finish(r, status)
                break
        return group

    def _finish(self, r: Request, status: RequestStatus) -> None:
        r.finished_time = time.monotonic()
        self.scheduler.finish(r, status)

    def _check_idle(self) -> None:
        if self.cfg.debug_checks:
            self.pool.check_invariants(expect_idle=not self.scheduler.has_unfinished())


class _Launched:
    """A step on the device: its sampled tokens are copied back without blocking the host."""

    def __init__(self, out: SchedulerOutput, reqs: list[Request], sampled: list[Request],
                 result: Any, tokens: torch.Tensor) -> None:
        self.out, self.reqs, self.sampled, self.result, self.tokens = (out, reqs, sampled,
                                                                       result, tokens)
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = tokens, None

    def prev_tokens(self) -> PrevTokens:
        return PrevTokens({r.request_id: i for i, r in enumerate(self.sampled)}, self.tokens)

    def host_tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 503 with Retry-After."""


@contextmanager
def heap_frozen() -> Iterator[None]:
    """Run the body with every object alive now out of the cyclic garbage collector's reach.

    After start-up a process holds hundreds of thousands of long-lived objects (torch and
    transformers modules, the model, the tokenizer): 234k with tiny-llama, whose full
    collection takes ~0.1 s on a CPU. Serving makes full collections happen now and then, each
    a pause of every step in flight; frozen (``gc.freeze``), 256 requests × 200 tokens saw a
    longest GC pause of 5 ms instead of 136. Unfrozen on exit, so that an engine dropped
    afterwards (its reference cycles) can be collected.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
