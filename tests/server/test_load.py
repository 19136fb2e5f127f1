"""Load, abort and shutdown against a real server process (tiny random model, loopback only).

256 concurrent streams all finish with exactly the tokens they asked for; clients that hang up
free their KV blocks within a second; SIGTERM lets running streams finish and exits cleanly.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Server, start_server, tiny_args

NUM_STREAMS = 256
MAX_TOKENS = 12


async def _one_stream(client: httpx.AsyncClient, server: Server, i: int) -> dict:
    """Stream one completion; return what arrived: ids, tokens, finish reason, usage."""
    body = {"model": "tiny", "prompt": f"Request number {i} says", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    got: dict = {"ids": set(), "tokens": 0, "text": "", "finish": None, "usage": None,
                 "done": False}
    async with client.stream("POST", f"{server.url}/v1/completions", json=body,
                             headers=server.headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            got["ids"].add(chunk["id"])
            for c in chunk["choices"]:
                got["tokens"] += len(c["logprobs"]["tokens"])
                got["text"] += c["text"]
                got["finish"] = c["finish_reason"] or got["finish"]
            got["usage"] = chunk["usage"] or got["usage"]
    return got


def test_256_concurrent_streams_all_complete(tiny_server: Server) -> None:
    gen_before = tiny_server.metric("kestrel_generation_tokens_total")

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=NUM_STREAMS + 8)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(_one_stream(client, tiny_server, i)
                                          for i in range(NUM_STREAMS)))

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run(), timeout=150))
    elapsed = time.monotonic() - t0
    ids = [next(iter(r["ids"])) for r in results]
    assert all(len(r["ids"]) == 1 for r in results)
    assert len(set(ids)) == NUM_STREAMS, "a response id was reused"
    for r in results:
        assert r["done"] and r["finish"] == "length"
        assert r["tokens"] == MAX_TOKENS, r  # none lost, none duplicated
        assert r["usage"]["completion_tokens"] == MAX_TOKENS
    assert tiny_server.metric("kestrel_generation_tokens_total") - gen_before \
        == NUM_STREAMS * MAX_TOKENS
    _wait_idle(tiny_server, 5.0)
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200  # debug checks held
    print(f"{NUM_STREAMS} streams x {MAX_TOKENS} tokens in {elapsed:.1f}s")


def _wait_idle(server: Server, timeout: float) -> float:
    """Seconds until no KV block is held and nothing runs; fails after ``timeout``."""
    t0 = time.monotonic()
    while True:
        used = server.metric("kestrel_kv_cache_blocks_used")
        running = server.metric("kestrel_num_requests_running")
        waiting = server.metric("kestrel_num_requests_waiting")
        if used == running == waiting == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"still {used} KV blocks used, {running} running, "
                                 f"{waiting} waiting after {timeout}s")
        time.sleep(0.02)


def test_closed_streams_free_their_blocks_within_a_second(tiny_server: Server) -> None:
    aborted_before = tiny_server.metric("kestrel_request_aborted_total")
    num = 8

    async def run() -> float:
        body = {"prompt": "Tell me a very long story", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [client.stream("POST", f"{tiny_server.url}/v1/completions", json=body,
                                     headers=tiny_server.headers) for _ in range(num)]
            responses = [await s.__aenter__() for s in streams]
            for resp in responses:  # read a little of each, so all are mid-generation
                lines = resp.aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass
            assert await asyncio.to_thread(tiny_server.metric,
                                           "kestrel_kv_cache_blocks_used") > 0
            for s in streams:
                await s.__aexit__(None, None, None)  # hang up mid-stream
        return await asyncio.to_thread(_wait_idle, tiny_server, 1.0)

    freed_after = asyncio.run(run())
    assert freed_after < 1.0
    assert tiny_server.metric("kestrel_request_aborted_total") - aborted_before == num
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


def test_client_giving_up_on_a_whole_response_aborts_it(tiny_server: Server) -> None:
    aborted_before = tiny_server.metric("kestrel_request_aborted_total")
    body = {"prompt": "Tell me a very long story", "max_tokens": 240, "ignore_eos": True,
            "n": 8}
    with pytest.raises(httpx.ReadTimeout):  # hangs up before the answer is ready
        httpx.post(f"{tiny_server.url}/v1/completions", json=body, headers=tiny_server.headers,
                   timeout=httpx.Timeout(10, read=0.3))
    assert _wait_idle(tiny_server, 1.0) < 1.0
    assert tiny_server.metric("kestrel_request_aborted_total") - aborted_before == 1


def test_sigterm_finishes_running_streams_then_exits(tiny_model: Path, default_model_path: Path,
                                                     tmp_path: Path) -> None:
    server = start_server(tiny_args(tiny_model, default_model_path, "--num-kv-blocks", "512"),
                          tmp_path / "server.log")
    try:
        async def run() -> dict:
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.create_task(_one_stream(client, server, 0))
                while server.metric("kestrel_num_requests_running") == 0 and not task.done():
                    await asyncio.sleep(0.01)
                server.proc.terminate()  # SIGTERM mid-stream
                return await task

        got = asyncio.run(run())
        assert got["done"] and got["tokens"] == MAX_TOKENS and got["finish"] == "length"
        assert server.proc.wait(30) == 0
        assert "draining" in server.log() and "server stopped" in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("timeout", [0.5])
def test_sigterm_past_the_drain_timeout_ends_streams_with_an_error(
        tiny_model: Path, default_model_path: Path, tmp_path: Path, timeout: float) -> None:
    server = start_server(tiny_args(tiny_model, default_model_path, "--num-kv-blocks", "512",
                                    "--max-model-len", "1024", "--shutdown-timeout",
                                    str(timeout)), tmp_path / "server.log")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True,
                                "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.proc.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])
        assert err["error"]["code"] == 503 and "shut down" in err["error"]["message"]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_async_engine_generate_aborts_when_the_reader_leaves() -> None:
    """In-process: breaking out of AsyncEngine.generate frees the request's blocks at once."""
    from kestrel.engine.args import EngineArgs
    from kestrel.engine.async_engine import AsyncEngine
    from kestrel.engine.engine import Engine
    from kestrel.sampling_params import SamplingParams

    cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu", num_kv_blocks=64,
                     debug_checks=True).create_config()
    engine = AsyncEngine(Engine(cfg, None))

    async def run() -> None:
        engine.start()
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        seen = 0
        async for out in engine.generate("r1", list(range(1, 40)), params):
            seen = len(out.outputs[0].token_ids)
            if seen >= 2:
                break
        assert 2 <= seen < 500
        t0 = time.monotonic()
        while engine.snapshot.kv_blocks_used and time.monotonic() - t0 < 1.0:
            await asyncio.sleep(0.005)
        assert engine.snapshot.kv_blocks_used == 0
        assert await engine.call(lambda e: len(e.groups)) == 0
        full = [o async for o in engine.generate("r2", [1, 2, 3], params.clone(max_tokens=4))]
        assert full[-1].finished and len(full[-1].outputs[0].token_ids) == 4
        await engine.shutdown()
        assert not engine.healthy

    asyncio.run(run())


def test_a_delta_reader_that_falls_behind_gets_every_token_once() -> None:
    """In-process: a "delta" stream read slower than the engine steps gets the missed outputs
    merged (RequestStream.next), so its pieces add up to the cumulative request's tokens."""
    from kestrel.engine.args import EngineArgs
    from kestrel.engine.async_engine import AsyncEngine
    from kestrel.engine.engine import Engine
    from kestrel.sampling_params import SamplingParams

    cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu", num_kv_blocks=64,
                     debug_checks=True).create_config()
    engine = AsyncEngine(Engine(cfg, None))

    async def run() -> None:
        engine.start()
        prompt = list(range(1, 20))
        want = [o async for o in engine.generate(
            "cum", prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))][-1]
        pieces, reads = [], 0
        async for out in engine.generate("delta", prompt, SamplingParams(
                max_tokens=40, temperature=0, ignore_eos=True, output_kind="delta")):
            pieces += out.outputs[0].token_ids
            reads += 1
            await asyncio.sleep(0.02)  # several engine steps pass between reads
        assert pieces == want.outputs[0].token_ids and len(pieces) == 40
        assert reads < 40, "no read was merged: the test did not fall behind"
        await engine.shutdown()

    asyncio.run(run())
