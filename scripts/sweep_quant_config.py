"""Launch sweep of the prefill FP8 activation-quant kernels (one program per token row): the
SwiGLU + quant kernel took 150 µs per llama-3-8b layer at 4,096 tokens on an H200 (2 TB/s),
the BF16 SwiGLU alone 82 µs (tenth session: 92.5 µs). Times each (row block, warps) against the
BF16 SwiGLU; codes are compared with the torch reference (largest difference in e4m3 steps: the
GPU's exp is approximate, so 1 is expected).

    python scripts/sweep_quant_config.py [--blocks 16384 8192] [--warps 8 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels import fp8_quant
from kestrel.kernels.fused import silu_and_mul
from kestrel.quant.fp8_ops import silu_and_mul_quant_ref

T, I, H = 4096, 14336, 4096  # llama-3-8b prefill of 4k tokens


def code_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference of two e4m3 tensors in steps of the e4m3 grid."""
    def ordinal(q: torch.Tensor) -> torch.Tensor:
        u = q.view(torch.uint8).to(torch.int32)
        return torch.where(u >= 128, -(u & 0x7F), u & 0x7F)
    return int((ordinal(a) - ordinal(b)).abs().max())


def tbps(nbytes: float, ms: float) -> str:
    return f"{nbytes / ms / 1e9:5.2f} TB/s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[16384, 8192, 4096, 2048, 1024])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    x = torch.randn(T, 2 * I, dtype=torch.bfloat16, device="cuda")
    bytes_silu_q = x.numel() * 2 + T * I  # read gate | up, write fp8
    ms = triton.testing.do_bench(lambda: silu_and_mul(x))
    print(f"{torch.cuda.get_device_name()}  bf16 silu_and_mul {ms * 1e3:7.1f} µs "
          f"{tbps(x.numel() * 2 + T * I * 2, ms)}")
    ref = silu_and_mul_quant_ref(x, 1200.0)
    real_warps = fp8_quant._warps
    for block in args.blocks:
        for warps in args.warps:
            fp8_quant._warps = lambda _b, w=warps: w
            try:
                got = fp8_quant.silu_and_mul_quant_fp8(x, 1200.0, max_one_pass=block)
                steps = code_steps(got[0], ref[0])
                ms = triton.testing.do_bench(
                    lambda b=block: fp8_quant.silu_and_mul_quant_fp8(x, 1200.0, max_one_pass=b))
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                print(f"  block {block:5} warps {warps:2}: failed {str(e)[:60]}")
                continue
            finally:
                fp8_quant._warps = real_warps
            print(f"  silu+quant block {block:5} warps {warps:2}: {ms * 1e3:7.1f} µs "
                  f"{tbps(bytes_silu_q, ms)}, codes within {steps} step(s) of the reference")
    # the rms-norm + quant kernel (attention input under --fp8-attention, FFN input)
    h = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    r = torch.randn_like(h)
    w = torch.randn(H, dtype=torch.bfloat16, device="cuda")
    for warps in args.warps:
        fp8_quant._warps = lambda _b, w=warps: w
        ms = triton.testing.do_bench(lambda: fp8_quant.rms_norm_quant_fp8(h, w, 1e-5, r, 1200.0))
        fp8_quant._warps = real_warps
        print(f"  rms_norm+quant warps {warps:2}: {ms * 1e3:7.1f} µs "
              f"{tbps(h.numel() * 2 * 3 + h.numel(), ms)}")


if __name__ == "__main__":
    main()
