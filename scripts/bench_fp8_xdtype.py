"""Experiment: the FP8 skinny GEMV at M = 1 with x handed over as fp8 codes (today) or as the
same values in float32 / bfloat16 (exact: every e4m3 value is), so the kernel converts only
the weights. Prints µs and share of the copy rate per shape, x dtype and tile config.

    python scripts/bench_fp8_xdtype.py [--xdtypes fp8 f32 bf16] [--rep 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels import fp8_gemm  # noqa: E402
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count, split_to_fill  # noqa: E402
from kestrel.quant.fp8_ops import FP8_DTYPE  # noqa: E402
from tests.quant.skinny_timing import FMA_TILES, copy_bandwidth, describe  # noqa: E402

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}
DTYPES = {"fp8": FP8_DTYPE, "f32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--xdtypes", nargs="+", default=["fp8", "f32", "bf16"])
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    t0 = time.time()
    sms, gpu = sm_count("cuda", 0), gpu_model("cuda", 0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} copy {bw:.0f} GB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-200_000_000 // (n * k)))
        wq = [(torch.randn(n, k, device="cuda") * 100).to(FP8_DTYPE) for _ in range(copies)]
        ws = torch.rand(n, device="cuda") + 0.5
        xq = (torch.randn(1, k, device="cuda") * 100).to(FP8_DTYPE)
        xs = torch.ones(1, device="cuda")
        out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        tuned = default_config(1, n, k, sms, gpu=gpu)
        grid = [tuned]
        for bn, bk, w in FMA_TILES:
            c = fp8_gemm.SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 4 * sms), False, w)
            grid += [c, dataclasses.replace(c, broadcast_x=True)]
        grid += [dataclasses.replace(c, evict_first=True) for c in grid[:1]]
        ref = fp8_gemm._launch(xq, xs, wq[0], ws, torch.empty_like(out), tuned, True).float()
        for xname in args.xdtypes:
            x = xq if xname == "fp8" else xq.to(DTYPES[xname])
            for cfg in grid:
                if time.time() - t0 > args.budget_s:
                    break
                try:
                    y = fp8_gemm._launch(x, xs, wq[0], ws, out, cfg, True).float()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    if err > 1e-2:
                        print(f"  {name} {xname} {describe(cfg)} WRONG {err:.3g}")
                        continue

                    def all_copies() -> None:
                        for i in range(copies):
                            fp8_gemm._launch(x, xs, wq[i], ws, out, cfg, True)

                    all_copies()
                    torch.cuda.synchronize()
                    us = triton.testing.do_bench_cudagraph(all_copies, rep=args.rep,
                                                           return_mode="median") * 1e3 / copies
                except Exception as e:  # noqa: BLE001 - a config that fails is skipped
                    print(f"  {name} {xname} {describe(cfg)} fails {e!r:.60}")
                    continue
                frac = n * k / us / 1e3 / bw
                tag = " (tuned)" if cfg == tuned else ""
                rows.append((name, xname, us, frac, describe(cfg) + tag))
                print(f"  {name:8} {xname:4} {us:7.2f} us {frac:6.1%}  {describe(cfg)}{tag}",
                      flush=True)
    print("\nbest per shape and x dtype:")
    for name in SHAPES:
        for xname in args.xdtypes:
            r = sorted(x for x in rows if x[0] == name and x[1] == xname)
            r = sorted(r, key=lambda x: x[2])
            if r:
                print(f"{name:8} {xname:4} {r[0][2]:7.2f} us {r[0][3]:6.1%}  {r[0][4]}")


if __name__ == "__main__":
    main()
