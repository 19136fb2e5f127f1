"""What the engine returns: vLLM's RequestOutput / CompletionOutput shapes, plus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) and the latencies derived from them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None  # per generated token: id → logprob
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = None  # on the finished output only
    num_cached_tokens: int = 0


def merge_delta(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """Two consecutive "delta" outputs of one request as one: what a reader that fell behind
    gets. Text, token ids and logprobs are concatenated per sample; the rest is the newer's."""
    old = {c.index: c for c in older.outputs}
    outs = []
    for c in newer.outputs:
        o = old.get(c.index)
        if o is not None:
            lps = None if c.logprobs is None else (o.logprobs or []) + c.logprobs
            c = CompletionOutput(c.index, o.text + c.text, o.token_ids + c.token_ids, lps,
                                 c.finish_reason, c.stop_reason)
        outs.append(c)
    return RequestOutput(newer.request_id, newer.prompt, newer.prompt_token_ids, outs,
                         newer.finished, older.prompt_logprobs or newer.prompt_logprobs,
                         newer.metrics, newer.num_cached_tokens)
