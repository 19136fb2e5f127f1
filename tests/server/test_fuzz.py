"""Property-based fuzzing of the published OpenAPI schema (schemathesis): never a 5xx.

Both schema-conforming and schema-violating requests are generated for every operation, with
the API key, against its own tiny random-model server whose context is only 32 tokens, so that
every generation the fuzzer asks for (up to n=32 samples to the end of the context) is quick.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from tests.server.conftest import API_KEY, Server, start_server, tiny_args

AUTH = {"Authorization": f"Bearer {API_KEY}"}
EXAMPLES = 20
SEEN: Counter[tuple[str, int]] = Counter()  # (path, status class) over all examples


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path, default_model_path: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = tiny_args(tiny_model, default_model_path, "--num-kv-blocks", "1024",
                     "--max-model-len", "32")
    server = start_server(args, tmp_path_factory.mktemp("fuzz") / "server.log", api_key=API_KEY)
    yield server
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", headers=AUTH)
    schema.config.update(base_url=fuzz_server.url, headers=AUTH, request_timeout=120)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=EXAMPLES, deterministic=True)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case) -> None:
    resp = case.call(headers=AUTH, timeout=120)
    SEEN[(case.path, resp.status_code // 100)] += 1
    assert resp.status_code < 500, f"{case.method} {case.path}: {resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert err["message"] and err["code"] == resp.status_code


def test_server_healthy_after_fuzzing(fuzz_server: Server) -> None:
    print("fuzz outcomes (path, status class): count", dict(SEEN))
    for path in ("/v1/completions", "/v1/chat/completions"):  # both paths were exercised
        assert not SEEN or (SEEN[(path, 2)] and SEEN[(path, 4)]), dict(SEEN)
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    assert "Traceback" not in fuzz_server.log()
