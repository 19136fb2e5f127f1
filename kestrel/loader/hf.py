"""Hugging Face model folders: config.json + safetensors (single or sharded), or guarded .bin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kestrel.config import ModelConfig


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_model_config(folder: str | Path) -> ModelConfig:
    return ModelConfig.from_hf(read_config(folder))


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint files, safetensors preferred; the index must name files that exist."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index}: names shard {f.name}, which is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    files = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if files:
        return files
    raise ValueError(f"{folder}: no *.safetensors or *.bin weight files")


def iterate_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every checkpoint file, naming the file when one is unreadable."""
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path)
        else:
            # Pickle can run arbitrary code: only the restricted tensor-only unpickler is allowed.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file
                raise ValueError(f"{path}: cannot load with weights_only=True ({e})") from None
            yield from state.items()


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        for name in f.keys():
            try:
                tensor = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: tensor {name!r} is unreadable or truncated ({e})") from None
            yield name, tensor
