"""A wider tile sweep of the skinny GEMV (bf16, or fp8 with --fp8) at M = 1 on chosen (N, K) shapes than
``bench_fp8_gemm.py --sweep-bf16``'s grid: every tile of 4-16 KB per K step, warps, split-K,
broadcast_x, then the fastest few again with prefetch, K steps loaded in groups (ahead) and
other pipeline depths. For shapes far below the copy rate (TP=2's down and o_proj: 70-78% in
the tenth session).

    python scripts/sweep_skinny_shapes.py --shapes 4096x7168 4096x2048 [--budget-s 120] \
        [--fp8] [--ahead 2 4] [--after-norm]

``--after-norm``: each GEMV follows a residual-add RMSNorm kernel, as in a decode step
(``skinny_timing.with_lead``); times are the pair's, the norm alone printed once.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.fp8_gemm import run_ahead
from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model, sm_count
from tests.quant.skinny_timing import (
    copy_bandwidth,
    describe,
    lead_us,
    time_config,
    weights,
    with_activation,
    with_activation_bf16,
    with_lead,
)


def grid(n: int, k: int, elem: int, ahead: tuple[int, ...] = ()) -> list[SkinnyConfig]:
    """Tiles of 4-16 KB per K step (block_k in elements of ``elem`` bytes), each also with its
    K steps loaded in groups of ``ahead`` where the groups tile every split."""
    out = []
    for bn in (2, 4, 8, 16, 32):
        for bk in (128 // elem, 256 // elem, 512 // elem, 1024 // elem, 2048 // elem):
            if not 4096 <= bn * bk * elem <= 16384 or bk > k:
                continue
            for w in (2, 4, 8):
                if bn * bk * elem < 512 * w:  # at least one 16-byte vector per thread
                    continue
                steps = triton.cdiv(k, bk)
                for split in sorted({1, 2, 3, 4}):
                    if split > 1 and steps // split < 2:
                        continue
                    c = SkinnyConfig(bn, bk, split, num_warps=w, evict_first=True)
                    variants = [c]
                    if bk * elem < 512 * w:
                        variants.append(dataclasses.replace(c, broadcast_x=True))
                    out += variants + [dataclasses.replace(v, ahead=a) for v in variants
                                       for a in ahead if run_ahead(
                                           dataclasses.replace(v, ahead=a), k) == a]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", required=True, help="NxK")
    ap.add_argument("--budget-s", type=float, default=120.0, help="per shape")
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--fp8", action="store_true", help="fp8_gemm_small_m (fp8 weights)")
    ap.add_argument("--ahead", type=int, nargs="*", default=[],
                    help="K-step groups tried across the whole grid, not only in refinement")
    ap.add_argument("--after-norm", action="store_true",
                    help="time each GEMV after a norm kernel, as in a decode step")
    args = ap.parse_args()
    copy = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sms = sm_count("cuda", 0)
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        elem = 1 if args.fp8 else 2
        op = weights(n, k, l2, with_bf16=not args.fp8, with_fp8=args.fp8)
        op = with_activation(op, 1) if args.fp8 else with_activation_bf16(op, 1)
        if args.after_norm:
            op = with_lead(op)
            print(f"{shape}: times include a norm kernel of {lead_us(op, 5 * args.rep):.2f} µs "
                  "alone; shares of copy are of the pair's time")
        dflt = default_config(1, n, k, sms, elem_bytes=elem, gpu=gpu_model("cuda", 0))
        timed, start = {}, time.monotonic()
        configs = grid(n, k, elem, tuple(args.ahead))
        random.Random(0).shuffle(configs)  # a budget cut leaves a sample of the whole grid
        configs = [dflt] + configs
        for c in configs:
            if time.monotonic() - start > args.budget_s:
                print(f"  budget: {len(timed)} of {len(configs)} configs timed")
                break
            if (us := time_config(op, c, args.rep)) is not None:
                timed[c] = us
        best = sorted(timed, key=timed.get)[:4]
        for c in best:  # refinement: prefetch or K steps in groups, pipeline depth
            for v in (dataclasses.replace(c, prefetch=True, ahead=1),
                      *(dataclasses.replace(c, prefetch=False, ahead=a) for a in (2, 4)),
                      *(dataclasses.replace(c, num_stages=s) for s in (1, 2))):
                if v not in timed and (us := time_config(op, v, args.rep)) is not None:
                    timed[v] = us
        final = {c: time_config(op, c, 5 * args.rep)
                 for c in [dflt] + sorted(timed, key=timed.get)[:6]}
        gb = n * k * elem / 1e3
        print(f"{shape}: default {describe(dflt)} {final[dflt]:.2f} µs "
              f"({100 * gb / final[dflt] / copy:.1f}% of copy)")
        for c, us in sorted(((c, u) for c, u in final.items() if u), key=lambda t: t[1]):
            print(f"  {describe(c) + (' pf' if c.prefetch else ''):<40} {us:7.2f} µs "
                  f"{100 * gb / us / copy:5.1f}%   {c}")
        del op
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
