"""The FP8 MLP of a decode step (llama-3-8b, one row) two ways, kernel by kernel and chained:
unfused (norm → gate_up → SwiGLU + quantize, two launches → down) and with SwiGLU folded into
gate_up's epilogue and the quantization into down's loads (``fp8_fused._fp8_swiglu_skinny``).
µs in CUDA graphs over weight copies that defeat L2 (tests/quant/skinny_timing.py), so the
chains show what the launches between the GEMVs cost. ``--grid`` also times
``fp8_gemm_dynamic_x`` with the FMA tile grid, to tune down's config for 16-bit x.

    python scripts/time_fp8_mlp.py [--rep 50] [--grid]   # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.fp8_gemm import fp8_gate_up_silu_mul, fp8_gemm_dynamic_x, fp8_gemm_small_m
from kestrel.kernels.fp8_quant import rms_norm_quant_fp8, silu_and_mul_quant_fp8
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count
from tests.quant.skinny_timing import (
    FMA_TILES,
    copy_bandwidth,
    describe,
    tile_configs,
    time_us,
    weights,
)

H, FFN, UB = 4096, 14336, 1200.0  # llama-3-8b; the recipe's activation scale bound


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--grid", action="store_true")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}  copy {copy_bandwidth():.0f} GB/s")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gu, dn = weights(2 * FFN, H, l2, False), weights(H, FFN, l2, False)
    copies = min(len(gu["wq"]), len(dn["wq"]))
    x, res = torch.randn(2, 1, H, device="cuda", dtype=torch.bfloat16)
    norm_w = torch.rand(H, device="cuda", dtype=torch.bfloat16)
    q, s, _ = rms_norm_quant_fp8(x, norm_w, 1e-5, res, UB)
    h = fp8_gemm_small_m(q, s, gu["wq"][0], gu["ws"], torch.bfloat16)
    act_q, act_s = silu_and_mul_quant_fp8(h, UB)
    amax = torch.zeros(1, device="cuda")
    act = fp8_gate_up_silu_mul(q, s, gu["wq"][0], gu["ws"], amax)
    want = fp8_gemm_small_m(act_q, act_s, dn["wq"][0], dn["ws"], torch.bfloat16)
    assert torch.equal(fp8_gemm_dynamic_x(act, amax, UB, dn["wq"][0], dn["ws"]), want)

    def unfused(i: int) -> torch.Tensor:
        q, s, _ = rms_norm_quant_fp8(x, norm_w, 1e-5, res, UB)
        h = fp8_gemm_small_m(q, s, gu["wq"][i], gu["ws"], torch.bfloat16)
        return fp8_gemm_small_m(*silu_and_mul_quant_fp8(h, UB), dn["wq"][i], dn["ws"],
                                torch.bfloat16)

    def folded(i: int) -> torch.Tensor:
        q, s, _ = rms_norm_quant_fp8(x, norm_w, 1e-5, res, UB, amax)
        a = fp8_gate_up_silu_mul(q, s, gu["wq"][i], gu["ws"], amax)
        return fp8_gemm_dynamic_x(a, amax, UB, dn["wq"][i], dn["ws"])

    cases = {
        "norm → fp8 (plain)": lambda i: rms_norm_quant_fp8(x, norm_w, 1e-5, res, UB),
        "norm → fp8 + amax reset": lambda i: rms_norm_quant_fp8(x, norm_w, 1e-5, res, UB, amax),
        "gate_up": lambda i: fp8_gemm_small_m(q, s, gu["wq"][i], gu["ws"], torch.bfloat16),
        "gate_up + SwiGLU + amax": lambda i: fp8_gate_up_silu_mul(q, s, gu["wq"][i], gu["ws"],
                                                                  amax),
        "SwiGLU + quantize (2 launches)": lambda i: silu_and_mul_quant_fp8(h, UB),
        "down (fp8 x)": lambda i: fp8_gemm_small_m(act_q, act_s, dn["wq"][i], dn["ws"],
                                                   torch.bfloat16),
        "down (bf16 x, quantized as loaded)": lambda i: fp8_gemm_dynamic_x(
            act, amax, UB, dn["wq"][i], dn["ws"]),
        "MLP unfused (5 launches)": unfused,
        "MLP folded (3 launches)": folded,
    }
    for name, fn in cases.items():
        print(f"  {name:40} {time_us(fn, copies, args.rep):7.2f} us")
    if args.grid:
        cfg = default_config(1, H, FFN, sm_count("cuda", 0), gpu=gpu_model("cuda", 0))
        print(f"down, bf16 x quantized as loaded; default {describe(cfg)}")
        grid = tile_configs(1, H, FFN, sm_count("cuda", 0), dot_tiles=[], fma_tiles=FMA_TILES)
        grid = [cfg] + grid + [dataclasses.replace(c, ahead=2) for c in grid]
        for c in grid:
            try:
                ok = torch.equal(fp8_gemm_dynamic_x(act, amax, UB, dn["wq"][0], dn["ws"], c),
                                 fp8_gemm_small_m(act_q, act_s, dn["wq"][0], dn["ws"],
                                                  torch.bfloat16, config=c))
                us = time_us(lambda i, c=c: fp8_gemm_dynamic_x(act, amax, UB, dn["wq"][i],
                                                               dn["ws"], c), copies, args.rep)
            except Exception as e:  # noqa: BLE001 - Triton compile errors have many types
                print(f"  {describe(c):36} failed: {type(e).__name__}")
                continue
            print(f"  {describe(c):36} {us:7.2f} us{'' if ok else '  WRONG BITS'}")


if __name__ == "__main__":
    main()
