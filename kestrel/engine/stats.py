"""Counters the engine keeps for /metrics and benchmarks (prometheus export lives in server/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kestrel.core.scheduler import SchedulerOutput


@dataclass
class EngineStats:
    num_steps: int = 0
    # Tokens computed by step shape, which is what `bench latency` splits prefill from decode by:
    # prompt_tokens counts every token of a chunk (cache hits excluded, recompute included);
    # generation_tokens counts one-token decode steps, so a request's first sampled token
    # (produced by its last prefill chunk) is not in it. Servers count output from outputs.
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    finished_requests: int = 0
    finished_reasons: dict[str, int] = field(default_factory=dict)

    # The same counts for steps whose results the host has received: with overlapped steps a
    # step lands one engine.step() call after it was scheduled, and that is the call that waits.
    landed_prompt_tokens: int = 0
    landed_generation_tokens: int = 0
    # speculative decoding: proposals verified, and those the target kept
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def on_schedule(self, out: SchedulerOutput, total_preemptions: int) -> None:
        self.num_steps += 1
        self.num_preemptions = total_preemptions
        prompt, gen = _split(out)
        self.prompt_tokens += prompt
        self.generation_tokens += gen

    def on_landed(self, out: SchedulerOutput) -> None:
        prompt, gen = _split(out)
        self.landed_prompt_tokens += prompt
        self.landed_generation_tokens += gen

    def on_verified(self, num_draft: int, num_accepted: int) -> None:
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted

    def on_finished(self, group) -> None:
        self.finished_requests += 1
        for r in group.samples:
            self.finished_reasons[r.status.value] = self.finished_reasons.get(r.status.value, 0) + 1


def _split(out: SchedulerOutput) -> tuple[int, int]:
    """(prompt tokens, decode tokens) of a step: a decode is a one-token step, or a known token
    with its proposals (speculative decoding)."""
    gen = sum(s.num_new_tokens if s.num_draft else 1 for s in out.scheduled
              if s.num_draft or (s.sample and s.num_new_tokens == 1 and s.start > 0))
    return out.num_batched_tokens - gen, gen
