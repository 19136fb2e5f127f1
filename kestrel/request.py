"""One prompt's lifetime: tokens, state, KV blocks and timestamps."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kestrel.sampling_params import SamplingParams
from kestrel.structured import Matcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass
class Request:
    """State machine: WAITING → RUNNING ⇄ PREEMPTED → FINISHED_*.

    ``num_computed_tokens`` catches up with ``num_tokens`` (prompt + output): prefill and decode
    are the same motion, so the scheduler needs no phase flag.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what the context leaves
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    prompt: str | None = None
    parent_id: str | None = None  # n > 1: the group this sample belongs to
    sample_index: int = 0
    first_sibling: Request | None = field(default=None, repr=False, compare=False)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0  # tokens sampled by a step still on the device (overlapped steps)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # sampling state kept across steps
    generator: torch.Generator | None = None
    grammar: Matcher | None = None  # structured output: where its tokens are in the grammar
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    # metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """Seeded requests draw from their own generator (made on the device that samples),
        so their tokens do not depend on which other requests share the batch."""
        if self.params.seed is None:
            return None
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(
                self.params.seed + self.sample_index)
        return self.generator

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode step asks
        every running request for one token)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
