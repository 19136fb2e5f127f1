"""FP8 checkpoints: write Meta's ``fbgemm_fp8`` layout, and read it (and compressed-tensors FP8).

The fbgemm_fp8 format (Llama-3.1-405B-Instruct-FP8): config.json carries
    "quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                            "modules_to_not_convert": ["model.layers.0.mlp.down_proj", ...,
                                                       "lm_head"]}
and every converted linear module stores ``<module>.weight`` (float8_e4m3fn [out, in]) and
``<module>.weight_scale`` (float32 [out, 1], weight ≈ fp8 · scale row by row). Activations are
quantized at run time per token, with amax bounded by activation_scale_ub.

Loading (what the model loader does with a folder):
    quant = quant_config_from_hf(read_config(folder)) or QuantConfig(method=<CLI choice>)
    model = LlamaForCausalLM(cfg, dtype, backend_cls, quant=quant, tp=tp)
    model.load_weights(checkpoint_weights(iterate_weights(folder), quant))
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kestrel.config import ModelConfig, QuantConfig
from kestrel.loader.hf import iterate_weights, read_config, weight_files
from kestrel.quant.base import LayerPlace
from kestrel.quant.fp8 import layer_selected, quantize_weight

FBGEMM = "fbgemm_fp8"
COMPRESSED = "compressed-tensors"
# A decoder linear weight in Hugging Face naming: (module, layer index).
LINEAR_WEIGHT = re.compile(r"^(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)"
                     r"\.weight$")
# Tensors some FP8 checkpoints carry that the engine derives from config.json instead.
_DERIVED = (".input_scale_ub",)

# ----------------------------------------------------------------------------- reading


def quant_config_from_hf(config: dict[str, Any]) -> QuantConfig | None:
    """The QuantConfig a Hugging Face config.json asks for, or None when it names no FP8 scheme.

    fbgemm_fp8 → row-wise "fp8" with the file's activation_scale_ub and exclusion list.
    compressed-tensors with FP8 per-channel weights and dynamic per-token FP8 activations maps
    onto the same layout (no activation bound: that scheme has none). Any other FP8 layout of
    either format raises ValueError; non-FP8 schemes return None (another method's business).
    """
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == FBGEMM:
        ub = float(q.get("activation_scale_ub", 1200.0))
        if not (math.isfinite(ub) and ub > 0):
            raise ValueError(f"quantization_config.activation_scale_ub must be > 0, got {ub}")
        return QuantConfig(method="fp8", fp8_activation_scale_ub=ub, extra={
            "checkpoint_format": FBGEMM,
            "modules_to_not_convert": list(q.get("modules_to_not_convert") or [])})
    if method == COMPRESSED:
        return _from_compressed_tensors(q)
    return None


def _from_compressed_tensors(q: dict[str, Any]) -> QuantConfig | None:
    groups = list((q.get("config_groups") or {}).values())
    if not any(_is_fp8(g.get("weights")) for g in groups):
        return None
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors: {len(groups)} config_groups; only one FP8 group "
                         "(all Linear layers) is supported")
    g = groups[0]
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    if w.get("strategy") != "channel" or w.get("dynamic") or not w.get("symmetric", True):
        raise ValueError(f"compressed-tensors FP8 weights with strategy {w.get('strategy')!r}: "
                         "only static symmetric per-channel ('channel') weights map onto the "
                         "row-wise layout")
    if not (_is_fp8(a) and a.get("strategy") == "token" and a.get("dynamic")):
        raise ValueError("compressed-tensors FP8: only dynamic per-token FP8 input activations "
                         f"are supported, got {a or None}")
    if list(g.get("targets") or ["Linear"]) != ["Linear"]:
        raise ValueError(f"compressed-tensors FP8 targets {g.get('targets')}: only ['Linear']")
    if q.get("format") not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {q.get('format')!r} is not supported")
    return QuantConfig(method="fp8", fp8_activation_scale_ub=math.inf, extra={
        "checkpoint_format": COMPRESSED,
        "modules_to_not_convert": list(q.get("ignore") or [])})


def _is_fp8(scheme: dict[str, Any] | None) -> bool:
    return bool(scheme) and scheme.get("type") == "float" and scheme.get("num_bits") == 8


def checkpoint_weights(weights: Iterable[tuple[str, torch.Tensor]],
                       quant: QuantConfig | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a checkpoint's tensors on, dropping those an FP8 checkpoint stores but the engine
    takes from config.json (``input_scale_ub``, a copy of activation_scale_ub)."""
    serialized = quant is not None and bool(quant.extra.get("checkpoint_format"))
    for name, tensor in weights:
        if serialized and name.endswith(_DERIVED):
            continue
        yield name, tensor


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Accumulates tensors and writes safetensors shards of at most ``max_bytes`` each."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as transformers does, with an index when there are several."""
        self.flush()
        n = len(self.files)
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def quantize_folder(
    src_hf_folder: str | Path, out_folder: str | Path, *, activation_scale_ub: float = 1200.0,
    fp8_attention: bool = False, fp8_skip_layers: bool = True, device: str = "cpu",
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write an fbgemm_fp8 copy of a float Hugging Face folder, with the recipe's choices.

    Tensors stream one at a time (a 405B model needs no more memory than one shard); weights are
    quantized on ``device``. Quantization is the same function the on-the-fly path runs, so the
    folder loads to the same logits bit for bit. Non-weight files (tokenizer, ...) are copied.
    """
    src, out = Path(src_hf_folder), Path(out_folder)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: output folder must differ from the source folder")
    config = read_config(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')})")
    num_layers = ModelConfig.from_hf(config).num_hidden_layers
    recipe = QuantConfig(method="fp8", fp8_activation_scale_ub=activation_scale_ub,
                         fp8_attention=fp8_attention, fp8_skip_layers=fp8_skip_layers)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_shard_bytes)
    not_converted = {"lm_head"}
    for name, tensor in iterate_weights(src):
        m = LINEAR_WEIGHT.match(name)
        if m is None or not tensor.dtype.is_floating_point:
            writer.add(name, tensor)
            continue
        module = m.group(1)
        if not layer_selected(recipe, LayerPlace(module, int(m.group(2)), num_layers)):
            not_converted.add(module)
            writer.add(name, tensor)
            continue
        q, scale = quantize_weight(tensor.to(device), name=name)
        writer.add(name, q)
        writer.add(f"{module}.weight_scale", scale)
    writer.close()
    config["quantization_config"] = {
        "quant_method": FBGEMM, "activation_scale_ub": float(activation_scale_ub),
        "modules_to_not_convert": sorted(not_converted, key=_natural_key)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, out)
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config, README...: everything but weights, index and config."""
    skip = {p.name for p in weight_files(src)} | {"config.json", "model.safetensors.index.json"}
    for path in src.iterdir():
        if path.is_file() and path.name not in skip and path.suffix not in (".bin", ".pt"):
            shutil.copy2(path, out / path.name)
