"""The official openai client against `kestrel serve` (no arguments: the default model).

Greedy answers must equal the offline LLM's for the same prompt, streaming must reassemble to the
whole answer, and n, stop, seed, logprobs and usage must behave as OpenAI documents them.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from kestrel.sampling_params import SamplingParams
from tests.server.conftest import Server, parse_metric

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(default_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0,
                         timeout=180)


def test_serve_defaults_are_safe() -> None:
    from kestrel.cli import build_parser

    ns = build_parser().parse_args(["serve"])
    assert (ns.host, ns.port, ns.model, ns.preset) == ("127.0.0.1", 8000, None, None)
    assert ns.max_request_body_bytes > 0 and ns.max_waiting > 0


def test_no_argument_serve_lists_default_model(default_server: Server,
                                               client: openai.OpenAI) -> None:
    assert client.models.list().data[0].id == MODEL
    log = default_server.log()
    assert "listening on http://127.0.0.1:" in log and f"{MODEL}" in log


def test_completion_greedy_equals_offline(client: openai.OpenAI, smollm_llm) -> None:
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    offline = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    assert resp.choices[0].text == offline.outputs[0].text
    assert resp.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert resp.usage.completion_tokens == len(offline.outputs[0].token_ids)
    assert resp.choices[0].finish_reason == offline.outputs[0].finish_reason


def test_chat_greedy_equals_offline(client: openai.OpenAI, smollm_llm) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                          temperature=0)
    offline = smollm_llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=12))[0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == offline.outputs[0].text
    assert resp.usage.prompt_tokens == len(offline.prompt_token_ids)


def test_streams_reassemble_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    chat_whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                                temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == chat_whole.choices[0].message.content
    assert stream[-1].usage.total_tokens == chat_whole.usage.total_tokens


def test_n2_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    def ask() -> list[str]:
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      n=2, temperature=1.0, seed=1234)
        assert sorted(c.index for c in r.choices) == [0, 1]
        assert 2 <= r.usage.completion_tokens <= 16
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert ask() == ask()
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2,
                                          temperature=0.8, seed=7)
    assert len(chat.choices) == 2


def test_streamed_samples_finish_once_each(client: openai.OpenAI) -> None:
    """n=3 streamed, samples ending at different steps (a stop string): each choice gets one
    finish_reason, and its text matches the non-streamed answer of the same seed."""
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "n": 3,
          "temperature": 1.0, "seed": 11, "stop": [","]}
    whole = client.completions.create(**kw)
    finishes: dict[int, list[str]] = {0: [], 1: [], 2: []}
    texts = ["", "", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    assert all(len(f) == 1 for f in finishes.values()), finishes
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len({len(t) for t in texts}) > 1, "the samples ended together: pick another seed"

    chat_finishes: dict[int, int] = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, n=3,
                                                temperature=1.0, seed=11, stop=[","],
                                                stream=True):
        for c in chunk.choices:
            if c.finish_reason is not None:
                chat_finishes[c.index] = chat_finishes.get(c.index, 0) + 1
    assert chat_finishes == {0: 1, 1: 1, 2: 1}


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                     temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     stop=[stop])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]


def test_logprobs(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == resp.usage.completion_tokens == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) >= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_prompt_forms_and_echo(client: openai.OpenAI, default_server: Server) -> None:
    ids = httpx.post(f"{default_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    text = httpx.post(f"{default_server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    # streamed, two prompts interleave (merge's general path; one prompt awaits its stream)
    texts = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"],
                                           max_tokens=4, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in both.choices]
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == PROMPT + by_text.choices[0].text


def test_metrics_exported(default_server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{default_server.url}/metrics").text
    for name in ("kestrel_time_to_first_token_seconds_count",
                 "kestrel_inter_token_latency_seconds_count",
                 "kestrel_e2e_request_latency_seconds_count",
                 "kestrel_prompt_tokens_total", "kestrel_generation_tokens_total"):
        assert parse_metric(text, name) > 0, name
    for name in ("kestrel_num_requests_waiting", "kestrel_num_requests_running",
                 "kestrel_kv_cache_usage_perc", "kestrel_prefix_cache_hit_rate",
                 "kestrel_num_preemptions_total"):
        assert parse_metric(text, name) >= 0, name
    assert parse_metric(text, "kestrel_prefix_cache_hit_rate") > 0  # the prompts repeat


def test_structured_outputs(client: openai.OpenAI) -> None:
    """response_format (json_schema, json_object) and vLLM's guided_* fields through the client;
    a constraint that does not compile is a 400 naming it."""
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    resp = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=80, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": person, "strict": True}})
    value = json.loads(resp.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Return {\"ok\": true} as JSON."}],
        max_tokens=40, temperature=0, stream=True, response_format={"type": "json_object"}))
    assert isinstance(json.loads(streamed), dict)
    picks = client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=5, n=4,
                                      seed=2, temperature=1.0,
                                      extra_body={"guided_choice": ["yes", "no"]})
    assert all(c.text in ("yes", "no") and c.finish_reason == "stop" for c in picks.choices)
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                  extra_body={"guided_regex": "(unclosed"})
    with pytest.raises(openai.BadRequestError, match="exactly one"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                  extra_body={"guided_regex": "a+", "guided_choice": ["b"]})


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_tool_calls(client: openai.OpenAI) -> None:
    """A named function's arguments and 'required' calls come back as tool_calls whose
    arguments parse and fit the schemas, streamed or not; the conversation continues with the
    call and the tool's answer; 'auto' and unknown names are 400s."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=60,
                                          temperature=0, tools=[WEATHER, TIME],
                                          tool_choice=named)
    choice = resp.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.message.content is None and choice.finish_reason == "stop"
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(args["city"], str) and set(args) <= {"city", "unit"}
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask, max_tokens=60,
                                                 temperature=0, tools=[WEATHER, TIME],
                                                 tool_choice=named, stream=True))
    streamed = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in streamed] == \
        [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "stop"

    req = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=120, n=2, seed=4,
                                         temperature=1.0, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False)
    for c in req.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        f = c.message.tool_calls[0].function
        assert f.name in ("get_weather", "get_time") and isinstance(json.loads(f.arguments), dict)

    follow = client.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                            tools=[WEATHER], tool_choice="none", messages=ask + [
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}])
    assert follow.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="auto"):
        client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER])
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice={
            "type": "function", "function": {"name": "nope"}})
