"""What the user asked for, validated on construction with a message naming the broken limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from kestrel.structured import StructuredOutput

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """Sampling controls, named as in vLLM so its users feel at home."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (sampled token always added)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # "cumulative": an output after every step that adds a token, holding everything so far;
    # "delta": the same outputs holding only what is new since the previous one (the server's
    # streams: a cumulative output copies every token list, O(length) per token); "final_only":
    # one when the request finishes (LLM.generate), sparing the host a RequestOutput per
    # running request per step: 16 ms a step at 256 requests of ~300 tokens (CPU-measured)
    output_kind: str = "cumulative"
    structured: StructuredOutput | None = None  # tokens constrained to a schema / regex / grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 < self.repetition_penalty <= 10,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop strings must be non-empty strings"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got {self.seed}"),
            (self.structured is None or isinstance(self.structured, StructuredOutput),
             "structured must be a kestrel.structured.StructuredOutput"),
            (self.structured is None or self.min_tokens == 0,
             "min_tokens cannot be combined with structured output (its grammar ends the text)"),
            (self.output_kind in ("cumulative", "delta", "final_only"),
             (f"output_kind must be 'cumulative', 'delta' or 'final_only', "
              f"got {self.output_kind!r}")),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.temperature != self.temperature or self.top_p != self.top_p:
            raise ValueError("temperature and top_p must be numbers, not NaN")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_token_history(self) -> bool:
        """Sampling reads earlier tokens on the host (penalties, min_tokens, a grammar's state)
        or returns logprobs: such requests cannot sample a step before the previous step's
        token is known."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or self.min_tokens > 0
                or self.logprobs is not None or self.prompt_logprobs is not None
                or self.structured is not None)

    def clone(self, **changes) -> SamplingParams:
        from dataclasses import replace

        return replace(self, **changes)
