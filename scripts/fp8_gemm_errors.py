"""How far the FP8 skinny GEMM lands from its float32 emulation on this GPU, per config: the
largest |y - ref| relative to Σ|x·w| (what tests/quant/test_fp8_gemm.py's tolerance bounds).
FMA configs sum in float32 (~1e-7 of Σ|x·w|); tensor-core configs with block_k > 32 sum
block_k products in the fp8 MMA's own narrower accumulator (~1e-4 on an H200).

    python scripts/fp8_gemm_errors.py   # one GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.fp8_gemm import fp8_gemm_small_m
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count
from kestrel.quant.fp8 import dequantize, fp8_matmul_emulated
from tests.quant.test_fp8_gemm import CONFIGS, _operands

SHAPES = [(1, 200, 80), (3, 150, 40), (4, 64, 24), (5, 100, 17), (16, 64, 64)]  # (M, K, N)


def worst(m: int, k: int, n: int, cfg, seed: int = 11) -> float:
    xq, xs, wq, ws = _operands(m, k, n, seed)
    y = fp8_gemm_small_m(xq, xs, wq, ws, torch.float32, config=cfg).cpu()
    xq, xs, wq, ws = (t.cpu() for t in (xq, xs, wq, ws))
    ref = fp8_matmul_emulated(xq, xs, wq, ws, torch.float32)
    mag = dequantize(xq, xs).abs() @ dequantize(wq, ws).abs().t()
    return float(((y - ref).abs() / mag.clamp(min=1e-30)).max())


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: max |y - ref| / Σ|x·w|")
    for cfg in CONFIGS:
        for m, k, n in SHAPES:
            if cfg is not None and not cfg.use_dot and m > 3:
                continue  # FMA programs own one row each: meant for M == 1
            c = cfg or default_config(m, n, k, sm_count("cuda", 0), gpu=gpu_model("cuda", 0))
            kind = f"dot k{c.block_k}" if c.use_dot else f"fma k{c.block_k}"
            print(f"  M{m:<3} K{k:<4} N{n:<3} {kind:<10} {worst(m, k, n, cfg):.2e}"
                  f"{'  (default)' if cfg is None else ''}")


if __name__ == "__main__":
    main()
