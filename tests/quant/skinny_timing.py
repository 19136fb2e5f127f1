"""What the skinny-GEMM benchmarks share (bench_fp8_gemm.py, skinny_sweep.py): weight copies
that defeat L2, CUDA-graph timing, a correctness check before every timing, the tile grid.

Timing: in a CUDA graph (as the engine runs decode) with triton.testing.do_bench_cudagraph; each
timed call runs the GEMM over several weight copies (≥ 4× L2 in all), as 32 layers would, so no
weight is served from L2. GB/s = weight bytes / time, against a device-to-device copy on the same
card. Every config's output is checked against the float32 reference before it is timed; a
config that is wrong or does not compile is skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from kestrel.kernels.fp8_gemm import bf16_gemm_small_m, fp8_gemm_small_m
from kestrel.kernels.int8_w8a8 import int8_gemm_small_m
from kestrel.kernels.skinny_config import SkinnyConfig, split_to_fill
from kestrel.quant.fp8_ops import fp8_matmul_emulated, quantize_rowwise_ref
from kestrel.quant.w8a8 import quantize_rows_int8

DEVICE = "cuda"  # a CPU dry run of the code paths may set "cpu" (TRITON_INTERPRET=1)
SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}  # Llama 3 8B, name → (N, K)
# (block_n, block_k, num_warps). FMA: 16 to 128 float32 accumulators per thread; x rows of
# 512·num_warps give x the weight tile's layout, shorter ones are tried with broadcast_x too.
FMA_TILES = [(2, 4096, 8), (4, 2048, 4), (8, 2048, 4), (4, 1024, 2), (8, 1024, 2),
             (8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 4), (32, 256, 4), (32, 512, 8)]
# Tensor-core dot: 64 rows fill a wgmma; the weight tile of 3 stages stays in shared memory.
DOT_TILES = [(32, 256, 4), (32, 512, 4), (64, 128, 4), (64, 256, 4), (64, 512, 4),
             (128, 128, 4), (128, 256, 4), (128, 256, 8)]

def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def tile_configs(m: int, n: int, k: int, sms: int, dot_tiles: list = DOT_TILES,
                 fma_tiles: list = FMA_TILES, elem_bytes: int = 1,
                 bx_only: bool = False) -> list[SkinnyConfig]:
    """The tile grid, each with the default's split-K rule (FMA: one x row, so M == 1 only).
    An FMA x row shorter than a 16-byte vector per thread is tried with broadcast_x too
    (``bx_only``: instead)."""
    out = [SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 2 * sms), True, w)
           for bn, bk, w in dot_tiles]
    for bn, bk, w in fma_tiles if m == 1 else []:
        cfg = SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 4 * sms), False, w)
        bx = [dataclasses.replace(cfg, broadcast_x=True)] if bk * elem_bytes < 512 * w else []
        out += bx if bx and bx_only else [cfg] + bx
    return out


def describe(c: SkinnyConfig) -> str:
    kind = "dot" if c.use_dot else "fma"
    return (f"{kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"
            + (" ef" if c.evict_first else "") + (" bx" if c.broadcast_x else "")
            + (f" a{c.ahead}" if c.ahead > 1 else ""))


def time_us(fn: Callable[[int], torch.Tensor], copies: int, rep: int) -> float:
    """µs per GEMM: one timed call runs it on every weight copy, replayed in a CUDA graph."""
    def all_copies() -> None:
        for i in range(copies):
            fn(i)

    all_copies()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(all_copies, rep=rep, return_mode="median") * 1e3 \
        / copies


def correct(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.isfinite(y).all()) and float((y.float() - ref).abs().max()) <= \
        1e-2 * float(ref.abs().max())


def weights(n: int, k: int, l2_bytes: int, with_bf16: bool, with_fp8: bool = True,
            with_int8: bool = False) -> dict:
    """Weight copies, fp8 (and bf16, int8), each set ≥ 4× L2 (as 32 layers would stream them)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = 0.02 * torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    n_fp8, n_bf16 = (max(2, triton.cdiv(4 * l2_bytes, n * k * b)) for b in (1, 2))
    op = {"wb": [w] + [w.clone() for _ in range(n_bf16 - 1)] if with_bf16 else []}
    if with_fp8:
        wq, ws = quantize_rowwise_ref(w)
        op.update(ws=ws, wq=[wq] + [wq.clone() for _ in range(n_fp8 - 1)])
    if with_int8:  # one byte a weight, as fp8: as many copies
        wi, wis = quantize_rows_int8(w)
        op.update(wis=wis, wi=[wi] + [wi.clone() for _ in range(n_fp8 - 1)])
    return op


def with_activation(op: dict, m: int) -> dict:
    """``op`` plus x [M, K] bf16, its quantization, the float32 reference output and the fp8
    skinny GEMM on weight copy i as ``skinny(i, config)``."""
    x = torch.randn(m, op["wq"][0].shape[1], device=DEVICE, dtype=torch.bfloat16)
    xq, xs = quantize_rowwise_ref(x)
    ref = fp8_matmul_emulated(xq, xs, op["wq"][0], op["ws"], torch.float32)

    def skinny(i: int, cfg: SkinnyConfig) -> torch.Tensor:
        return fp8_gemm_small_m(xq, xs, op["wq"][i], op["ws"], torch.bfloat16, config=cfg)
    return {**op, "x": x, "xq": xq, "xs": xs, "ref": ref, "skinny": skinny,
            "copies": len(op["wq"])}


def with_activation_int8(op: dict, m: int) -> dict:
    """``op`` (int8 weights) plus x [M, K]'s int8 codes, the float32 reference output and
    ``skinny(i, config)``: W8A8's skinny GEMM (int8_gemm_small_m) on weight copy i."""
    x = torch.randn(m, op["wi"][0].shape[1], device=DEVICE, dtype=torch.bfloat16)
    xq, xs = quantize_rows_int8(x)
    ref = (xq.float() @ op["wi"][0].float().T) * xs * op["wis"].T

    def skinny(i: int, cfg: SkinnyConfig) -> torch.Tensor:
        return int8_gemm_small_m(xq, xs, op["wi"][i], op["wis"], torch.bfloat16, config=cfg)
    return {**op, "x": x, "ref": ref, "skinny": skinny, "copies": len(op["wi"])}


def with_activation_bf16(op: dict, m: int) -> dict:
    """``op`` (bf16 weights) plus x [M, K] bf16, the float32 reference output and
    ``skinny(i, config)``: bf16_gemm_small_m on weight copy i."""
    x = torch.randn(m, op["wb"][0].shape[1], device=DEVICE, dtype=torch.bfloat16)
    ref = x.float() @ op["wb"][0].float().T

    def skinny(i: int, cfg: SkinnyConfig) -> torch.Tensor:
        return bf16_gemm_small_m(x, op["wb"][i], config=cfg)
    return {**op, "x": x, "ref": ref, "skinny": skinny, "copies": len(op["wb"])}


def with_lead(op: dict) -> dict:
    """``op`` whose timed GEMMs each follow a small kernel, as in a decode step, where a GEMV
    comes after a norm or attention (launched with PDL, kernels.pdl) rather than after another
    GEMV: the fused residual-add RMSNorm of the GEMV's K on one row. ``time_config`` then times
    the pair; ``lead_us`` is the norm's own time in the same harness."""
    from kestrel.kernels.fused import rms_norm

    k = op["x"].shape[1]
    x, res, out, res_out = (torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
                            for _ in range(4))
    w = torch.rand(k, device=DEVICE, dtype=torch.bfloat16)

    def lead() -> None:
        rms_norm(x, w, 1e-5, res, out=out, residual_out=res_out)
    return {**op, "lead": lead}


def lead_us(op: dict, rep: int) -> float:
    """µs of ``with_lead``'s norm alone, replayed as time_config replays a pair."""
    return time_us(lambda i: op["lead"](), op["copies"], rep)


def time_config(op: dict, cfg: SkinnyConfig, rep: int) -> float | None:
    """µs of the skinny GEMM with ``cfg`` on op's operands (after op's lead kernel, if it has
    one: ``with_lead``); None if it fails or is wrong."""
    def skinny(i: int) -> torch.Tensor:
        if "lead" in op:
            op["lead"]()
        return op["skinny"](i, cfg)
    try:
        if not correct(skinny(0), op["ref"]):
            print(f"    {describe(cfg):<32} WRONG, skipped")
            return None
        return time_us(skinny, op["copies"], rep)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
        print(f"    {describe(cfg):<32} fails: {e!r:.70}")
        return None


def time_scaled_mm(op: dict, rep: int) -> tuple[float, bool] | None:
    """(µs, correct) of torch._scaled_mm on op's operands; None where it does not run."""
    xq, xs, ws = op["xq"], op["xs"], op["ws"]

    def smm(i: int) -> torch.Tensor:
        return torch._scaled_mm(xq, op["wq"][i].t(), scale_a=xs, scale_b=ws.view(1, -1),
                                out_dtype=torch.bfloat16)
    try:
        return time_us(smm, len(op["wq"]), rep), correct(smm(0), op["ref"])
    except RuntimeError as e:
        print(f"    _scaled_mm fails: {str(e).splitlines()[0][:60]}")
        return None


def time_linear(op: dict, rep: int) -> tuple[float, bool]:
    """(µs, correct) of F.linear (cuBLAS) on op's bf16 x and weight copies."""
    def linear(i: int) -> torch.Tensor:
        return F.linear(op["x"], op["wb"][i])
    return time_us(linear, len(op["wb"]), rep), correct(linear(0), op["ref"])
