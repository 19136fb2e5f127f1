"""2:4 semi-structured sparsity (the seeds' survey, 002): in every group of four consecutive
input weights of a row, two are zero — the pattern Ampere and Hopper tensor cores skip, for up to
2× the dense matmul rate at half the weight bytes.

    -q sparse24                     prune a float model on load by magnitude (the baseline)
    kestrel quantize --method sparse24 [MODEL] OUT [--sparse-score wanda]
                                    prune offline by Wanda's score |W_ij|·‖X_j‖ (Sun et al., 2023),
                                    calibrated on text; a float folder whose config.json says 2:4
                                    (compressed-tensors' sparsity_config, dense format)

Every linear layer of the decoder blocks, never the embedding or the LM head. A folder that
claims 2:4 is checked on load: a group with more than two non-zeros is refused by name. The
weights stay dense with their zeros: this is the quality reference; tensor-core kernels
(``torch.sparse.to_sparse_semi_structured``) are not wired in yet.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims
from kestrel.quant.base import LayerPlace, register_quant

log = logging.getLogger(__name__)

COMPRESSED = "compressed-tensors"


def prune_2_4(w: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """w [N, K] with the two lowest-``score`` (default |w|) weights of every group of four
    consecutive inputs set to zero; K must be a multiple of 4."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs input features in multiples of 4, got {k}")
    s = (w.abs() if score is None else score).float().reshape(n, k // 4, 4)
    drop = s.argsort(dim=-1)[..., :2]  # the two smallest of each group
    mask = torch.ones_like(s, dtype=torch.bool).scatter_(-1, drop, False)
    return w * mask.reshape(n, k).to(w.dtype)


def violates_2_4(w: torch.Tensor) -> int:
    """How many groups of four inputs hold more than two non-zeros."""
    n, k = w.shape
    if k % 4:
        return n * -(-k // 4)
    return int(((w.reshape(n, k // 4, 4) != 0).sum(-1) > 2).sum())


class Sparse24LinearMethod(QuantMethod):
    """A dense ``weight`` [out, in] in the model dtype holding the 2:4 pattern. ``checked``: the
    checkpoint claims the pattern (it is verified after loading); else rows are pruned by
    magnitude as they load."""

    def __init__(self, checked: bool = False, prefix: str = "") -> None:
        self.checked = checked
        self.prefix = prefix

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        if input_size % 4:
            raise ValueError(f"{self.prefix}: 2:4 sparsity needs input features in multiples "
                             f"of 4, got {input_size}")
        weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype),
                              requires_grad=False)
        set_param_dims(weight, 0, 1)
        layer.register_parameter("weight", weight)
        layer.weight_loader = functools.partial(self._weight_loader, layer, layer.weight_loader)

    def _weight_loader(self, layer, default, param, loaded: torch.Tensor, shard_id=None) -> None:
        if param is layer.weight and not self.checked:
            loaded = prune_2_4(loaded)  # whole checkpoint rows: pruned alike on every layout
        default(param, loaded, shard_id)

    @torch.no_grad()
    def process_weights_after_loading(self, layer) -> None:
        bad = violates_2_4(layer.weight)
        if bad and self.checked:
            raise ValueError(f"{self.prefix}.weight: the checkpoint claims 2:4 sparsity but "
                             f"{bad} groups of four inputs hold more than two non-zeros")
        if bad:  # random init (dummy weights) never went through the loader
            layer.weight.copy_(prune_2_4(layer.weight))

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


@register_quant("sparse24")
def _sparse24(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if place.layer_idx is None or place.kind == "other":
        return None
    return Sparse24LinearMethod(cfg.extra.get("checkpoint_format") == COMPRESSED, place.prefix)


def quant_config_from_sparsity(config: dict[str, Any]) -> QuantConfig | None:
    """A compressed-tensors folder that is only 2:4-sparse (dense format, no quantization
    groups) → "sparse24", checked on load; None for anything else."""
    q = config.get("quantization_config") or {}
    sp = q.get("sparsity_config") or {}
    if q.get("quant_method") != COMPRESSED or not sp or q.get("config_groups"):
        return None
    if sp.get("sparsity_structure") != "2:4" or sp.get("format", "dense") != "dense":
        raise ValueError(f"compressed-tensors sparsity {sp.get('sparsity_structure')!r} in "
                         f"format {sp.get('format')!r}: only 2:4 in the dense format is supported")
    return QuantConfig(method="sparse24", extra={"checkpoint_format": COMPRESSED})


# ------------------------------------------------------------------------------ offline


@torch.no_grad()
def wanda_prune(model, windows: list[list[int]]) -> None:
    """Prune every decoder linear of ``model`` (float, CPU) to 2:4 by |W_ij|·‖X_j‖, block by
    block, each block's inputs coming through the blocks pruned before it."""
    from kestrel.quant.calibrate import DECODER_LINEARS, calibrated_blocks

    for idx, _, found in calibrated_blocks(model, windows, DECODER_LINEARS, _sum_sq):
        for lin, sq in found:
            lin.weight.copy_(prune_2_4(lin.weight, lin.weight.abs() * sq.sqrt().float()[None]))
        log.info("Wanda 2:4: layer %s of %d", idx, model.cfg.num_hidden_layers)


def _sum_sq(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Σ x_j² per input channel over inputs x [T, K]."""
    s = (x.double() ** 2).sum(0)
    return s if acc is None else acc.add_(s)


def write_sparse_folder(src_hf_folder: str | Path, out_folder: str | Path, *,
                        score: str = "wanda", windows: int = 64, window: int = 512,
                        calibration: list[list[int]] | None = None) -> Path:
    """A 2:4-sparse float copy of a float folder (``score``: wanda, calibrated on
    ``calibration`` or pydoc windows, or magnitude), its config.json saying so."""
    from kestrel.loader.hf import iterate_weights, read_config
    from kestrel.quant.calibrate import calibration_windows, hf_parts, load_float_model
    from kestrel.quant.fp8_checkpoint import LINEAR_WEIGHT, ShardWriter, copy_side_files

    src, out = Path(src_hf_folder), Path(out_folder)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: output folder must differ from the source folder")
    if score not in ("wanda", "magnitude"):
        raise ValueError(f"2:4 pruning score must be wanda or magnitude, got {score!r}")
    config = read_config(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized or sparse")
    model = load_float_model(src)
    if score == "wanda":
        wanda_prune(model, calibration or calibration_windows(src, windows, window))
    pruned: dict[str, torch.Tensor] = {}
    for idx, layer in model.layers.items():
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj"):
            lin = layer.get_submodule(name)
            w = lin.weight if score == "wanda" else prune_2_4(lin.weight)
            for part, rows in hf_parts(name, lin):
                pruned[f"model.layers.{idx}.{part}.weight"] = w[rows]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, 5 << 30)
    for name, tensor in iterate_weights(src):
        is_linear = LINEAR_WEIGHT.match(name) is not None
        writer.add(name, pruned[name].to(tensor.dtype) if is_linear else tensor)
    writer.close()
    config["quantization_config"] = {
        "quant_method": COMPRESSED, "config_groups": {},
        "sparsity_config": {"format": "dense", "sparsity_structure": "2:4",
                            "global_sparsity": 0.5, "targets": ["Linear"], "ignore": ["lm_head"],
                            "score": score}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, out)
    return out
