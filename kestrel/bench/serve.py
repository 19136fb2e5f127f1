"""A streaming benchmark client for any OpenAI-compatible server (Kestrel's, or vLLM's).

Requests are sent at gamma-distributed intervals (mean 1 / rate; shape = burstiness, so
burstiness 1 is a Poisson process, lower is burstier), optionally capped at a number in
flight. Each response is streamed; the arrival of every chunk that carries text is timed on the
client, which is what a user sees. A request that fails (connection refused, an HTTP error, an
error event or a stream cut short) is recorded as failed with its reason and never counted as
a fast one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from tqdm import tqdm

from kestrel.bench.metrics import RequestRecord, aggregate


class ServeError(ValueError):
    """The benchmark cannot run (server unreachable, wrong model): a message, no traceback."""


@dataclass
class ServeRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass
class ServeOptions:
    base_url: str
    model: str | None  # None: the first model the server lists
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf  # requests per second; inf sends all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    seed: int = 0
    progress: bool = True
    api_key: str | None = None  # sent as "Authorization: Bearer KEY"
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ServeError(f"--base-url must start with http:// or https://, got "
                             f"{self.base_url!r}")
        if self.request_rate <= 0:
            raise ServeError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.burstiness <= 0:
            raise ServeError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ServeError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from start) of n requests: the first at 0, then gamma intervals."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist()


def _payload(opts: ServeOptions, req: ServeRequest) -> dict:
    body: dict[str, Any] = {"model": opts.model, "max_tokens": req.output_len,
                            "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if opts.is_chat:
        if not isinstance(req.prompt, str):
            raise ServeError("the chat endpoint needs text prompts: use --prompt-format text")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if opts.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: exactly max_tokens tokens
    body.update(opts.extra_body)
    return body


def _is_token_event(obj: dict, chat: bool) -> bool:
    """Whether a stream event carries generated output (timed as a token arrival).

    Text may be empty for a token that detokenizes to nothing yet (a special token, part of
    a UTF-8 character), so an event counts when it has text, or has none but is not the
    closing event (finish_reason set) nor a chat role announcement.
    """
    choices = obj.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    if chat:
        delta = c.get("delta") or {}
        text = delta.get("content")
        return bool(text) or (text is not None and "role" not in delta
                              and c.get("finish_reason") is None)
    return bool(c.get("text")) or ("text" in c and c.get("finish_reason") is None)


def _fail(rec: RequestRecord, reason: str) -> RequestRecord:
    rec.success, rec.error, rec.end = False, reason, time.perf_counter()
    return rec


async def send_request(client: httpx.AsyncClient, opts: ServeOptions,
                       req: ServeRequest) -> RequestRecord:
    """One streamed request, timed chunk by chunk."""
    rec = RequestRecord(prompt_len=req.prompt_len, output_len=0, start=time.perf_counter())
    usage: dict | None = None
    done = False
    try:
        async with client.stream("POST", opts.url, json=_payload(opts, req)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace").strip()
                return _fail(rec, f"HTTP {resp.status_code}: {body[:160]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec.end, done = time.perf_counter(), True  # before closing the stream
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    err = obj["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    return _fail(rec, f"error event in stream: {msg}")
                if _is_token_event(obj, opts.is_chat):
                    rec.chunk_times.append(time.perf_counter())
                usage = obj.get("usage") or usage
        rec.output_len = int(usage["completion_tokens"]) if usage else len(rec.chunk_times)
        if usage and usage.get("prompt_tokens"):
            rec.prompt_len = int(usage["prompt_tokens"])
    except httpx.HTTPError as e:
        return _fail(rec, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON or usage malformed
        return _fail(rec, f"malformed response: {type(e).__name__}: {e}")
    if not done:
        return _fail(rec, "stream ended before [DONE]")
    if not rec.chunk_times:
        return _fail(rec, "no output tokens in the response")
    return rec


async def check_server(client: httpx.AsyncClient, opts: ServeOptions) -> str:
    """Fail fast, with the reason, when the server is down or does not serve the model.

    Returns the model name to send: ``opts.model``, or the server's first one when not given.
    """
    url = opts.base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, timeout=10.0)
    except httpx.HTTPError as e:
        raise ServeError(f"cannot reach the server at {opts.base_url} ({type(e).__name__}: "
                         f"{e}); is it running?") from None
    served: list[str] = []
    if resp.status_code == 200:
        try:
            served = [m.get("id") for m in resp.json().get("data", [])]
        except (ValueError, AttributeError):
            served = []
    elif resp.status_code != 404:  # 404: no /v1/models here; the requests themselves will tell
        raise ServeError(f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    if not opts.model:
        if not served:
            raise ServeError(f"{opts.base_url} does not list its models: pass --model")
        return served[0]
    if served and opts.model not in served:
        raise ServeError(f"the server at {opts.base_url} serves {served}, not {opts.model!r}: "
                         f"pass --model with one of those")
    return opts.model


async def collect_records(opts: ServeOptions, requests: list[ServeRequest]
                          ) -> tuple[list[RequestRecord], float, str]:
    """Send every request on its schedule; (records, duration, model name used)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    host = urlparse(opts.base_url).hostname or ""
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    limits = httpx.Limits(max_connections=opts.max_concurrency or len(requests) or 1,
                          max_keepalive_connections=opts.max_concurrency or 100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout_s, connect=10.0),
                                 limits=limits, headers=headers,
                                 trust_env=host not in ("127.0.0.1", "localhost", "::1")) as c:
        opts = dataclasses.replace(opts, model=await check_server(c, opts))
        offsets = arrival_offsets(len(requests), opts.request_rate, opts.burstiness, opts.seed)
        sem = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
        bar = tqdm(total=len(requests), desc="serve bench", disable=not opts.progress)
        t0 = time.perf_counter()
        failed = 0

        async def one(i: int, req: ServeRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
            if sem is None:
                rec = await send_request(c, opts, req)
            else:
                async with sem:
                    rec = await send_request(c, opts, req)
            nonlocal failed
            failed += not rec.success
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)
            return rec

        try:
            records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            bar.close()
        return list(records), time.perf_counter() - t0, opts.model


def run_serve(opts: ServeOptions, requests: list[ServeRequest],
              slo: dict[str, float] | None = None, gpu_hour_price: float | None = None,
              num_gpus: int = 1) -> dict:
    """Run the benchmark; the summary of metrics.aggregate plus the settings it ran with."""
    if not requests:
        raise ServeError("no requests to send (--num-prompts must be >= 1)")
    records, duration, model = asyncio.run(collect_records(opts, requests))
    res = aggregate(records, duration, slo, gpu_hour_price, num_gpus)
    res.update({"base_url": opts.base_url, "model": model, "endpoint": opts.endpoint,
                "request_rate": opts.request_rate, "burstiness": opts.burstiness,
                "max_concurrency": opts.max_concurrency})
    return res


def build_serve_requests(lengths: list[tuple[int, int]], prompts: list[list[int]],
                         prompt_format: str = "ids", tokenizer: Any = None
                         ) -> list[ServeRequest]:
    """Token-id prompts (exact lengths), or their text (the server re-tokenizes it)."""
    if prompt_format not in ("ids", "text"):
        raise ServeError(f"unknown prompt format {prompt_format!r}; choose ids or text")
    if prompt_format == "text" and tokenizer is None:
        raise ServeError("text prompts need a tokenizer: pass --tokenizer")
    out = []
    for ids, (n_in, n_out) in zip(prompts, lengths):
        prompt: list[int] | str = ids if prompt_format == "ids" else tokenizer.decode(ids)
        out.append(ServeRequest(prompt, n_in, n_out))
    return out


def serve_rows(res: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("requests (completed / failed)", f"{res['completed']} / {res['failed']}"),
        ("duration (s)", res["duration_s"]),
        ("request throughput (req/s)", res["request_throughput"]),
        ("output token throughput (tok/s)", res["output_throughput"]),
        ("total token throughput (tok/s)", res["total_token_throughput"]),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_ms", "E2E latency")):
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{name} {stat} (ms)", res[key][stat]))
    if "goodput" in res:
        rows.append(("goodput (req/s within SLOs)", res["goodput"]))
    if "cost" in res:
        rows += [("cost per request ($)", res["cost"]["usd_per_request"]),
                 ("cost per 1M output tokens ($)", res["cost"]["usd_per_million_output_tokens"])]
    return rows
