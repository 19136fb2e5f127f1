"""Continuous batching by token budget, with chunked prefill, prefix caching and preemption.

Each step every running request asks for the tokens it has not computed yet (one for a decode,
up to the budget for a prompt, or to ``long_prefill_token_threshold``); waiting requests join
while budget, sequence slots and KV blocks last. When blocks run out the newest running request
is preempted: its blocks are freed and it goes back to the front of the queue to be recomputed
later. No request is lost or duplicated.

Pipeline parallelism: the engine keeps several micro-batches in flight. A request in one of them
(``in_flight``) is skipped until its micro-batch returns, and is never chosen for preemption,
so no block it is still computing is freed. ``schedule(max_seqs)`` bounds a micro-batch's size.

Overlapped steps: a scheduled request counts as computed at once, and a token it samples is
``num_pending`` until the engine lands the step. The next step may already extend the request
by that token: its id is a placeholder (-1) that the runner fills in from the device.

Speculative decoding: a request about to decode its one known token also carries the
proposer's guesses of the tokens after it (``num_draft``), within the step budget, never at the
cost of preempting anyone; the engine verifies them and sets how far the request computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kestrel.config import SchedulerConfig
from kestrel.core.block_pool import KVCacheManager
from kestrel.request import Request, RequestStatus
from kestrel.spec.proposer import Proposer


@dataclass
class ScheduledRequest:
    """One request's share of a step, as plain data the runner (or a remote worker) can use."""

    request_id: str
    token_ids: list[int]  # tokens at positions start .. start + len - 1
    start: int  # tokens already in the cache before this step
    block_ids: list[int]  # the request's whole block table
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    prompt_logprobs: bool = False  # return logits of every scheduled position
    # the last num_draft tokens are proposals to verify (logits of every position come back;
    # the engine, not the sampler, picks the tokens)
    num_draft: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """The one contract between scheduler and model runner."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager,
                 proposer: Proposer | None = None) -> None:
        self.cfg = cfg
        self.kv = kv
        self.proposer = proposer
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.in_flight: set[int] = set()  # id() of requests inside an unreturned micro-batch
        # the most tokens one request computes in a step
        self.max_chunk = cfg.long_prefill_token_threshold or cfg.max_num_batched_tokens

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        if self.cfg.policy == "priority":
            self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Leave the scheduler (stopped, length, aborted): free blocks at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        self.kv.forget(req)
        if self.proposer is not None:
            self.proposer.release(req.request_id)

    def schedule(self, max_seqs: int | None = None) -> SchedulerOutput:
        """One step's work; ``max_seqs`` caps how many requests it takes (a micro-batch)."""
        self.kv.flush()  # the blocks of steps already launched enter the prefix cache
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        cap = max_seqs if max_seqs is not None else self.cfg.max_num_seqs
        budget = self._schedule_running(out, budget, cap)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget, cap)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, cap: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            req = self.running[i]
            if id(req) in self.in_flight:
                i += 1
                continue
            num_new = min(req.num_tokens + req.num_pending - req.num_computed_tokens,
                          budget, self.max_chunk)
            if num_new <= 0 or len(req.output_token_ids) + req.num_pending >= req.max_tokens:
                i += 1  # nothing to compute until its pending token lands (or it is done)
                continue
            drafts = self._propose(req, min(budget, self.max_chunk) - 1) if num_new == 1 else []
            if drafts and not self.kv.allocate_slots(req, 1 + len(drafts)):
                drafts = []  # no block for a guess is worth a preemption
            while not drafts and not self.kv.allocate_slots(req, num_new):
                victim = self._pick_victim(
                    [r for r in self.running[i:] if id(r) not in self.in_flight])
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # it preempted itself: nothing later in the list fits either
            out.scheduled.append(self._scheduled(req, num_new, drafts))
            budget -= num_new + len(drafts)
            i += 1
        return budget

    def _propose(self, req: Request, room: int) -> list[int]:
        """Guesses of the tokens after a request's last known one: at most ``room`` and what
        max_tokens leaves (the verified step appends up to one more than it accepts; max_tokens
        is within the context, Engine._check_prompt). None for requests whose sampling reads
        the host's token history (penalties, min_tokens, logprobs)."""
        if self.proposer is None or req.num_pending or req.params.needs_token_history:
            return []
        off = self.proposer.cfg.disable_batch_size
        if off is not None and len(self.running) >= off:
            return []
        k = min(self.proposer.cfg.num_speculative_tokens, room,
                req.max_tokens - len(req.output_token_ids) - 1)
        return self.proposer.propose(req, k) if k > 0 else []

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, cap: int) -> None:
        skipped: list[Request] = []
        while (self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs
               and len(out.scheduled) < cap):
            req = self.waiting[0]
            if req.num_pending or self._defer_sibling(req, out):
                skipped.append(self.waiting.pop(0))
                continue
            computed = self.kv.get_computed_blocks(req)
            num_cached = len(computed) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if not self.cfg.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget, self.max_chunk)
            if not self.kv.allocate_slots(req, num_new, computed):
                break
            self.waiting.pop(0)
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
        self.waiting[:0] = skipped

    def _defer_sibling(self, req: Request, out: SchedulerOutput) -> bool:
        """n > 1: later samples wait until the first has computed the shared prompt blocks
        (in an earlier step, not the one being built)."""
        first = req.first_sibling
        if first is None or first.is_finished or not self.kv.pool.enable_prefix_caching:
            return False
        shared = (req.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size
        return (first.num_computed_tokens < shared
                or any(s.request_id == first.request_id for s in out.scheduled))

    def _pick_victim(self, candidates: list[Request]) -> Request:
        """Newest (FCFS) or least urgent (priority) among those not yet scheduled this step."""
        if self.cfg.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, req)

    @staticmethod
    def _scheduled(req: Request, num_new: int, drafts: list[int] | None = None
                   ) -> ScheduledRequest:
        """Describe the request's share and count it computed (and its sample pending)."""
        start = req.num_computed_tokens
        if drafts:  # its one known token, then the guesses; the engine rolls back what fails
            req.num_computed_tokens = start + 1 + len(drafts)
            return ScheduledRequest(req.request_id, req.token_ids_slice(start, start + 1) + drafts,
                                    start, list(req.block_ids), sample=False,
                                    num_draft=len(drafts))
        end = start + num_new
        p = req.num_prompt_tokens
        known = req.num_tokens
        if end <= p:
            tokens = req.prompt_token_ids[start:end]
        else:
            tokens = req.token_ids_slice(start, min(end, known)) + [-1] * (end - max(start, known))
        sample = end == known + req.num_pending
        req.num_computed_tokens = end
        req.num_pending += sample
        return ScheduledRequest(
            request_id=req.request_id, token_ids=tokens, start=start,
            block_ids=list(req.block_ids), sample=sample,
            prompt_logprobs=req.params.prompt_logprobs is not None and start < p,
        )
