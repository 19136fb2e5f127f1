"""Variants of the non-GEMM parts of a long prefill, timed on one GPU (µs, median of CUDA-event
timings): how the SDPA path feeds grouped KV heads to cuDNN, and how the fused SiLU-multiply +
FP8 quantization tiles a row. Picks the defaults in kestrel.attention.triton_backend and
kestrel.kernels.fp8_quant; prints one line per variant with its effective bandwidth.

    python scripts/bench_prefill_parts.py [--tokens 4096] [--heads 32 8] [--inter 14336]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels import fp8_quant
from kestrel.kernels.fused import silu_and_mul

BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def timed(fn, reps: int = 20) -> float:
    """Median µs of ``fn`` over ``reps`` runs after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def bench_sdpa(t: int, hq: int, hk: int, d: int) -> None:
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.split([hq, hk, hk], dim=1)  # strided views, as the model's fused QKV output
    g = hq // hk
    flops = 2 * hq * d * t * (t + 1)

    def repeat_copy_out():  # today's path
        out = torch.empty_like(q)
        ki = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vi = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ki, vi, is_causal=True)
        out[:] = o[0].transpose(0, 1)
        return out

    def repeat_no_copy():
        ki = k.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vi = v.repeat_interleave(g, dim=1).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ki, vi, is_causal=True)
        return o[0].transpose(0, 1).contiguous()

    def gqa():
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], is_causal=True,
                                           enable_gqa=True)
        return o[0].transpose(0, 1).contiguous()

    ref = repeat_copy_out().float()
    with sdpa_kernel(BACKENDS, set_priority=True):
        for name, fn in (("repeat + copy out", repeat_copy_out),
                         ("repeat, no copy", repeat_no_copy), ("enable_gqa", gqa)):
            try:
                err = (fn().float() - ref).abs().max().item()
                us = timed(fn)
            except RuntimeError as e:
                print(f"sdpa t={t} {name:20} failed: {str(e)[:80]}")
                continue
            print(f"sdpa t={t} {name:20} {us:9.1f} µs  {flops / us / 1e6:7.1f} TFLOP/s  "
                  f"max |diff| {err:.2e}")
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None],
                                       k.repeat_interleave(g, 1).transpose(0, 1)[None],
                                       v.repeat_interleave(g, 1).transpose(0, 1)[None],
                                       is_causal=True)
    print(f"sdpa output strides {tuple(o.stride())} for shape {tuple(o.shape)}")


def bench_silu_quant(t: int, inter: int) -> None:
    x = torch.randn(t, 2 * inter, dtype=torch.bfloat16, device="cuda")
    ref_q, ref_s = fp8_quant.silu_and_mul_quant_fp8(x, 1200.0)
    moved = x.numel() * 2 + t * inter  # bytes read + FP8 written
    us = timed(lambda: silu_and_mul(x))
    print(f"silu_and_mul bf16 t={t}: {us:8.1f} µs  "
          f"{(x.numel() * 2 + t * inter * 2) / us / 1e3:7.0f} GB/s")
    for one_pass in (16384, 8192, 4096, 2048, 1024):
        q, s = fp8_quant.silu_and_mul_quant_fp8(x, 1200.0, max_one_pass=one_pass)
        same = torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
        us = timed(lambda n=one_pass: fp8_quant.silu_and_mul_quant_fp8(x, 1200.0,
                                                                         max_one_pass=n))
        print(f"silu_and_mul_quant t={t} max_one_pass {one_pass:5}: {us:8.1f} µs  "
              f"{moved / us / 1e3:7.0f} GB/s  same bits {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--inter", type=int, default=14336)
    ns = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for t in ns.tokens:
        bench_sdpa(t, *ns.heads, ns.head_dim)
    for t in ns.tokens:
        bench_silu_quant(t, ns.inter)


if __name__ == "__main__":
    main()
