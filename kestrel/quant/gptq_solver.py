"""GPTQ (Frantar et al., 2022; Algorithm 1 in the seeds' talk, 003): quantize a weight column
by column and push each column's rounding error onto the columns not yet quantized, weighted by
the inverse Hessian of the layer's squared output error, H = XᵀX over calibration inputs X.

    gptq_quantize(W, H) → codes, zero points, scales (GPTQ format, quant/gptq.py)
    write_gptq_folder(src, out) → a GPTQ-format folder, calibrated on text

As the paper's reference code: dampening (1% of H's mean diagonal), the Cholesky factor of
H⁻¹, lazy batches of 128 columns (in-block updates, one matrix product for the rest), each
group's grid found when its first column comes up, from the weights as updated by then. Blocks
are quantized one after another on inputs that went through the blocks already quantized; inside
a block every linear sees the float block's inputs (not the paper's "true sequential" order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kestrel.quant.calibrate import (
    DECODER_LINEARS,
    calibrated_blocks,
    calibration_windows,
    hf_parts,
    load_float_model,
)
from kestrel.quant.gptq import group_grid, to_codes, write_gptq_format

log = logging.getLogger(__name__)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int,
                  sym: bool = False, damp: float = 0.01, block: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K], H [K, K] (XᵀX of the layer's inputs) → (codes [K, N] int32, zero points
    [G, N] int32, scales [G, N] float32), the layout ``quantize_rtn`` returns."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"group size {g} does not divide the {k} input features")
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0  # inputs never active: any value is as good, zero them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64)
    zeros, scales = [], []
    scale = zero = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:  # a new group: its grid from the weights as they are now
                scale, zero = group_grid(w[:, col:col + g].float(), bits, sym)
                scale, zero = scale.double(), zero.double()
                zeros.append(zero)
                scales.append(scale)
            c = to_codes(wb[:, i:i + 1], scale, zero, bits)[:, 0]
            codes[:, col] = c
            q = (c - zero) * scale
            e = (wb[:, i] - q) / hinv[col, col]
            wb[:, i:] -= e[:, None] * hinv[col, col:b1][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
        w[:, b0:b1] = wb  # for the next groups' grids (columns of this block are final)
    return (codes.t().to(torch.int32).contiguous(), torch.stack(zeros).to(torch.int32),
            torch.stack(scales).float())


def calibrated_quantize(model, windows: list[list[int]], bits: int, group_size: int,
                        sym: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ over every decoder linear of ``model`` (a float LlamaForCausalLM on the CPU), block
    by block on the calibration ``windows`` (token ids). Returns checkpoint module name →
    (codes, zero points, scales); the model's weights end up dequantized."""
    from kestrel.quant.gptq import dequantize, pack_rows

    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for idx, _, found in calibrated_blocks(model, windows, DECODER_LINEARS, _add_xtx):
        for name, (lin, hess) in zip(DECODER_LINEARS, found):
            codes, zero, scale = gptq_quantize(lin.weight.float(), hess, bits, group_size, sym)
            lin.weight.data.copy_(dequantize(pack_rows(codes, bits), zero, scale, bits,
                                             group_size))
            for part, rows in hf_parts(name, lin):
                out[f"model.layers.{idx}.{part}"] = (codes[:, rows], zero[:, rows],
                                                     scale[:, rows])
        log.info("GPTQ: layer %s of %d", idx, model.cfg.num_hidden_layers)
    return out


def _add_xtx(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """H += XᵀX of a linear layer's inputs X [T, K]."""
    x = x.double()
    return x.t() @ x if h is None else h.add_(x.t() @ x)


def write_gptq_folder(src_hf_folder: str | Path, out_folder: str | Path, *, bits: int = 4,
                      group_size: int = 128, sym: bool = False, windows: int = 128,
                      window: int = 512, calibration: list[list[int]] | None = None) -> Path:
    """A GPTQ-format copy of a float folder, calibrated on ``windows`` windows of ``window``
    tokens from the end of the pydoc text (``calibration_windows``), or on the token windows
    ``calibration``."""
    src = Path(src_hf_folder)
    calib = calibration or calibration_windows(src, windows, window)
    model = load_float_model(src)
    found = calibrated_quantize(model, calib, bits, group_size, sym)
    return write_gptq_format(src, out_folder, bits, group_size, sym,
                             lambda module, w: found[module])
