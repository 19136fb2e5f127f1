"""pull_default_model: converts once, is found again through its marker, honours KESTREL_HOME."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kestrel.loader import pull
from kestrel.loader.pull import (
    MARKER_NAME,
    default_gguf_path,
    default_model_path,
    kestrel_home,
    pull_default_model,
    read_marker,
)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return pull_default_model(progress=False)


def _no_convert(*args: object, **kwargs: object) -> Path:
    raise AssertionError("pull_default_model converted again")


def test_second_pull_is_cached(default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = read_marker(default_model)
    assert marker is not None and len(marker["gguf_sha256"]) == 64
    monkeypatch.setattr(pull, "gguf_to_hf_folder", _no_convert)
    monkeypatch.setattr(pull, "locate_default_gguf", _no_convert)
    start = time.perf_counter()
    assert pull_default_model(progress=False) == default_model == default_model_path()
    assert time.perf_counter() - start < 2.0


def test_kestrel_home_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KESTREL_HOME", raising=False)
    assert kestrel_home() == Path.home() / ".cache" / "kestrel"
    monkeypatch.setenv("KESTREL_HOME", "/somewhere/else")
    assert default_model_path() == Path("/somewhere/else/models/SmolLM2-135M-Instruct")


def test_kestrel_home_is_honoured(default_model: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh home gets its own GGUF copy and conversion; the source is the cached GGUF."""
    cached_gguf = _cached(default_model)
    located: list[Path] = []

    def locate(workdir: Path, progress: bool = True) -> Path:
        located.append(workdir)
        return cached_gguf

    monkeypatch.setattr(pull, "locate_default_gguf", locate)
    monkeypatch.setenv("KESTREL_HOME", str(tmp_path / "home"))
    folder = pull_default_model(progress=False)
    assert folder == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    assert len(located) == 1
    assert (tmp_path / "home" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert read_marker(folder)["gguf_sha256"] == read_marker(default_model)["gguf_sha256"]
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (default_model / "config.json").read_text())
    monkeypatch.setattr(pull, "gguf_to_hf_folder", _no_convert)
    assert pull_default_model(progress=False) == folder and len(located) == 1


def test_missing_marker_reconverts(default_model: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder without its marker (a crash after the rename) is converted again."""
    monkeypatch.setenv("KESTREL_HOME", str(tmp_path))
    default_model_path().mkdir(parents=True)
    (default_model_path() / "config.json").write_text("{}")
    pull._copy_atomic(_cached(default_model), default_gguf_path())
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
        calls.append(Path(gguf_path))
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"):
            (Path(out_dir) / name).write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(pull, "gguf_to_hf_folder", fake_convert)
    monkeypatch.setattr(pull, "locate_default_gguf", _no_convert)  # the GGUF copy is there
    assert pull_default_model(progress=False) == default_model_path()
    assert calls == [default_gguf_path()]
    assert (default_model_path() / MARKER_NAME).is_file()
    assert pull_default_model(progress=False) == default_model_path() and len(calls) == 1


def _cached(default_model: Path) -> Path:
    """The GGUF of the session's default model (next to its folder)."""
    return default_model.parent / pull.DEFAULT_GGUF_NAME
