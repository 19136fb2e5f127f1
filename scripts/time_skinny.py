"""The skinny GEMM at batch 1 with its default (tuned) configs on llama-3-8b's decode shapes:
FP8 FFN at TP=1, BF16 linears at TP=1 and one rank's at TP=2; µs and share of the copy rate.
For A/B runs of the kernel (the same script in another tree, same call).

    python scripts/time_skinny.py [--rep 50] [--ahead 2 4]   # one GPU

``--ahead``: each case again with its config's K steps loaded in groups of that many
(SkinnyConfig.ahead; prefetch off, which it replaces); each line names its group (a1: one
step at a time).

``--x-dtype float16 float32``: the FP8 cases again with x handed to the kernel as its e4m3
values in that dtype (exact), the same bits out (checked): each program then converts only its
weights. Hopper may run the e4m3 → f16 conversion (F2FP) at a fraction of the FMA rate, and per
32 weights a thread spends 24 F2FP of which 8 are x's (SASS, Triton 3.6); with float32 x also
16 fewer HADD2 (f16 → f32). Does the FP8 GEMV speed up on the H200 without them? With
``--ahead 1 2`` each group is tried with each x dtype (float32 x in groups of two takes 92
registers against 80).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels import fp8_gemm
from kestrel.kernels.fp8_gemm import run_ahead
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count
from tests.quant.skinny_timing import (
    copy_bandwidth,
    describe,
    time_config,
    time_us,
    weights,
    with_activation,
    with_activation_bf16,
)

H, Q, KV, FFN = 4096, 4096, 1024, 14336  # llama-3-8b
CASES = [("fp8 gate_up", 2 * FFN, H, 1), ("fp8 down", H, FFN, 1)] + [
    (f"bf16 tp{tp} {name}", n, k, 2) for tp in (1, 2) for name, n, k in (
        ("qkv", (Q + 2 * KV) // tp, H), ("o_proj", H, Q // tp), ("gate_up", 2 * FFN // tp, H),
        ("down", H, FFN // tp))]


def time_x_dtype(op: dict, cfg, dtype: torch.dtype, rep: int) -> float:
    """µs of the FP8 GEMV with x given as its e4m3 values in ``dtype``; its output must be the
    fp8-x kernel's, bit for bit."""
    x = op["xq"].to(dtype)
    out = torch.empty(1, op["wq"][0].shape[0], dtype=torch.bfloat16, device=x.device)

    def run(i: int) -> torch.Tensor:
        return fp8_gemm._launch(x, op["xs"].view(-1), op["wq"][i], op["ws"].view(-1), out,
                                cfg, scaled=True)
    if not torch.equal(run(0), op["skinny"](0, cfg)):
        raise SystemExit(f"x as {dtype}: not the fp8-x kernel's bits")
    return time_us(run, op["copies"], rep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--ahead", type=int, nargs="*", default=[])
    ap.add_argument("--x-dtype", nargs="*", default=[], choices=["float16", "float32"])
    args = ap.parse_args()
    copy = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for label, n, k, elem in CASES:
        op = weights(n, k, l2, with_bf16=elem == 2, with_fp8=elem == 1)
        op = with_activation(op, 1) if elem == 1 else with_activation_bf16(op, 1)
        cfg = default_config(1, n, k, sm_count("cuda", 0), elem_bytes=elem,
                             gpu=gpu_model("cuda", 0))
        variants = [cfg] + [dataclasses.replace(cfg, prefetch=False, ahead=a)
                            for a in args.ahead if a != cfg.ahead]
        for c in variants:
            if run_ahead(c, k) != c.ahead:
                print(f"  {label} ahead {c.ahead}: groups do not tile the K steps of "
                      f"{describe(c)}")
                continue
            timings = [("", time_config(op, c, args.rep))] + [
                (f" x {name}", time_x_dtype(op, c, getattr(torch, name), args.rep))
                for name in (args.x_dtype if elem == 1 else [])]
            for suffix, us in timings:
                if us is not None:
                    gbs = n * k * elem / us / 1e3
                    print(f"  {label + f' a{c.ahead}' + suffix:28} {us:7.2f} us "
                          f"{gbs:6.0f} GB/s {100 * gbs / copy:5.1f}% of copy")
        del op
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
