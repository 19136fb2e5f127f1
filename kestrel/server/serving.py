"""What the completion and chat endpoints share: state, parameters, streams, SSE, logprobs.

A user request with several prompts (or n samples) becomes one engine request per prompt; the
engine keeps the n samples of a prompt together. Whatever way the HTTP exchange ends (done,
error, client gone, cancelled), every engine request still live is aborted, so its KV blocks go
back to the pool at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from kestrel.engine.async_engine import AsyncEngine, RequestStream
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams
from kestrel.server.errors import APIError, bad_request, engine_error
from kestrel.server.metrics import ServerMetrics
from kestrel.server.protocol import MAX_CHOICES, SamplingFields, error_body
from kestrel.structured import StructuredOutput

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServerState:
    engine: AsyncEngine
    model_names: list[str]  # the first is the name answers carry
    metrics: ServerMetrics
    max_body_bytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str | None) -> str:
        """The served name for ``name`` (None: the only model), or a 404."""
        if name is None or name in self.model_names:
            return self.model_name
        raise APIError(404, f"model '{name}' does not exist; this server serves "
                       f"'{self.model_name}' (GET /v1/models)", "not_found_error", "model")

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs (cached: the same few thousand ids recur)."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.engine.tokenizer
            text = f"token_id:{token_id}" if tok is None else tok.decode([token_id])
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = text
        return text


async def read_body(request: Request, model: Any) -> Any:
    from kestrel.server.errors import _BodyTooLarge, parse_body

    try:
        raw = await request.body()
    except _BodyTooLarge:
        limit = request.app.state.kestrel.max_body_bytes
        raise APIError(413, f"request body exceeds the limit of {limit} bytes") from None
    return parse_body(raw, model)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None,
                    structured: StructuredOutput | None = None) -> SamplingParams:
    """Request fields → SamplingParams; its checks give the 400 messages. ``structured``: the
    constraint of a tool call (server/tools.py) in place of the request's own."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens, "logprobs": logprobs,
                          "prompt_logprobs": prompt_logprobs, "seed": req.seed,
                          "stop": [] if req.stop is None else req.stop, "ignore_eos": req.ignore_eos,
                          "min_tokens": req.min_tokens,
                          "skip_special_tokens": req.skip_special_tokens,
                          "include_stop_str_in_output": req.include_stop_str_in_output,
                          # a stream sends what is new; a non-streamed answer reads the end
                          "output_kind": "delta" if req.stream else "final_only"}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    try:
        own = structured_output(req)
        if structured is not None and own is not None:
            raise ValueError("tool_choice cannot be combined with response_format or guided_*")
        kw["structured"] = structured or own
        return SamplingParams(**kw)
    except ValueError as e:
        raise bad_request(str(e)) from None


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """response_format or one guided_* field → the request's constraint (None: free text)."""
    fmt = req.response_format
    given = {"json": req.guided_json, "regex": req.guided_regex, "choice": req.guided_choice,
             "grammar": req.guided_grammar}
    if fmt is not None and fmt.type == "json_object":
        given["json_object"] = True
    elif fmt is not None and fmt.type == "json_schema":
        if given["json"] is not None:
            raise ValueError("give a JSON schema in response_format or in guided_json, not both")
        given["json"] = fmt.json_schema.schema_
    given = {k: v for k, v in given.items() if v is not None}
    return StructuredOutput(**given) if given else None


async def start_requests(state: ServerState, base_id: str, prompts: Sequence[str | list[int]],
                         params: SamplingParams) -> list[tuple[str, RequestStream]]:
    """Add one engine request per prompt; if one is refused, none is left behind."""
    if len(prompts) * params.n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={params.n} gives "
                          f"{len(prompts) * params.n} choices; the limit is {MAX_CHOICES}")
    started: list[tuple[str, RequestStream]] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            started.append((rid, await state.engine.add_request(rid, prompt, params)))
    except BaseException as e:
        abort_all(state, started)
        if isinstance(e, Exception):
            err = engine_error(e)
            if len(prompts) > 1 and err.status == 400:
                err.message = f"prompt {len(started)}: {err.message}"
            raise err from None
        raise
    return started


def abort_all(state: ServerState, started: Sequence[tuple[str, RequestStream]]) -> None:
    for rid, stream in started:
        if not stream.closed:
            state.engine.abort(rid)


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, newest output) from several streams as they progress, until all finish.

    One stream (one prompt: almost every request) is awaited directly. A task and an
    ``asyncio.wait`` per output cost ~30 µs on the event loop, which at 256 streams is several
    ms per engine step, taken from the interpreter the engine thread shares."""
    if len(streams) == 1:
        while True:
            out = await streams[0].next()
            yield 0, out
            if out.finished:
                return
    pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                out = fut.result()
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].next())] = i
                yield i, out
    finally:
        for fut in pending:
            fut.cancel()


async def collect(request: Request, state: ServerState,
                  started: Sequence[tuple[str, RequestStream]]) -> list[RequestOutput]:
    """Final outputs, one per prompt; a client that hangs up meanwhile aborts them all."""

    async def gather() -> list[RequestOutput]:
        final: dict[int, RequestOutput] = {}
        async for i, out in merge([s for _, s in started]):
            if out.finished:
                final[i] = out
        return [final[i] for i in range(len(started))]

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise APIError(499, "client closed the request", "client_closed_request")
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped to the answer the client gets
        raise engine_error(e) from None
    finally:
        work.cancel()
        watch.cancel()
        abort_all(state, started)


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error inside a started stream: an OpenAI error object as one last event."""
    err = engine_error(exc)
    return sse(error_body(err.message, err.err_type, err.status, err.param))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def count_usage(finals: Sequence[RequestOutput | None]) -> dict[str, int]:
    outs = [o for o in finals if o is not None]
    return usage(sum(len(o.prompt_token_ids) for o in outs),
                 sum(len(c.token_ids) for o in outs for c in o.outputs))


def finite(x: float) -> float:
    """JSON has no NaN or infinity: OpenAI's -9999.0 stands for 'impossible'."""
    return x if math.isfinite(x) else -9999.0


def sorted_logprobs(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])
