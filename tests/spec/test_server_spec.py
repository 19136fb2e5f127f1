"""`kestrel serve --speculative-method ngram` through the real openai client: streamed and
whole answers agree with a server that does not speculate, and /metrics counts the guesses."""

from __future__ import annotations

import httpx
import openai

from tests.server.conftest import make_tiny_model, parse_metric, start_server, tiny_args


def test_server_with_prompt_lookup(tmp_path, default_model_path):
    tiny = make_tiny_model(tmp_path / "tiny", default_model_path)
    prompt = "one two three four one two three four one two"
    answers = []
    for extra in ((), ("--speculative-method", "ngram", "--num-speculative-tokens", "3")):
        server = start_server(tiny_args(tiny, default_model_path, *extra),
                              tmp_path / f"server{len(extra)}.log")
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                              temperature=0)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
            assert streamed == whole.choices[0].text
            answers.append(whole.choices[0].text)
            metrics = httpx.get(f"{server.url}/metrics").text
            drafted = parse_metric(metrics, "kestrel_spec_decode_num_draft_tokens_total")
            accepted = parse_metric(metrics, "kestrel_spec_decode_num_accepted_tokens_total")
            assert (drafted > 0 and 0 <= accepted <= drafted) if extra else drafted == 0
        finally:
            assert server.stop() == 0, server.log()[-2000:]
    assert answers[0] == answers[1]
