"""Malformed and hostile requests get a 4xx in OpenAI's error shape, and the server goes on.

The table runs against a real server process; the engine-death and full-queue cases run
in-process (ASGI) on a tiny random model, where a crash can be injected.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, TINY_MAX_MODEL_LEN, Server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_PROMPT = {"prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _c(**fields: Any) -> dict[str, Any]:
    return {**OK_PROMPT, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {**OK_CHAT, **fields}


C, CHAT = "/v1/completions", "/v1/chat/completions"
# (case id, path, body: dict | bytes, status, words the message must contain, headers)
CASES: list[tuple[str, str, Any, int, str, dict[str, str] | None]] = [
    ("prompt-int", C, _c(prompt=42), 400, "prompt", None),
    ("max_tokens-string", C, _c(max_tokens="5"), 400, "max_tokens", None),
    ("max_tokens-negative", C, _c(max_tokens=-1), 400, "max_tokens", None),
    ("max_tokens-zero", C, _c(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens-float", C, _c(max_tokens=5.5), 400, "max_tokens", None),
    ("temperature-negative", C, _c(temperature=-1), 400, "temperature", None),
    ("temperature-string", C, _c(temperature="hot"), 400, "temperature", None),
    ("temperature-nan", C, b'{"prompt": "x", "temperature": NaN}', 400, "temperature", None),
    ("temperature-inf", C, b'{"prompt": "x", "temperature": 1e999}', 400, "temperature", None),
    ("top_p-zero", C, _c(top_p=0), 400, "top_p", None),
    ("top_p-above-one", C, _c(top_p=1.5), 400, "top_p", None),
    ("top_k-negative", C, _c(top_k=-2), 400, "top_k", None),
    ("min_p-two", C, _c(min_p=2.0), 400, "min_p", None),
    ("n-zero", C, _c(n=0), 400, "n", None),
    ("n-huge", C, _c(n=10**6), 400, "n", None),
    ("n-bool", C, _c(n=True), 400, "n", None),
    ("presence_penalty-3", C, _c(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency_penalty-minus-3", C, _c(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("repetition_penalty-zero", C, _c(repetition_penalty=0), 400, "repetition_penalty", None),
    ("logprobs-21", C, _c(logprobs=21), 400, "logprobs", None),
    ("seed-negative", C, _c(seed=-1), 400, "seed", None),
    ("seed-2-64", C, _c(seed=2**64), 400, "seed", None),
    ("unknown-field", C, _c(best_of=3), 400, "unknown field 'best_of'", None),
    ("stop-empty-string", C, _c(stop=""), 400, "stop", None),
    ("stop-int", C, _c(stop=42), 400, "stop", None),
    ("stop-too-many", C, _c(stop=[f"s{i}" for i in range(100)]), 400, "stop", None),
    ("min_tokens-above-max", C, _c(min_tokens=5, max_tokens=2), 400, "min_tokens", None),
    ("echo-string", C, _c(echo="yes"), 400, "echo", None),
    ("stream_options-without-stream", C, _c(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("prompt-empty-string", C, _c(prompt=""), 400, "empty", None),
    ("prompt-empty-list", C, _c(prompt=[]), 400, "empty", None),
    ("prompt-empty-ids", C, _c(prompt=[[]]), 400, "empty", None),
    ("prompt-mixed-list", C, _c(prompt=["a", 1]), 400, "prompt", None),
    ("token-id-out-of-vocab", C, _c(prompt=[10**9]), 400, "[0, 49152)", None),
    ("token-id-negative", C, _c(prompt=[-1]), 400, "[0, 49152)", None),
    ("too-many-choices", C, _c(prompt=["a"] * 20, n=32), 400, "limit", None),
    ("prompt-longer-than-context", C, _c(prompt="word " * 400), 400,
     f"max_model_len={TINY_MAX_MODEL_LEN}", None),
    ("megabyte-prompt", C, _c(prompt="kestrel " * 130_000), 400, "max_model_len", None),
    ("body-over-limit", C, _c(prompt="x" * (5 << 20)), 413, "limit", None),
    ("invalid-json", C, b'{"prompt": "x",', 400, "JSON", None),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe"}', 400, "UTF-8", None),
    ("json-array-body", C, b"[1, 2, 3]", 400, "object", None),
    ("empty-body", C, b"", 400, "JSON", None),
    ("deeply-nested", C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "JSON", None),
    ("unknown-model", C, _c(model="gpt-17"), 404, "gpt-17", None),
    ("missing-key", C, _c(), 401, "API key", {}),
    ("wrong-key", C, _c(), 401, "API key", {"Authorization": "Bearer nope"}),
    ("chat-empty-messages", CHAT, _chat(messages=[]), 400, "messages", None),
    ("chat-no-messages", CHAT, {"max_tokens": 2}, 400, "messages", None),
    ("chat-bad-role", CHAT, _chat(messages=[{"role": "bot", "content": "x"}]), 400, "role", None),
    ("chat-content-int", CHAT, _chat(messages=[{"role": "user", "content": 5}]), 400, "content",
     None),
    ("chat-user-content-null", CHAT, _chat(messages=[{"role": "user", "content": None}]), 400,
     "content", None),
    ("chat-image-part", CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages", None),
    ("chat-top_logprobs-without-logprobs", CHAT, _chat(top_logprobs=2), 400, "top_logprobs",
     None),
    ("chat-max_completion_tokens-negative", CHAT, _chat(max_completion_tokens=-5), 400,
     "max_completion_tokens", None),
    ("chat-tools-empty", CHAT, _chat(tools=[]), 400, "tools", None),
    ("chat-tool-choice-auto", CHAT, _chat(tools=[{"type": "function", "function": {
        "name": "f"}}]), 400, "tool_choice 'auto'", None),
    ("chat-tool-choice-without-tools", CHAT, _chat(tool_choice="required"), 400,
     "tool_choice needs tools", None),
    ("chat-tool-choice-and-guided", CHAT, _chat(tools=[{"type": "function", "function": {
        "name": "f"}}], tool_choice="required", guided_regex="a+"), 400,
     "cannot be combined", None),
    ("chat-bad-json-schema", CHAT, _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}), 400, "invalid json", None),
    ("detokenize-negative-id", "/detokenize", {"tokens": [-1]}, 400, "token ids", None),
    ("tokenize-nothing", "/tokenize", {}, 400, "prompt", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_clear_4xx(tiny_server: Server, case: tuple) -> None:
    _, path, body, status, words, headers = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(f"{tiny_server.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json",
                               **(AUTH if headers is None else headers)})
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == status
    assert words.lower() in err["message"].lower(), err["message"]


def test_context_limit_message_names_limit_and_length(tiny_server: Server) -> None:
    resp = httpx.post(f"{tiny_server.url}{C}", headers=AUTH, json=_c(prompt=list(range(300))))
    msg = resp.json()["error"]["message"]
    assert resp.status_code == 400 and "300" in msg and str(TINY_MAX_MODEL_LEN) in msg


def test_other_bad_requests(tiny_server: Server) -> None:
    url = tiny_server.url
    assert httpx.get(f"{url}{C}", headers=AUTH).status_code == 405
    assert httpx.get(f"{url}/nope", headers=AUTH).json()["error"]["code"] == 404

    def chunks():  # a chunked upload carries no Content-Length
        for _ in range(6):
            yield b"x" * (1 << 20)

    resp = httpx.post(f"{url}{C}", headers=AUTH, content=chunks(), timeout=60)
    assert resp.status_code == 413
    # max_tokens past the context is bounded, not refused
    resp = httpx.post(f"{url}{C}", headers=AUTH, timeout=60,
                      json=_c(max_tokens=10**12, ignore_eos=True))
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == TINY_MAX_MODEL_LEN - 1
    assert resp.json()["choices"][0]["finish_reason"] == "length"


def test_server_still_serves_after_bad_input(tiny_server: Server) -> None:
    resp = httpx.post(f"{tiny_server.url}{C}", headers=AUTH, json=OK_PROMPT, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
    resp = httpx.post(f"{tiny_server.url}{CHAT}", headers=AUTH, json=OK_CHAT, timeout=60)
    assert resp.status_code == 200
    assert httpx.get(f"{tiny_server.url}/health").json() == {"status": "ok"}
    assert "Traceback" not in tiny_server.log()


# ---- in-process: injected engine crash, full queue -------------------------------------------
def _tiny_app(max_num_seqs: int = 4, max_waiting: int | None = None):
    from kestrel.engine.args import EngineArgs
    from kestrel.engine.async_engine import AsyncEngine
    from kestrel.engine.engine import Engine
    from kestrel.server.api import build_app

    cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu", num_kv_blocks=64,
                     max_num_seqs=max_num_seqs, max_waiting=max_waiting).create_config()
    engine = Engine(cfg, None)
    async_engine = AsyncEngine(engine)
    return engine, async_engine, build_app(async_engine, "tiny-llama")


async def _with_app(app, fn):
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
        return await fn(c)


def test_engine_crash_fails_requests_fast_and_turns_health_red() -> None:
    engine, _, app = _tiny_app()
    real_step = engine.step
    calls = {"n": 0}

    def crashing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected kernel failure")
        return real_step()

    engine.step = crashing_step
    body = {"prompt": [1, 2, 3], "max_tokens": 50, "ignore_eos": True}

    async def run(c: httpx.AsyncClient) -> None:
        assert (await c.get("/health")).status_code == 200
        t0 = time.monotonic()
        whole, streamed = await asyncio.gather(
            c.post("/v1/completions", json=body),
            c.post("/v1/completions", json={**body, "stream": True}))
        assert whole.status_code == 503 and "died" in whole.json()["error"]["message"]
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "injected" in events[-2]
        health = await c.get("/health")
        assert health.status_code == 503 and "injected" in health.json()["reason"]
        again = await c.post("/v1/completions", json=body)
        assert again.status_code == 503 and again.headers["retry-after"]
        assert time.monotonic() - t0 < 10

    asyncio.run(_with_app(app, run))


def test_full_waiting_queue_gets_503_with_retry_after() -> None:
    _, _, app = _tiny_app(max_num_seqs=1, max_waiting=1)
    body = {"prompt": [1, 2, 3], "max_tokens": 20, "ignore_eos": True}

    async def run(c: httpx.AsyncClient) -> None:
        answers = await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 1 and 503 in codes, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["retry-after"] and "full" in busy.json()["error"]["message"]
        ok = await c.post("/v1/completions", json=body)  # once drained, it serves again
        assert ok.status_code == 200

    asyncio.run(_with_app(app, run))


def test_error_answers_are_counted_by_status() -> None:
    """kestrel_http_errors counts every error answer by status, whoever sent it: a missing
    route (404), a malformed body (400), the guard's size limit (413), an unexpected exception
    (500, sent by Starlette's outermost layer); good requests count nothing."""
    from tests.server.conftest import parse_metric

    _, _, app = _tiny_app()

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)

    async def run(c: httpx.AsyncClient) -> None:
        ok = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1})
        assert ok.status_code == 200
        assert "kestrel_http_errors_total{" not in (await c.get("/metrics")).text
        assert (await c.get("/nope")).status_code == 404
        assert (await c.post("/v1/completions", content=b"{")).status_code == 400
        assert (await c.post("/v1/completions", json={"max_tokens": 1})).status_code == 400
        assert (await c.post("/v1/completions", content=b"x" * (65 << 20))).status_code == 413
        quiet = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                  base_url="http://t")
        async with quiet:
            assert (await quiet.get("/boom")).status_code == 500
        text = (await c.get("/metrics")).text
        for status, n in (("400", 2), ("404", 1), ("413", 1), ("500", 1)):
            assert parse_metric(text, f'kestrel_http_errors_total{{status="{status}"}}') == n

    asyncio.run(_with_app(app, run))
