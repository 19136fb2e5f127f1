"""GPTQ-format checkpoints (AutoGPTQ / optimum / GPTQModel "gptq", the format most 4-bit Hugging
Face models ship in): read them, shard them under tensor parallelism, and write them.

Per quantized linear module (weights W [N, K], groups of ``group_size`` input features):
    qweight  int32 [K · bits / 32, N]   codes along K, a little-endian bit stream per column
    qzeros   int32 [K / g, N · bits / 32] zero points along N, stored minus one (format v1)
    scales   fp16  [K / g, N]
    g_idx    int32 [K]                   group of each input feature (k // g without act-order)
    W[n, k] = scales[g, n] · (q[k, n] − (stored_zero[g, n] + 1)),  g = g_idx[k]
config.json: "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
"desc_act": false, "sym": ...}. Bits 2, 3, 4 and 8 (3-bit codes cross word boundaries, as
AutoGPTQ packs them); group_size −1 is one group over all of K. Act-order checkpoints
(desc_act, a permuted g_idx) are refused.

Sharding: qweight and scales keep N unpacked (column-parallel cuts, fused q|k|v and gate|up
offsets work as for float weights) and K packed or grouped (row-parallel cuts whole words and
whole groups: K / tp must be a multiple of 32 / bits and of the group size); qzeros are
unpacked on load into an int [K / g, N] zero-point parameter, cut the same way. The forward
dequantizes this rank's weight and multiplies in the activation dtype: the reference path, not
a fast kernel. ``write_rtn_folder`` quantizes a float folder by round-to-nearest into this
format (the baseline GPTQ is measured against; the GPTQ solver itself is not here yet).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.config import QuantConfig
from kestrel.layers.linear import QuantMethod, set_param_dims
from kestrel.loader.hf import iterate_weights, materialize, read_config
from kestrel.quant.base import LayerPlace, register_quant

GPTQ = "gptq"
BITS = (2, 3, 4, 8)


# ----------------------------------------------------------------------------- packing


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [R, C] in [0, 2^bits) → int32 [R · bits / 32, C]: each column a little-endian bit
    stream (code r at bit r · bits), 32 bits a row."""
    r, c = codes.shape
    if (r * bits) % 32:
        raise ValueError(f"{r} rows of {bits}-bit codes do not fill 32-bit words")
    v = codes.to(torch.int64)
    i = torch.arange(r, device=codes.device)
    word, off = (i * bits) // 32, (i * bits) % 32
    out = torch.zeros(r * bits // 32, c, dtype=torch.int64, device=codes.device)
    # codes of one word do not overlap, so adding them is or-ing them
    out.index_add_(0, word, (v << off[:, None]) & 0xFFFFFFFF)
    spill = off + bits > 32  # the code's high bits start the next word
    out.index_add_(0, word[spill] + 1, v[spill] >> (32 - off[spill])[:, None])
    return (out - ((out >> 31) << 32)).to(torch.int32)  # as signed 32-bit words


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The inverse of ``pack_rows``: int32 [rows · bits / 32, C] → int32 codes [rows, C]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(rows, device=packed.device)
    word, off = (k * bits) // 32, (k * bits) % 32
    lo = words[word] >> off[:, None]
    nxt = words[torch.clamp(word + 1, max=words.shape[0] - 1)]
    hi = torch.where((off + bits > 32)[:, None], nxt << (32 - off)[:, None], 0)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.int32)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """float32 W [N, K] from this layer's (packed codes, zero points [G, N], scales [G, N])."""
    k = qweight.shape[0] * 32 // bits
    codes = unpack_rows(qweight, bits, k)  # [K, N]
    g = torch.arange(k, device=codes.device) // (k if group_size == -1 else group_size)
    return ((codes - zeros[g]).float() * scales[g].float()).t()


# ----------------------------------------------------------------------------- the method


class GptqLinearMethod(QuantMethod):
    """Packed ``qweight``, ``scales``, zero points (``qzeros`` unpacked on load) and ``g_idx``
    (checked to be the plain k // g) of a GPTQ-format checkpoint."""

    def __init__(self, bits: int, group_size: int, prefix: str = "") -> None:
        if bits not in BITS:
            raise ValueError(f"GPTQ bits must be one of {BITS}, got {bits}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"GPTQ group_size must be -1 or >= 1, got {group_size}")
        self.bits, self.group_size, self.prefix = bits, group_size, prefix

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        bits, g = self.bits, self.group_size
        if (input_size * bits) % 32 or (g != -1 and input_size % g):
            raise ValueError(f"{self.prefix}: {input_size} input features per rank do not hold "
                             f"whole 32-bit words of {bits}-bit codes and whole groups of {g}")
        groups = 1 if g == -1 else input_size // g
        grouped_dim = None if g == -1 else 0  # one group over K: every rank has all of it

        def param(name, shape, dt, output_dim, input_dim):
            p = nn.Parameter(torch.zeros(shape, dtype=dt), requires_grad=False)
            set_param_dims(p, output_dim, input_dim)
            layer.register_parameter(name, p)

        param("qweight", (input_size * bits // 32, output_size), torch.int32, 1, 0)
        # named as the checkpoint's packed qzeros; holds the unpacked zero points
        param("qzeros", (groups, output_size), torch.int32, 1, grouped_dim)
        param("scales", (groups, output_size), torch.float32, 1, grouped_dim)
        param("g_idx", (input_size,), torch.int32, None, 0)
        layer.gptq_loaded = set()
        layer.weight_loader = functools.partial(self._weight_loader, layer, layer.weight_loader)

    def _weight_loader(self, layer, default, param, loaded: torch.Tensor, shard_id=None) -> None:
        if param is layer.qzeros:  # arrives packed along N, stored minus one; the default
            n = loaded.shape[1] * 32 // self.bits  # loader checks the unpacked shape
            loaded = unpack_rows(materialize(loaded).t().contiguous(), self.bits, n).t() + 1
        default(param, loaded, shard_id)
        layer.gptq_loaded.add(next(n for n, p in layer.named_parameters(recurse=False)
                                   if p is param))

    def process_weights_after_loading(self, layer) -> None:
        if not layer.gptq_loaded:  # random init (dummy weights): codes and scales of N(0, σ)
            gen = torch.Generator().manual_seed(0)
            codes = torch.randint(0, 1 << self.bits, (layer.g_idx.numel(),
                                                      layer.qweight.shape[1]), generator=gen)
            layer.qweight.data.copy_(pack_rows(codes, self.bits))
            layer.qzeros.data.fill_(1 << (self.bits - 1))
            layer.scales.data.fill_(0.02 / (1 << (self.bits - 1)))
            return
        missing = {"qweight", "qzeros", "scales", "g_idx"} - layer.gptq_loaded
        if missing:
            raise ValueError(f"{self.prefix}: the GPTQ checkpoint has no "
                             f"{', '.join(sorted(missing))}")
        k = layer.g_idx.numel()
        if self.group_size != -1:
            g = layer.g_idx.long().cpu()
            if not torch.equal(g - g[0], torch.arange(k) // self.group_size):
                raise ValueError(f"{self.prefix}.g_idx: act-order (desc_act) GPTQ checkpoints "
                                 "are not supported; g_idx must be k // group_size")
        if not bool(torch.isfinite(layer.scales).all()):
            raise ValueError(f"{self.prefix}.scales: non-finite values")

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize(layer.qweight, layer.qzeros, layer.scales, self.bits, self.group_size)
        return F.linear(x, w.to(x.dtype), bias)


@register_quant(GPTQ)
def _gptq(cfg: QuantConfig, place: LayerPlace) -> QuantMethod | None:
    if place.layer_idx is None or place.kind == "other":
        return None
    return GptqLinearMethod(int(cfg.extra.get("bits", 4)), int(cfg.extra.get("group_size", 128)),
                            place.prefix)


def quant_config_from_gptq(q: dict[str, Any]) -> QuantConfig:
    """config.json's quantization_config of a GPTQ checkpoint → QuantConfig (ValueError for
    what the reader does not support)."""
    bits, group = int(q.get("bits", 4)), int(q.get("group_size", 128))
    if q.get("desc_act"):
        raise ValueError("GPTQ: act-order (desc_act: true) checkpoints are not supported")
    if q.get("checkpoint_format", GPTQ) != GPTQ:
        raise ValueError(f"GPTQ: checkpoint_format {q.get('checkpoint_format')!r} is not "
                         "supported (only 'gptq', zero points stored minus one)")
    if bits not in BITS:
        raise ValueError(f"GPTQ: {bits} bits not supported ({BITS})")
    return QuantConfig(method=GPTQ, extra={"bits": bits, "group_size": group,
                                           "checkpoint_format": GPTQ})


# ----------------------------------------------------------------------------- writing


def group_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization grid of one group, w [N, g] → (scale [N] float32, rounded to fp16 as
    the checkpoint stores it; zero point [N]): min/max (asymmetric, zero ≥ 1: the format stores
    zero − 1 in ``bits`` bits, 0 would wrap) or absmax with the zero at 2^(b−1) (symmetric),
    as GPTQ's quantizer."""
    top = (1 << bits) - 1
    if sym:
        scale = (w.abs().amax(dim=1) * 2 / top).clamp_min(1e-10)
        zero = torch.full_like(scale, (top + 1) // 2)
    else:
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((hi - lo) / top).clamp_min(1e-10)
        zero = torch.round(-lo / scale).clamp(1, top)
    return scale.half().float(), zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
             ) -> torch.Tensor:
    """w [N, c] on the grid (scale, zero [N]) → codes [N, c] in [0, 2^bits)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of W [N, K] per group of input features → (codes [K, N], zero points
    [G, N], scales [G, N]) on ``group_grid``."""
    k = w.shape[1]
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"group size {g} does not divide the {k} input features")
    wf = w.float()
    codes, zeros, scales = [], [], []
    for c in range(0, k, g):
        scale, zero = group_grid(wf[:, c:c + g], bits, sym)
        codes.append(to_codes(wf[:, c:c + g], scale, zero, bits))
        zeros.append(zero)
        scales.append(scale)
    return (torch.cat(codes, 1).t().to(torch.int32).contiguous(),
            torch.stack(zeros).to(torch.int32), torch.stack(scales))


def write_rtn_folder(src_hf_folder: str | Path, out_folder: str | Path, *, bits: int = 4,
                     group_size: int = 128, sym: bool = False) -> Path:
    """A GPTQ-format copy of a float Hugging Face folder, every decoder linear quantized by
    round-to-nearest (``quantize_rtn``); the rest is copied."""
    return write_gptq_format(src_hf_folder, out_folder, bits, group_size, sym,
                             lambda module, w: quantize_rtn(w, bits, group_size, sym))


def write_gptq_format(src_hf_folder: str | Path, out_folder: str | Path, bits: int,
                      group_size: int, sym: bool, quantize) -> Path:
    """Copy a float folder, every decoder linear weight replaced by
    ``quantize(module_name, weight)`` → (codes [K, N], zero points [G, N], scales [G, N])."""
    from kestrel.quant.fp8_checkpoint import LINEAR_WEIGHT, ShardWriter, copy_side_files

    src, out = Path(src_hf_folder), Path(out_folder)
    config = read_config(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, 5 << 30)
    for name, tensor in iterate_weights(src):
        m = LINEAR_WEIGHT.match(name)
        if m is None:
            writer.add(name, tensor)
            continue
        module, k = m.group(1), tensor.shape[1]
        codes, zero, scale = quantize(module, tensor)
        writer.add(f"{module}.qweight", pack_rows(codes, bits))
        writer.add(f"{module}.qzeros", pack_rows((zero - 1).t().contiguous() & ((1 << bits) - 1),
                                                 bits).t().contiguous())
        writer.add(f"{module}.scales", scale.half())
        writer.add(f"{module}.g_idx", (torch.arange(k) // (k if group_size == -1
                                                           else group_size)).to(torch.int32))
    writer.close()
    config["quantization_config"] = {"quant_method": GPTQ, "bits": bits,
                                     "group_size": group_size, "desc_act": False, "sym": sym,
                                     "checkpoint_format": GPTQ}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_side_files(src, out)
    return out
