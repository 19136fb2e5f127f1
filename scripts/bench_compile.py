"""Does torch.compile beat Kestrel's own kernels on a decoder layer's MLP block? (issue 5:
"optional torch.compile where it measurably helps")

    python scripts/bench_compile.py [--tokens 1 4096] [--mode default]

The block is llama-3-8b's post-attention half of a layer in bf16: residual add + RMSNorm →
gate_up → SwiGLU → down. "kestrel" is what the engine runs (the fused RMSNorm kernel, and at
one token the skinny GEMVs with the SwiGLU folded in; otherwise cuBLAS and the SwiGLU kernel);
"compiled" is torch.compile of the plain torch reference of the same block (Inductor fuses the
elementwise ops and picks the GEMMs). Outputs are checked against each other first. Times:
CUDA-graph replays at one token (as the engine decodes), plain launches otherwise; median µs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.fp8_gemm import bf16_gemm_small_m
from kestrel.kernels.fused import rms_norm, silu_and_mul
from kestrel.layers.activation import silu_and_mul_ref
from kestrel.layers.norm import rms_norm_ref

HIDDEN, INTER, EPS = 4096, 14336, 1e-5


def reference(x, res, norm_w, w_gu, w_down):
    h, res = rms_norm_ref(x, norm_w, EPS, res)
    return F.linear(silu_and_mul_ref(F.linear(h, w_gu)), w_down), res


def kestrel(x, res, norm_w, w_gu, w_down):
    h, res = rms_norm(x, norm_w, EPS, res)
    if x.shape[0] == 1:  # decode: the engine's skinny GEMVs with SwiGLU folded in
        g = bf16_gemm_small_m(h, w_gu, silu_cols=INTER)
        return bf16_gemm_small_m(g, w_down, glu=True), res
    return F.linear(silu_and_mul(F.linear(h, w_gu)), w_down), res


def _time(call, graph: bool) -> float:
    """Median ms: in a CUDA graph when ``graph`` (plain launches if capture fails)."""
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(call, rep=200, return_mode="median")
        except RuntimeError as e:
            print(f"  (no CUDA graph: {e}; plain launches)")
    return triton.testing.do_bench(call, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4096])
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w_gu = (0.02 * torch.randn(2 * INTER, HIDDEN, device=dev, generator=g)).to(dt)
    w_down = (0.02 * torch.randn(HIDDEN, INTER, device=dev, generator=g)).to(dt)
    norm_w = (1 + 0.1 * torch.randn(HIDDEN, device=dev, generator=g)).to(dt)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, mode {args.mode}")
    print(f"{'tokens':>7} {'kestrel µs':>11} {'compiled µs':>12} {'compiled / kestrel':>19} "
          f"{'compile s':>10}")
    for t in args.tokens:
        x = torch.randn(t, HIDDEN, device=dev, generator=g).to(dt)
        res = torch.randn(t, HIDDEN, device=dev, generator=g).to(dt)
        fn = torch.compile(reference, mode=args.mode, dynamic=False)
        t0 = time.perf_counter()
        got = fn(x, res, norm_w, w_gu, w_down)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        want = kestrel(x, res, norm_w, w_gu, w_down)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))
        times = [1e3 * _time(lambda f=f, x=x, r=res: f(x, r, norm_w, w_gu, w_down), t == 1)
                 for f in (kestrel, fn)]
        print(f"{t:>7} {times[0]:>11.1f} {times[1]:>12.1f} {times[1] / times[0]:>19.3f} "
              f"{compile_s:>10.1f}")


if __name__ == "__main__":
    main()
