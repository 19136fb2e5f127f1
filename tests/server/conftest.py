"""Real `kestrel serve` subprocesses on 127.0.0.1 with ephemeral ports, for the server tests.

Two models: the default model (text that means something; the offline LLM is its oracle), and a
tiny random-weight model in the default model's vocabulary and with its tokenizer and chat
template, fast enough on CPU for hundreds of concurrent streams and for schema fuzzing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
TINY_MAX_MODEL_LEN = 256
_LISTEN = re.compile(r"listening on http://([^\s]+):(\d+)")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """One sample of /metrics (unlabelled, or the sum over labels)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return parse_metric(text, name)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def parse_metric(text: str, name: str) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise KeyError(f"metric {name} not in /metrics")
    return total


def start_server(args: list[str], log_path: Path, api_key: str | None = None,
                 timeout: float = 240.0) -> Server:
    """`python -m kestrel.cli serve --port 0 ARGS`; wait for its logged address and /health."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("KESTREL_API_KEY", None)
    cmd = [sys.executable, "-m", "kestrel.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           *args, *(["--api-key", api_key] if api_key else [])]
    log_file = open(log_path, "wb")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log_file.close()
    server = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                   f"{log_path.read_text(errors='replace')[-4000:]}")
            if server is None:
                m = _LISTEN.search(log_path.read_text(errors="replace"))
                if m:
                    server = Server(proc, f"http://127.0.0.1:{m.group(2)}", log_path, api_key)
            elif _healthy(server.url):
                return server
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n"
                           f"{log_path.read_text(errors='replace')[-4000:]}")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def make_tiny_model(folder: Path, default_model: Path) -> Path:
    """A 2-layer random model sharing the default model's vocabulary (49152 tokens)."""
    cfg = json.loads((default_model / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def tiny_args(tiny: Path, default_model: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny), "--load-format", "dummy", "--tokenizer", str(default_model),
            "--max-model-len", str(TINY_MAX_MODEL_LEN), "--served-model-name", "tiny",
            "--debug-checks", *extra]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-smollm", default_model_path)


@pytest.fixture(scope="session")
def tiny_server(tiny_model: Path, default_model_path: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tiny random model with an API key, shared by the load, abort, bad-input and fuzz tests.
    It overlaps steps, as a CUDA server does by default (the default-model server does not)."""
    log_path = tmp_path_factory.mktemp("logs") / "tiny-server.log"
    server = start_server(tiny_args(tiny_model, default_model_path, "--num-kv-blocks", "2048",
                                    "--async-scheduling"), log_path, api_key=API_KEY)
    assert "overlapped steps on" in server.log(), server.log()[-2000:]
    yield server
    rc = server.stop()
    assert rc == 0, f"server exit code {rc}:\n{server.log()[-3000:]}"


@pytest.fixture(scope="session")
def default_server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    """`kestrel serve` with no model argument: the default model, no key."""
    log_path = tmp_path_factory.mktemp("logs") / "default-server.log"
    server = start_server([], log_path)
    yield server
    server.stop()
