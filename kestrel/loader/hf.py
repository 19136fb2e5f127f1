"""Hugging Face model folders: config.json + safetensors (single or sharded), or guarded .bin."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def iterate_weights(folder: str | Path, lazy: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """Yield (name, tensor) from every checkpoint file, naming the file when one is unreadable.

    ``lazy``: safetensors tensors come as ``LazyTensor``s that read only the slice a
    tensor-parallel rank narrows them to; each is valid while the iteration is on it.
    """
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path, lazy)
        else:
            # Pickle can run arbitrary code: only the restricted tensor-only unpickler is allowed.
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file
                raise ValueError(f"{path}: cannot load with weights_only=True ({e})") from None
            yield from state.items()


def _iter_safetensors(path: Path, lazy: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        for name in f.keys():
            try:
                tensor = LazyTensor(f.get_slice(name), f"{path}: tensor {name!r}") if lazy \
                    else f.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: tensor {name!r} is unreadable or truncated ({e})") from None
            yield name, tensor


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class LazyTensor:
    """A checkpoint tensor not read yet: its shape and dtype now, its bytes when used.

    ``narrow`` (what the parallel layers' weight loaders do to cut a rank's shard) returns
    another LazyTensor, so a rank reads only its own rows or columns from disk. Anything else
    (``.to``, ``.float()``, indexing, or passing it to a torch function) reads the (narrowed)
    tensor first, so code written for plain tensors still works, just without the saving.
    """

    def __init__(self, source: Any, what: str, index: tuple[slice, ...] | None = None) -> None:
        self._source = source  # safetensors PySafeSlice
        self._what = what
        full = source.get_shape()
        self._index = index or tuple(slice(0, n) for n in full)
        self.shape = torch.Size(s.stop - s.start for s in self._index)
        self.dtype = _ST_DTYPES.get(source.get_dtype())

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % self.dim()
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise RuntimeError(f"{self._what}: cannot take [{start}, {start + length}) of "
                               f"dimension {dim} (size {self.shape[dim]})")
        base = self._index[dim].start
        index = list(self._index)
        index[dim] = slice(base + start, base + start + length)
        return LazyTensor(self._source, self._what, tuple(index))

    def materialize(self) -> torch.Tensor:
        """Read this (narrowed) region from the file."""
        try:
            return self._source[self._index]  # () for a 0-dim tensor (a scale)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self._what} is unreadable or truncated ({e})") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private / dunder lookups (copy, pickle) never read the file
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.materialize()[key]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def real(x: Any) -> Any:
            if isinstance(x, LazyTensor):
                return x.materialize()
            if isinstance(x, (list, tuple)):
                return type(x)(real(v) for v in x)
            return x

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


def materialize(x: torch.Tensor | LazyTensor) -> torch.Tensor:
    """A plain tensor from either kind (what weight loaders call before copying)."""
    return x.materialize() if isinstance(x, LazyTensor) else x
