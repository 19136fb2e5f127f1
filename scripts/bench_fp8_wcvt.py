"""Experiment (ninth session, for the next GPU call): is the FP8 skinny GEMV at M = 1 held back
by converting its e4m3 weights to float32? It reads 85-91% of the copy rate where the bf16
GEMV reads 100-107% (docs/PERFORMANCE.md, ninth session); handing x over as float32 did not
help. Here the weights' conversion itself is replaced, by bit arithmetic on the codes:

  f16bits: (sign << 8 | magnitude << 7) read as float16 is the e4m3 value · 2^-8, exactly,
           subnormals included; then float16 → float32, and the sum · 256 at the end.
  f32bits: (sign << 24 | magnitude << 20) read as float32 is the value · 2^-120 (e4m3
           subnormals become float32 subnormals, so FMAs must not flush them); x is scaled by
           2^64 and the sum by 2^56, so no product leaves float32's normal range.

Powers of two commute with rounding away from underflow, so each variant must give the
kernel's bits exactly; the script checks that before timing. It swaps ``fp8_gemm._fma_loop``
for the variant before any compile (Triton resolves the kernel's callees from its module), so
the library is untouched; each variant runs in its own process.

    python scripts/bench_fp8_wcvt.py            # every variant, the tuned configs and a grid
    python scripts/bench_fp8_wcvt.py --dry-run  # CPU interpreter: exactness on small shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["base", "f16bits", "f32bits"]


sys.path.insert(0, str(ROOT))
import torch
import triton  # after sys.path, in the variant's own process
import triton.language as tl

from kestrel.kernels import fp8_gemm
from kestrel.kernels.fp8_gemm import _load_w, _load_x
from kestrel.kernels.skinny_config import (
    SkinnyConfig,
    default_config,
    gpu_model,
    sm_count,
    split_to_fill,
)
from kestrel.quant.fp8_ops import FP8_DTYPE

# set by run() before the first compile: 1 = f16bits, 2 = f32bits
KIND = tl.constexpr(1)
X_MUL = tl.constexpr(1.0)
OUT_MUL = tl.constexpr(256.0)


@triton.jit
def to_f32(w, KIND: tl.constexpr):
    """e4m3 codes → float32 times 2^-8 (f16bits) or 2^-120 (f32bits)."""
    b = w.to(tl.uint8, bitcast=True)
    if KIND == 1:
        h = b.to(tl.uint16)
        h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
        return h.to(tl.float16, bitcast=True).to(tl.float32)
    u = b.to(tl.uint32)
    return (((u & 0x80) << 24) | ((u & 0x7F) << 20)).to(tl.float32, bitcast=True)


@triton.jit
def _fma_loop_bits(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr,
                   BROADCAST_X: tl.constexpr):
    """fp8_gemm._fma_loop with the weights converted by ``to_f32``."""
    if BROADCAST_X:
        x_ptrs = x_ptrs + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    acc = to_f32(w_first, KIND) * (_load_x(x_ptrs, offs_k, K, EVEN_K).to(tl.float32) * X_MUL)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
        w = _load_w(w_ptrs, offs_k, K, EVEN_K, W_EVICT)
        acc += to_f32(w, KIND) * (_load_x(x_ptrs, offs_k, K, EVEN_K).to(tl.float32) * X_MUL)
    return tl.sum(acc, axis=1)[:, None] * OUT_MUL


def grid(n: int, k: int, dry: bool) -> list[SkinnyConfig]:
    """The tuned config of (1, n, k) on this GPU first, then FMA tiles with and without
    broadcast x."""
    dev = "cpu" if dry else "cuda"
    sms = sm_count(dev, 0)
    tiles = [(16, 256, 4), (4, 1024, 2), (8, 512, 4)] if dry else \
        [(2, 4096, 8), (4, 2048, 4), (8, 1024, 2), (4, 1024, 2), (8, 512, 4), (16, 256, 4),
         (16, 512, 4), (32, 256, 4)]
    cfgs = [default_config(1, n, k, sms, gpu=gpu_model(dev, 0))]
    for bn, bk, nw in tiles:
        c = SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 4 * sms), False, nw)
        cfgs += [c, dataclasses.replace(c, broadcast_x=True)]
    return cfgs


def time_us(launch, copies: int, rep: int) -> float:
    """µs per GEMM: every weight copy once per CUDA-graph replay (as 32 layers stream them)."""
    import triton.testing

    def all_copies() -> None:
        for i in range(copies):
            launch(i)

    all_copies()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(all_copies, rep=rep,
                                             return_mode="median") * 1e3 / copies


def _launch_copy(i: int, ws_all, xq, xs, wsc, out, cfg) -> torch.Tensor:
    return fp8_gemm._launch(xq, xs, ws_all[i], wsc, out, cfg, True)


def run(variant: str, dry: bool, rep: int) -> None:
    """Each shape and config with this variant: its output saved for main's bit check, its
    time printed (not with --dry-run)."""
    if variant != "base":
        kind = VARIANTS.index(variant)
        globals().update(KIND=tl.constexpr(kind), X_MUL=tl.constexpr(2.0**64 if kind == 2 else 1.0),
                         OUT_MUL=tl.constexpr(2.0**56 if kind == 2 else 256.0))
        fp8_gemm._fma_loop = _fma_loop_bits
    dev = "cpu" if dry else "cuda"
    shapes = {"gate_up": (64, 512), "down": (32, 1024)} if dry else \
        {"gate_up": (28672, 4096), "down": (4096, 14336)}
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (n, k) in shapes.items():
        # weights over the whole e4m3 range, subnormals and zeros included
        w = (torch.randn(n, k, generator=gen, device=dev) * 2.0 ** torch.randint(
            -12, 8, (n, k), generator=gen, device=dev)).to(FP8_DTYPE)
        copies = 1 if dry else max(2, -(-200_000_000 // (n * k)))
        ws_all = [w] + [w.view(torch.uint8).roll(i, 1).view(FP8_DTYPE)  # no fp8 roll on CUDA
                        for i in range(1, copies)]
        wsc = torch.rand(n, generator=gen, device=dev) + 0.5
        xq = (torch.randn(1, k, generator=gen, device=dev) * 64).to(FP8_DTYPE)
        xs = torch.ones(1, device=dev)
        out = torch.empty(1, n, dtype=torch.float32, device=dev)
        ref = (xq.float() @ w.float().T) * wsc  # exact products, float32 sums: close only
        for j, cfg in enumerate(grid(n, k, dry)):
            y = fp8_gemm._launch(xq, xs, w, wsc, torch.empty_like(out), cfg, True)
            torch.save(y.cpu(), f"/tmp/wcvt_{variant}_{name}_{j}.pt")
            err = float((y - ref).abs().max() / ref.abs().max())
            line = f"{variant:8} {name:8} {'tuned' if j == 0 else 'grid':5} {cfg!s:90.90}"
            if not dry:
                us = time_us(functools.partial(_launch_copy, ws_all=ws_all, xq=xq, xs=xs,
                                               wsc=wsc, out=out, cfg=cfg), copies, rep)
                line += f" {us:7.2f} us {n * k / us / 1e3:7.0f} GB/s"
            print(f"{line} rel.err {err:.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--variant", choices=VARIANTS)
    args = ap.parse_args()
    if args.variant:
        return run(args.variant, args.dry_run, args.rep)
    env = dict(os.environ)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    for v in VARIANTS:  # one process each: a fresh compile of the swapped loop
        subprocess.run([sys.executable, __file__, "--variant", v, "--rep", str(args.rep)]
                       + (["--dry-run"] if args.dry_run else []), env=env, check=False)
    for v in VARIANTS[1:]:  # every variant must give the base kernel's bits
        pairs = [(Path("/tmp") / f"wcvt_base_{p.name[len(f'wcvt_{v}_'):]}", p)
                 for p in sorted(Path("/tmp").glob(f"wcvt_{v}_*.pt"))]
        same = [torch.equal(torch.load(b), torch.load(p)) for b, p in pairs if b.exists()]
        print(f"{v}: {sum(same)} of {len(same)} outputs bit-identical to base")


if __name__ == "__main__":
    main()
