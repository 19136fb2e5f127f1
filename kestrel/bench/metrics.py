"""Serving metrics as pure functions of timestamps, so tests can check them exactly.

Definitions (all per request, times in seconds, on one monotonic clock):

- TTFT (time to first token) = arrival of the first chunk carrying output − send time.
- E2E (end-to-end latency) = arrival of the last byte of the response − send time.
- TPOT (time per output token) = (E2E − TTFT) / (output tokens − 1); undefined for one token.
- ITL (inter-token latency) = gaps between consecutive output chunks (a chunk may carry several
  tokens; then ITL is per chunk, as vLLM's benchmark reports it).
- Goodput = successful requests meeting every given SLO / benchmark duration.

Failed requests never enter a latency statistic: they are counted, and their errors kept.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """One request as the client saw it."""

    prompt_len: int
    output_len: int  # generated tokens: the server's usage count, else the chunks counted
    start: float  # when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each output chunk
    end: float = math.nan  # when the response was complete (or failed)
    success: bool = True
    error: str = ""


def ttft(r: RequestRecord) -> float:
    if not r.chunk_times:
        raise ValueError("a request with no output chunk has no TTFT")
    return r.chunk_times[0] - r.start


def e2e(r: RequestRecord) -> float:
    return r.end - r.start


def tpot(r: RequestRecord) -> float | None:
    """Decode time spread over the tokens after the first; None for single-token outputs."""
    if r.output_len < 2:
        return None
    return (e2e(r) - ttft(r)) / (r.output_len - 1)


def itls(r: RequestRecord) -> list[float]:
    return [b - a for a, b in itertools.pairwise(r.chunk_times)]


def stats(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """Mean, median, p90, p99 (linear interpolation between order statistics), std."""
    if len(values) == 0:
        return {"mean": None, "median": None, "p90": None, "p99": None, "std": None}
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90),
            "p99": float(p99), "std": float(a.std())}


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO given (seconds; keys ttft, tpot, e2e)."""
    if not r.success:
        return False
    for key, limit in slo.items():
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO {key!r}; known: {SLO_KEYS}")
        value = {"ttft": ttft, "tpot": tpot, "e2e": e2e}[key](r)
        if value is not None and value > limit:
            return False
    return True


def goodput(records: Iterable[RequestRecord], duration: float, slo: dict[str, float]) -> float:
    """Requests per second that succeeded and met every SLO."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    return sum(meets_slo(r, slo) for r in records) / duration


def cost(duration: float, gpu_hour_price: float, num_gpus: int, completed: int,
         output_tokens: int) -> dict[str, float | None]:
    """Dollars per request and per million output tokens, the GPUs billed for the whole run."""
    dollars = gpu_hour_price * num_gpus * duration / 3600.0
    return {"total_usd": dollars,
            "usd_per_request": dollars / completed if completed else None,
            "usd_per_million_output_tokens": dollars / output_tokens * 1e6 if output_tokens
            else None}


def error_summary(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Distinct error messages of failed requests, most common first."""
    return dict(Counter(r.error or "unknown error" for r in records if not r.success)
                .most_common())


def aggregate(records: Sequence[RequestRecord], duration: float,
              slo: dict[str, float] | None = None, gpu_hour_price: float | None = None,
              num_gpus: int = 1) -> dict:
    """The benchmark's summary: counts, throughputs, latency statistics (ms), goodput, cost."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [v for v in (tpot(r) for r in ok) if v is not None]
    result: dict = {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "errors": error_summary(records), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "requests_per_min": 60.0 * len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": stats([ttft(r) for r in ok], 1e3), "tpot_ms": stats(tpots, 1e3),
        "itl_ms": stats([g for r in ok for g in itls(r)], 1e3),
        "e2e_ms": stats([e2e(r) for r in ok], 1e3),
    }
    if slo:
        result["slo_s"] = dict(slo)
        result["goodput"] = goodput(records, duration, slo)
    if gpu_hour_price is not None:
        result["cost"] = {"gpu_hour_price": gpu_hour_price, "num_gpus": num_gpus,
                          **cost(duration, gpu_hour_price, num_gpus, len(ok), out_tokens)}
    return result


def parse_slo(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` (milliseconds, as vLLM's --goodput) → seconds by key."""
    slo: dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: write KEY:MILLISECONDS with KEY in {SLO_KEYS}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number") from None
        if ms <= 0:
            raise ValueError(f"bad SLO {item!r}: the limit must be > 0 ms")
        slo[key] = ms / 1e3
    return slo
