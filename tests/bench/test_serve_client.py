"""The serve benchmark client on loopback: a scripted fake OpenAI server, then `kestrel serve`.

The fake server streams with known delays and can fail on purpose (HTTP 500, a stream cut
before [DONE]), so the client's timing and its failure accounting can both be checked.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kestrel.bench.serve import ServeError, ServeOptions, ServeRequest, collect_records, run_serve
from kestrel.cli import main

REPO = Path(__file__).resolve().parents[2]
FIRST_DELAY = 0.05  # seconds before the first token
GAP = 0.01  # seconds between tokens


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fail_every: int = 0, cut_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.fail_every, self.cut_every = fail_every, cut_every
        self.count = 0
        self.lock = threading.Lock()
        self.payloads: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send_json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": "fake-model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def _event(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            n = srv.count
            srv.count += 1
            srv.payloads.append(body)
        if srv.fail_every and n % srv.fail_every == srv.fail_every - 1:
            self._send_json(500, {"error": {"message": "engine exploded"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        time.sleep(FIRST_DELAY)
        for i in range(body["max_tokens"]):
            if i:
                time.sleep(GAP)
            self._event({"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]})
            if srv.cut_every and n % srv.cut_every == srv.cut_every - 1 and i == 1:
                return  # the connection drops mid-stream
        self._event({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": body["max_tokens"]}})
        self._event("[DONE]")


@pytest.fixture
def fake():
    servers: list[FakeServer] = []

    def start(**kw: int) -> FakeServer:
        srv = FakeServer(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def requests(n: int, in_len: int = 8, out_len: int = 5) -> list[ServeRequest]:
    return [ServeRequest(list(range(100 + i, 100 + i + in_len)), in_len, out_len)
            for i in range(n)]


def opts(url: str, **kw: object) -> ServeOptions:
    return ServeOptions(base_url=url, model=kw.pop("model", None), progress=False, **kw)


def test_client_times_streams(fake):
    srv = fake()
    recs, duration, model = asyncio.run(collect_records(opts(srv.url), requests(4)))
    assert model == "fake-model"  # taken from /v1/models
    assert all(r.success for r in recs), [r.error for r in recs]
    for r in recs:
        assert r.output_len == 5 and len(r.chunk_times) == 5 and r.prompt_len == 8
        # what the server guarantees: nothing before its sleeps (the client may read two
        # events at once, so single gaps have no lower bound)
        assert r.chunk_times[0] - r.start >= FIRST_DELAY
        assert r.chunk_times[-1] - r.start >= FIRST_DELAY + 4 * GAP
        assert r.chunk_times == sorted(r.chunk_times)
        assert r.start <= r.chunk_times[0] and r.chunk_times[-1] <= r.end
    assert duration >= max(r.end for r in recs) - min(r.start for r in recs) - 1e-6
    p = srv.payloads[0]
    assert p["stream"] is True and p["ignore_eos"] is True and p["max_tokens"] == 5
    assert p["model"] == "fake-model" and len(p["prompt"]) == 8


def test_failures_counted_separately(fake):
    srv = fake(fail_every=3, cut_every=4)
    res = run_serve(opts(srv.url, request_rate=200.0), requests(12))
    # requests 2, 5, 8, 11 answer 500; of the rest, 3 and 7 are cut after two tokens
    assert res["num_requests"] == 12
    assert res["errors"] == {"HTTP 500: {\"error\": {\"message\": \"engine exploded\"}}": 4,
                             "stream ended before [DONE]": 2}
    assert (res["completed"], res["failed"]) == (6, 6)
    assert res["total_output_tokens"] == 6 * 5  # cut streams' tokens are not counted
    assert res["ttft_ms"]["median"] >= FIRST_DELAY * 1e3  # no failure counted as a fast one
    assert res["e2e_ms"]["median"] >= (FIRST_DELAY + 4 * GAP) * 1e3


def test_server_down_and_wrong_model(fake):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServeError, match=f"cannot reach the server at http://127.0.0.1:{port}"):
        run_serve(opts(f"http://127.0.0.1:{port}"), requests(1))
    srv = fake()
    with pytest.raises(ServeError, match="serves \\['fake-model'\\], not 'other'"):
        run_serve(opts(srv.url, model="other"), requests(1))
    with pytest.raises(ServeError, match="--request-rate"):
        opts(srv.url, request_rate=0.0)


def test_serve_cli_json_and_exit_codes(fake, tmp_path, capsys):
    srv = fake(fail_every=2)
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", srv.url, "--workload", "trtllm-2k-128",
               "--num-prompts", "4", "--input-len", "6", "--output-len", "3",
               "--request-rate", "100", "--burstiness", "0.5", "--vocab-size", "1000",
               "--goodput", "ttft:10000", "tpot:1000", "--gpu-hour-price", "2.0",
               "--no-progress", "--json", str(out)])
    assert rc == 0  # some succeeded: the failures are reported, not fatal
    assert "2 of 4 requests failed: 2 x HTTP 500" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert (res["completed"], res["failed"]) == (2, 2)
    assert res["goodput"] == pytest.approx(2 / res["duration_s"])
    assert res["cost"]["usd_per_request"] == pytest.approx(
        2.0 * res["duration_s"] / 3600 / 2)
    for key in ("device", "date", "commit", "command"):
        assert res["env"][key]
    assert all(len(p["prompt"]) == 6 and p["max_tokens"] == 3 for p in srv.payloads)
    srv_all_fail = fake(fail_every=1)
    rc = main(["bench", "serve", "--base-url", srv_all_fail.url, "--num-prompts", "2",
               "--input-len", "4", "--output-len", "2", "--vocab-size", "1000",
               "--no-progress"])
    assert rc == 1
    assert main(["bench", "serve", "--base-url", srv.url, "--workload", "nope",
                 "--vocab-size", "1000"]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err


def test_sweep_against_servers(fake, tmp_path):
    a, b = fake(), fake()
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    rc = main(["bench", "sweep", "--server", f"a={a.url}", "--server", f"b={b.url}",
               "--request-rates", "50,inf", "--num-prompts", "3", "--input-len", "4",
               "--output-len", "3", "--vocab-size", "1000", "--no-progress",
               "--plot", str(plot), "--json", str(out)])
    assert rc == 0 and plot.stat().st_size > 0
    res = json.loads(out.read_text())
    assert [(p["config"], p["x"]) for p in res["points"]] == [
        ("a", 50.0), ("a", None), ("b", 50.0), ("b", None)]  # inf is null in JSON
    assert all(p["completed"] == 3 for p in res["points"])
    assert len(a.payloads) == len(b.payloads) == 6
    # each rate gets other prompts of the same lengths (no prefix-cache hits from the last
    # point), and both servers the same ones
    first, second = ([p["prompt"] for p in a.payloads[i:i + 3]] for i in (0, 3))
    assert sorted(map(len, first)) == sorted(map(len, second)) and not set(
        map(tuple, first)) & set(map(tuple, second))
    assert sorted(map(tuple, first)) == sorted(tuple(p["prompt"]) for p in b.payloads[:3])


# ---------------------------------------------------------------------------- kestrel serve

_LISTEN = re.compile(r"listening on http://[^\s]+:(\d+)")


def _tiny_model(folder: Path, default_model: Path) -> Path:
    """A 2-layer random model in the default model's vocabulary (its tokenizer works)."""
    cfg = json.loads((default_model / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.skipif(importlib.util.find_spec("kestrel.server.cli") is None,
                    reason="kestrel serve is not built yet")
def test_client_against_kestrel_serve(tmp_path, default_model_path):
    model = _tiny_model(tmp_path / "tiny", Path(default_model_path))
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "kestrel.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--model", str(model), "--load-format", "dummy", "--tokenizer",
           str(default_model_path), "--max-model-len", "256", "--served-model-name", "tiny"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KESTREL_API_KEY", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        port = _wait_listening(proc, log, timeout=240)
        res = run_serve(opts(f"http://127.0.0.1:{port}", request_rate=math.inf),
                        requests(3, in_len=16, out_len=4))
        assert (res["completed"], res["failed"]) == (3, 0), res["errors"]
        assert res["total_output_tokens"] == 3 * 4  # ignore_eos honored: exactly max_tokens
        assert res["total_input_tokens"] == 3 * 16
        assert res["model"] == "tiny"
        assert 0 < res["ttft_ms"]["median"] <= res["e2e_ms"]["median"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_listening(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    import httpx

    deadline = time.monotonic() + timeout
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kestrel serve exited {proc.returncode}:\n{log.read_text()}")
        if port is None:
            m = _LISTEN.search(log.read_text(errors="replace"))
            port = int(m.group(1)) if m else None
        else:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return port
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"kestrel serve not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def test_which_events_are_tokens():
    from kestrel.bench.serve import _is_token_event

    def chat(delta, finish=None):
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert not _is_token_event(chat({"role": "assistant", "content": ""}), chat=True)
    assert _is_token_event(chat({"content": "Hi"}), chat=True)
    assert _is_token_event(chat({"content": ""}), chat=True)  # a token with no text yet
    assert not _is_token_event(chat({}, "stop"), chat=True)
    assert not _is_token_event({"choices": [], "usage": {"completion_tokens": 3}}, chat=False)
    assert _is_token_event({"choices": [{"text": "", "finish_reason": None}]}, chat=False)
    assert not _is_token_event({"choices": [{"text": "", "finish_reason": "length"}]},
                               chat=False)
