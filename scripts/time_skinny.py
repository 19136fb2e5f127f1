"""The skinny GEMM at batch 1 with its default (tuned) configs on llama-3-8b's decode shapes:
FP8 FFN at TP=1, W8A8's int8 linears at TP=1, BF16 linears at TP=1 and one rank's at TP=2; µs
and share of the copy rate.
For A/B runs of the kernel (the same script in another tree, same call).

    python scripts/time_skinny.py [--rep 50] [--ahead 2 4]   # one GPU

``--ahead``: each case again with its config's K steps loaded in groups of that many
(SkinnyConfig.ahead; prefetch off, which it replaces); each line names its group (a1: one
step at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.fp8_gemm import run_ahead
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count
from tests.quant.skinny_timing import (
    copy_bandwidth,
    describe,
    time_config,
    weights,
    with_activation,
    with_activation_bf16,
    with_activation_int8,
)

H, Q, KV, FFN = 4096, 4096, 1024, 14336  # llama-3-8b


def linears(tp: int) -> tuple:
    """(name, N, K) of one rank's attention and FFN linears at tensor parallelism ``tp``."""
    return (("qkv", (Q + 2 * KV) // tp, H), ("o_proj", H, Q // tp),
            ("gate_up", 2 * FFN // tp, H), ("down", H, FFN // tp))


CASES = [("fp8 gate_up", 2 * FFN, H, "fp8"), ("fp8 down", H, FFN, "fp8")] + [
    (f"int8 {name}", n, k, "int8") for name, n, k in linears(1)] + [
    (f"bf16 tp{tp} {name}", n, k, "bf16") for tp in (1, 2) for name, n, k in linears(tp)]
ACTIVATION = {"fp8": with_activation, "int8": with_activation_int8, "bf16": with_activation_bf16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--ahead", type=int, nargs="*", default=[])
    args = ap.parse_args()
    copy = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for label, n, k, kind in CASES:
        elem = 2 if kind == "bf16" else 1
        op = weights(n, k, l2, with_bf16=kind == "bf16", with_fp8=kind == "fp8",
                     with_int8=kind == "int8")
        op = ACTIVATION[kind](op, 1)
        cfg = default_config(1, n, k, sm_count("cuda", 0), elem_bytes=elem,
                             gpu=gpu_model("cuda", 0), int8=kind == "int8")
        variants = [cfg] + [dataclasses.replace(cfg, prefetch=False, ahead=a)
                            for a in args.ahead if a != cfg.ahead]
        for c in variants:
            if run_ahead(c, k) != c.ahead:
                print(f"  {label} ahead {c.ahead}: groups do not tile the K steps of "
                      f"{describe(c)}")
                continue
            us = time_config(op, c, args.rep)
            if us is not None:
                gbs = n * k * elem / us / 1e3
                print(f"  {label + f' a{c.ahead}':28} {us:7.2f} us "
                      f"{gbs:6.0f} GB/s {100 * gbs / copy:5.1f}% of copy")
        del op
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
