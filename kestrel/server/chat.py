"""POST /v1/chat/completions: the model's chat template, then one engine request with n samples."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kestrel.engine.async_engine import RequestStream
from kestrel.outputs import CompletionOutput
from kestrel.server.errors import bad_request, engine_error
from kestrel.server.protocol import ChatCompletionRequest, ChatMessage
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
from kestrel.server.tools import ToolMode, tool_mode


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages → the plain role/content dicts chat templates expect (with an assistant's
    tool calls, their arguments parsed as Hugging Face templates take them, and a tool
    answer's call id)."""
    conv = []
    for m in messages:
        # Chat templates predate the "developer" role: it is a system message to them.
        turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                "content": m.text()}
        if getattr(m, "tool_calls", None):
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if getattr(m, "tool_call_id", None):
            turn["tool_call_id"] = m.tool_call_id
        conv.append(turn)
    return conv


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def render_chat(engine: Any, conv: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Runs on the engine thread: the tokenizer is the engine's."""
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError("this model has no chat template: use /v1/completions")
    try:
        ids = tok.apply_chat_template(conv, tools=tools,
                                      add_generation_prompt=add_generation_prompt,
                                      tokenize=True)
    except Exception as e:  # noqa: BLE001 - template errors are about the conversation given
        raise ValueError(f"the chat template rejected these messages: {e}") from None
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


async def chat_prompt(state: ServerState, messages: list[ChatMessage],
                      add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None
                      ) -> list[int]:
    conv = conversation(messages)
    try:
        return await state.engine.call(
            lambda e: render_chat(e, conv, add_generation_prompt, tools))
    except Exception as e:  # noqa: BLE001 - mapped to the answer the client gets
        raise engine_error(e) from None


async def create_chat_completion(request: Request) -> Any:
    state: ServerState = request.app.state.kestrel
    req: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
    model = state.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    mode = tool_mode(req)
    params = sampling_params(req, max_tokens, k, structured=mode and mode.structured())
    tools = [t.model_dump(exclude_none=True) for t in req.tools] \
        if req.tools and req.tool_choice != "none" else None
    ids = await chat_prompt(state, req.messages, req.add_generation_prompt, tools)
    rid = new_id("chatcmpl")
    started = await start_requests(state, rid, [ids], params)
    view = _ChatView(state, rid, model, req, mode)
    if req.stream:
        return StreamingResponse(_stream(state, view, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    out = (await collect(request, state, started))[0]
    choices = []
    for c in out.outputs:
        message, finish = view.answer(c)
        choices.append({"index": c.index, "message": {"role": "assistant", **message},
                        "logprobs": view.logprobs(c), "finish_reason": finish,
                        "stop_reason": c.stop_reason})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": view.created,
                         "model": model, "choices": choices, "usage": count_usage([out])})


class _ChatView:
    def __init__(self, state: ServerState, rid: str, model: str, req: ChatCompletionRequest,
                 mode: ToolMode | None) -> None:
        self.state, self.rid, self.model, self.req, self.mode = state, rid, model, req, mode
        self.created = int(time.time())

    def answer(self, c: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """A finished choice's message fields and finish_reason: its text, or its tool calls
        (finish_reason "tool_calls" for ``required``, "stop" for a named function, as OpenAI
        and vLLM answer)."""
        calls = self.mode.calls(c.text) if self.mode is not None else None
        if calls is None:
            return {"content": c.text}, c.finish_reason
        finish = "tool_calls" if self.mode.required and c.finish_reason == "stop" \
            else c.finish_reason
        return {"content": None, "tool_calls": calls}, finish

    def logprobs(self, c: CompletionOutput) -> dict[str, Any] | None:
        """``c``'s tokens (all of them, or a stream's delta) with their logprob entries."""
        if not self.req.logprobs:
            return None
        k = self.req.top_logprobs or 0
        lps = c.logprobs or []
        content = []
        for j, tid in enumerate(c.token_ids):
            entry = lps[j] if j < len(lps) else {}
            content.append({**self._token(tid, entry.get(tid, -9999.0)),
                            "top_logprobs": [self._token(t, v)
                                             for t, v in sorted_logprobs(entry)[:k]]})
        return {"content": content}

    def _token(self, tid: int, logprob: float) -> dict[str, Any]:
        text = self.state.token_text(tid)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
              ) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage}


async def _stream(state: ServerState, view: _ChatView, started: list[tuple[str, RequestStream]]
                  ) -> AsyncIterator[str]:
    """A role chunk per choice, then the engine's delta outputs as content deltas, an optional
    usage chunk, then [DONE]."""
    n = view.req.n
    completion = 0  # generated tokens over all choices, for usage
    ended: set[int] = set()  # choices whose finish_reason was sent
    prompt_tokens = 0
    opts = view.req.stream_options
    texts = [""] * n  # tool calls: each choice's answer so far
    try:
        for i in range(n):
            yield sse(view.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]))
        async for _, out in merge([s for _, s in started]):
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                if c.index in ended or (not c.text and not c.token_ids
                                        and c.finish_reason is None):
                    continue  # nothing new (a finished sample recurs while its siblings run)
                if c.finish_reason is not None:
                    ended.add(c.index)
                delta, finish = {"content": c.text} if c.text else {}, c.finish_reason
                if view.mode is not None:  # the calls go out whole, when the answer is
                    texts[c.index] += c.text
                    delta = {}
                    if finish is not None:
                        message, finish = view.answer(replace(c, text=texts[c.index]))
                        delta = {"tool_calls": [{"index": j, **call} for j, call in enumerate(
                            message["tool_calls"])]} if message["content"] is None \
                            else {"content": message["content"]}
                choice = {"index": c.index, "delta": delta, "logprobs": view.logprobs(c),
                          "finish_reason": finish, "stop_reason": c.stop_reason}
                completion += len(c.token_ids)
                live = (usage(prompt_tokens, completion)
                        if opts and opts.continuous_usage_stats else None)
                yield sse(view.chunk([choice], live))
        if opts and opts.include_usage:
            yield sse(view.chunk([], usage(prompt_tokens, completion)))
    except Exception as e:  # noqa: BLE001 - the status line is gone: report inside the stream
        yield sse_error(e)
    finally:
        abort_all(state, started)
    yield SSE_DONE
