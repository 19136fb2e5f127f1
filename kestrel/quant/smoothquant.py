"""SmoothQuant (Xiao et al., 2023; the seeds' talk, 003): make activations easy to quantize to
int8 by moving their outlier channels' range into the weights, an exact rewrite of the float
model done offline.

    Y = (X diag(s)⁻¹) (diag(s) Wᵀ),   s_j = max|X_j|^α / max|W_j|^(1−α)

X's channel maxima come from calibration text, W's from the weights; α (the migration strength,
0.5 by default as in the paper) splits the difficulty between them. On a Llama block the inputs
of the attention projections and of gate/up come out of an RMSNorm, so diag(s)⁻¹ folds into that
norm's weight and nothing is added at run time; o_proj and down_proj keep their inputs as they
are. The result is written as a compressed-tensors W8A8 folder (quant/w8a8.py runs it):

    kestrel quantize --method smoothquant [MODEL] OUT [--alpha 0.5]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kestrel.loader.hf import iterate_weights, read_config
from kestrel.quant.calibrate import (
    calibrated_blocks,
    calibration_windows,
    hf_parts,
    load_float_model,
)
from kestrel.quant.fp8_checkpoint import LINEAR_WEIGHT, ShardWriter, copy_side_files
from kestrel.quant.w8a8 import COMPRESSED, quantize_rows_int8

log = logging.getLogger(__name__)

# (norm, the projection it feeds) per decoder block
SMOOTHED = (("input_layernorm", "self_attn.qkv_proj"),
            ("post_attention_layernorm", "mlp.gate_up_proj"))


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float
                      ) -> torch.Tensor:
    """s [K] from the input channels' calibration maxima [K] and the weight [N, K]."""
    w_amax = weight.abs().amax(dim=0).float().clamp_min(1e-5)
    return (act_amax.float().clamp_min(1e-5) ** alpha / w_amax ** (1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def smooth_model(model, windows: list[list[int]], alpha: float) -> None:
    """Smooth every block of ``model`` (a float LlamaForCausalLM on the CPU) in place: the
    model computes the same function, with flatter inputs to qkv_proj and gate_up_proj."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha (migration strength) must be in [0, 1], got {alpha}")
    projs = tuple(proj for _, proj in SMOOTHED)
    for idx, layer, found in calibrated_blocks(model, windows, projs, _amax):
        for (norm, _), (lin, amax) in zip(SMOOTHED, found):
            s = smoothing_factors(amax, lin.weight, alpha)
            getattr(layer, norm).weight.div_(s)
            lin.weight.mul_(s)
        log.info("SmoothQuant: layer %s of %d", idx, model.cfg.num_hidden_layers)


def _amax(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The running per-channel max of |x| over inputs x [T, K]."""
    m = x.abs().amax(dim=0).float()
    return m if acc is None else torch.maximum(acc, m, out=acc)


def write_smoothquant_folder(src_hf_folder: str | Path, out_folder: str | Path, *,
                             alpha: float = 0.5, windows: int = 64, window: int = 512,
                             calibration: list[list[int]] | None = None) -> Path:
    """A compressed-tensors W8A8 copy of a float folder: smoothed on ``calibration`` (default:
    ``windows`` × ``window`` tokens from the end of the pydoc text), then every decoder linear
    in int8 with one scale per output row; the rest copied as it is."""
    src, out = Path(src_hf_folder), Path(out_folder)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: output folder must differ from the source folder")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha (migration strength) must be in [0, 1], got {alpha}")
    config = read_config(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized")
    model = load_float_model(src)
    smooth_model(model, calibration or calibration_windows(src, windows, window), alpha)
    replaced = _smoothed_tensors(model)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, 5 << 30)
    for name, tensor in iterate_weights(src):
        if name in replaced:  # a norm keeps the checkpoint's dtype; int8 codes stay int8
            t = replaced.pop(name)
            writer.add(name, t.to(tensor.dtype) if t.is_floating_point() else t)
        elif LINEAR_WEIGHT.match(name) is None:
            writer.add(name, tensor)
    for name, tensor in replaced.items():  # int8 codes and scales of every decoder linear
        writer.add(name, tensor)
    writer.close()
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    config["quantization_config"] = {
        "quant_method": COMPRESSED, "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**int8, "strategy": "channel", "dynamic": False},
            "input_activations": {**int8, "strategy": "token", "dynamic": True}}},
        "smoothquant_alpha": alpha}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, out)
    return out


def _smoothed_tensors(model) -> dict[str, torch.Tensor]:
    """Checkpoint name → tensor: the smoothed norms (float) and every decoder linear's int8
    codes and row scales, in Hugging Face naming."""
    out: dict[str, torch.Tensor] = {}
    for idx, layer in model.layers.items():
        base = f"model.layers.{idx}"
        for norm, _ in SMOOTHED:
            out[f"{base}.{norm}.weight"] = getattr(layer, norm).weight.detach().clone()
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj"):
            lin = layer.get_submodule(name)
            q, s = quantize_rows_int8(lin.weight)
            for part, rows in hf_parts(name, lin):
                out[f"{base}.{part}.weight"] = q[rows].contiguous()
                out[f"{base}.{part}.weight_scale"] = s[rows].contiguous()
    return out
