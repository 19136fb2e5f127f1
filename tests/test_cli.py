"""The README's main commands work as a user runs them: a real `kestrel` process."""

from __future__ import annotations

import subprocess
import sys


def _kestrel(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kestrel.cli", "--log-level", "WARNING", *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_on_default_model(default_model_path):
    r = _kestrel("generate", "The capital of France is", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "finish=length" in r.stderr or "finish=stop" in r.stderr


def test_chat_streams_a_reply(default_model_path):
    r = _kestrel("chat", "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_argument_is_a_clear_error():
    r = _kestrel("generate", "hi", "--model", "/no/such/model")
    assert r.returncode == 2
    assert "not found" in r.stderr and "Traceback" not in r.stderr
