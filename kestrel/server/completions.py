"""POST /v1/completions: prompts as text, token ids, or lists of either; streamed or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kestrel.engine.async_engine import RequestStream
from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel.server.errors import bad_request
from kestrel.server.protocol import CompletionRequest
from kestrel.server.serving import (
    SSE_DONE,
    ServerState,
    abort_all,
    collect,
    count_usage,
    finite,
    merge,
    new_id,
    read_body,
    sampling_params,
    sorted_logprobs,
    sse,
    sse_error,
    start_requests,
    usage,
)


def normalize_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """The four prompt forms → a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty: give a string, token ids, or a list of them",
                          "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


async def create_completion(request: Request) -> Any:
    state: ServerState = request.app.state.kestrel
    req: CompletionRequest = await read_body(request, CompletionRequest)
    model = state.check_model(req.model)
    prompts = normalize_prompts(req.prompt)
    prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
    params = sampling_params(req, req.max_tokens, req.logprobs, prompt_lp)
    rid = new_id("cmpl")
    started = await start_requests(state, rid, prompts, params)
    view = _View(state, rid, model, req, prompts)
    if req.stream:
        return StreamingResponse(_stream(state, view, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    finals = await collect(request, state, started)
    choices = [view.choice(i, c, out, final=True, first_chunk=True)
               for i, out in enumerate(finals) for c in out.outputs]
    return JSONResponse({"id": rid, "object": "text_completion", "created": view.created,
                         "model": model, "choices": choices, "usage": count_usage(finals)})


class _View:
    """Formats choices, whole or as deltas, in OpenAI's completion shape."""

    def __init__(self, state: ServerState, rid: str, model: str, req: CompletionRequest,
                 prompts: Sequence[str | list[int]]) -> None:
        self.state, self.rid, self.model, self.req = state, rid, model, req
        self.prompts = prompts
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # choice index → text offset of its next token

    def prompt_text(self, i: int) -> str:
        p = self.prompts[i]
        if isinstance(p, str):
            return p
        tok = self.state.engine.tokenizer
        return "" if tok is None else tok.decode(p)

    def choice(self, i: int, c: CompletionOutput, out: RequestOutput, final: bool,
               first_chunk: bool) -> dict[str, Any]:
        """A choice with ``c``'s text and tokens (all of them, or a stream's delta); the prompt
        is echoed in a choice's first chunk."""
        index = i * self.req.n + c.index
        echo = self.req.echo and first_chunk
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = self._logprobs(index, c, out if echo else None)
        return {"index": index, "text": (self.prompt_text(i) if echo else "") + c.text,
                "logprobs": logprobs, "finish_reason": c.finish_reason if final else None,
                "stop_reason": c.stop_reason if final else None}

    def _logprobs(self, index: int, c: CompletionOutput,
                  echo_of: RequestOutput | None) -> dict[str, Any]:
        """``c``'s tokens with their ``c.logprobs`` entries, after the prompt's if echoing."""
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = self.offsets.get(index, 0)
        entries: list[tuple[int, dict[int, float] | None]] = []
        if echo_of is not None:
            plps = echo_of.prompt_logprobs or [None] * len(echo_of.prompt_token_ids)
            entries += list(zip(echo_of.prompt_token_ids, plps))
        lps = c.logprobs or []
        entries += [(t, lps[j] if j < len(lps) else None) for j, t in enumerate(c.token_ids)]
        for tid, entry in entries:
            text = self.state.token_text(tid)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_lps.append(None if entry is None else finite(entry.get(tid, -9999.0)))
            tops.append(None if entry is None else
                        {self.state.token_text(t): finite(v) for t, v in sorted_logprobs(entry)})
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
              ) -> dict[str, Any]:
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage}


async def _stream(state: ServerState, view: _View, started: list[tuple[str, RequestStream]]
                  ) -> AsyncIterator[str]:
    """SSE chunks from the engine's delta outputs: what is new per choice, an optional usage
    chunk, then [DONE]."""
    begun: set[int] = set()  # choices with a chunk sent (the echo goes with the first)
    ended: set[int] = set()  # choices whose finish_reason was sent
    completion = [0] * len(started)  # generated tokens per prompt, for usage
    finals: list[RequestOutput | None] = [None] * len(started)
    opts = view.req.stream_options
    try:
        async for i, out in merge([s for _, s in started]):
            for c in out.outputs:
                key = i * view.req.n + c.index
                if key in ended or (key in begun and not c.text and not c.token_ids
                                    and c.finish_reason is None):
                    continue  # nothing new (a finished sample recurs while its siblings run)
                if c.finish_reason is not None:
                    ended.add(key)
                choice = view.choice(i, c, out, final=c.finish_reason is not None,
                                     first_chunk=key not in begun)
                begun.add(key)
                completion[i] += len(c.token_ids)
                live = (usage(len(out.prompt_token_ids), completion[i])
                        if opts and opts.continuous_usage_stats else None)
                yield sse(view.chunk([choice], live))
            if out.finished:
                finals[i] = out
        if opts and opts.include_usage:
            yield sse(view.chunk([], usage(sum(len(o.prompt_token_ids) for o in finals if o),
                                           sum(completion))))
    except Exception as e:  # noqa: BLE001 - the status line is gone: report inside the stream
        yield sse_error(e)
    finally:
        abort_all(state, started)
    yield SSE_DONE
