"""Benchmark and tune the FP8 skinny GEMM on CUDA (a plain script; pytest does not collect it).

    python tests/quant/bench_fp8_gemm.py [--m 1 4 16] [--quick] [--rep 100]
    python tests/quant/bench_fp8_gemm.py --sweep [--json PATH] [--budget-s 180]
    python tests/quant/bench_fp8_gemm.py --sweep-bf16 [--preset llama-3-8b] [--tp 1]
        [--m 1 2 4 8 16] [--json PATH] [--budget-s 60]

Compare (default): Llama 3 8B FFN shapes (gate_up 4096→28672, down 14336→4096) at decode batch
sizes M: bf16 F.linear vs torch._scaled_mm (row-wise scales) vs fp8_gemm_small_m with its
default config and (unless --quick) the best of the tile grid. The summary gives the row count
up to which the skinny GEMM beats _scaled_mm on both shapes (kestrel.quant.fp8_ops.SMALL_M_MAX).

Sweep (--sweep): the 8B and 70B FFN shapes at M = 1, 2, 4, 8, 16, in three passes: every case
through the tile grid (with the default's split-K rule); refinement around each case's two
fastest (num_stages, split-K, evict-first weight loads), M = 1 first, until --budget-s is spent;
the default and the three fastest timed again with longer runs. Prints per case the best config,
its µs and fraction of the copy bandwidth against default_config's µs and _scaled_mm's, the
lines to paste into kestrel.kernels.skinny_config.TUNED, and writes everything to --json.

BF16 sweep (--sweep-bf16): does the same kernel on bf16 weights (bf16_gemm_small_m) beat cuBLAS
(F.linear) at decode? One rank's linear shapes of --preset at --tp (qkv, o_proj, gate_up, down,
lm_head; default Llama 3 8B at TP=1) at M = 1, 2, 4, 8, 16, M = 1 first: the default config and
a pruned bf16 grid (K in elements, 8 per 16-byte vector), then refinement, both within
--budget-s (default 60 s; past it a case gets its default only); then the default, the two
fastest and F.linear timed with longer runs. Prints per case the best config, µs, share of the
copy bandwidth, F.linear's µs and F.linear / best; per M the decode-step sum (every layer +
lm_head); lines for skinny_config.TUNED_16BIT; --json. Meant to take under 2 minutes on an H200 (60 s
of tuning, ~30 s of final timings), compiles included; with a cold Triton cache they may use up
the budget before the M > 1 grids ("grid cut").

Timing and checks: tests/quant/skinny_timing.py; the sweeps: tests/quant/skinny_sweep.py.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, uninstalled
from kestrel.kernels.skinny_config import default_config, gpu_model, sm_count
from kestrel.quant.fp8_ops import SMALL_M_MAX
from tests.quant.skinny_sweep import BUDGET_S, SWEEP_MS, sweep, sweep_bf16
from tests.quant.skinny_timing import (
    SHAPES,
    copy_bandwidth,
    describe,
    tile_configs,
    time_config,
    time_scaled_mm,
    time_us,
    weights,
    with_activation,
)

# ----------------------------------------------------------------------------- compare


def _row(name: str, m: int, kernel: str, config: str, us: float, nbytes: int, peak: float,
         base_us: float) -> None:
    gbs = nbytes / us / 1e3
    print(f"{name:>8} {m:>3}  {kernel:<12} {config:<32} {us:>8.1f} {gbs:>8.0f} "
          f"{100 * gbs / peak:>5.0f}% {base_us / us:>6.2f}x")


def bench_case(name: str, op: dict, m: int, grid: bool, rep: int, peak: float,
               sms: int) -> dict[str, tuple[float, str]]:
    """Time one (shape, M); returns kernel → (µs, config) for the summary."""
    op = with_activation(op, m)
    n, k = op["wq"][0].shape
    res: dict[str, tuple[float, str]] = {}
    base = time_us(lambda i: F.linear(op["x"], op["wb"][i]), len(op["wb"]), rep)
    _row(name, m, "bf16 linear", "-", base, 2 * n * k, peak, base)
    smm = time_scaled_mm(op, rep)
    if smm is not None:
        res["scaled_mm"] = (smm[0], "-")
        _row(name, m, "_scaled_mm", "-" if smm[1] else "WRONG", smm[0], n * k, peak, base)
    configs = [default_config(m, n, k, sms, gpu=gpu_model("cuda", 0))]
    configs += tile_configs(m, n, k, sms) if grid else []
    for j, cfg in enumerate(configs):
        us = time_config(op, cfg, rep)
        if us is None:
            continue
        _row(name, m, "skinny" if j == 0 else "  grid", describe(cfg), us, n * k, peak, base)
        if j == 0:
            res["skinny"] = (us, describe(cfg))
        if us < res.get("best", (float("inf"), ""))[0]:
            res["best"] = (us, describe(cfg))
    return res


def summary(results: dict[tuple[str, int], dict[str, tuple[float, str]]], ms: list[int]) -> None:
    """The row count up to which the skinny GEMM beats _scaled_mm on every shape."""
    print("\nsummary (µs: skinny default / best of grid / _scaled_mm)")
    for (name, m), r in sorted(results.items()):
        sk, best, smm = (r.get(key, (float("nan"), "-")) for key in ("skinny", "best",
                                                                    "scaled_mm"))
        print(f"{name:>8} M={m:<3} {sk[0]:>8.1f} {best[0]:>8.1f} {smm[0]:>8.1f}   best: {best[1]}")
    for key in ("skinny", "best"):
        limit = 0
        for m in sorted(ms):
            wins = all(results[(name, m)].get(key, (float("inf"),))[0] <
                       results[(name, m)].get("scaled_mm", (float("inf"),))[0] for name in SHAPES)
            if not wins:
                break
            limit = m
        print(f"skinny ({'default config' if key == 'skinny' else 'best configs'}) beats "
              f"_scaled_mm on all shapes for M <= {limit} of {sorted(ms)} "
              f"(SMALL_M_MAX is {SMALL_M_MAX})")


def compare(args: argparse.Namespace, l2: int, sms: int, peak: float) -> None:
    print(f"{'shape':>8} {'M':>3}  {'kernel':<12} {'config':<32} {'us':>8} {'GB/s':>8} "
          f"{'%copy':>6} {'vs bf16':>7}")
    ms = args.m or [1, 4, 16]
    results = {}
    for name, (n, k) in SHAPES.items():
        op = weights(n, k, l2, with_bf16=True)
        for m in ms:
            results[(name, m)] = bench_case(name, op, m, not args.quick, args.rep, peak, sms)
        del op
        torch.cuda.empty_cache()
    summary(results, ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", help="batch rows (compare: 1 4 16; sweeps: "
                    f"{' '.join(map(str, SWEEP_MS))})")
    ap.add_argument("--quick", action="store_true", help="compare: default configs only")
    ap.add_argument("--rep", type=int, default=100, help="compare: ms of replays per timing")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="tune configs on 8B and 70B shapes")
    mode.add_argument("--sweep-bf16", action="store_true",
                      help="bf16_gemm_small_m vs F.linear on a model's linears (tunes it too)")
    ap.add_argument("--preset", default="llama-3-8b", help="--sweep-bf16: whose linears")
    ap.add_argument("--tp", type=int, default=1,
                    help="--sweep-bf16: one rank's shapes at this tensor-parallel size")
    ap.add_argument("--json", help="sweeps: write the results here")
    ap.add_argument("--budget-s", type=float,
                    help=f"sweeps: seconds after which tuning stops (--sweep: refinement, "
                    f"default {BUDGET_S['sweep']:.0f}; --sweep-bf16: grid and refinement, "
                    f"default {BUDGET_S['sweep_bf16']:.0f})")
    args = ap.parse_args()
    if args.budget_s is None:
        args.budget_s = BUDGET_S["sweep_bf16" if args.sweep_bf16 else "sweep"]
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    sms = sm_count("cuda", 0)
    peak = copy_bandwidth()
    meta = {"device": props.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "sms": sms,
            "l2_mib": l2 >> 20, "copy_gbs": peak, "command": "python " + " ".join(sys.argv)}
    print(f"# {props.name}  {meta['date']}  torch {torch.__version__}  triton "
          f"{triton.__version__}  SMs {sms}  L2 {l2 >> 20} MiB")
    print(f"# command: {meta['command']}")
    print(f"# device-to-device copy: {peak:.0f} GB/s; weight GB/s below; x: speedup vs bf16")
    if args.sweep:
        sweep(args, l2, sms, peak, meta)
    elif args.sweep_bf16:
        sweep_bf16(args, l2, sms, peak, meta)
    else:
        compare(args, l2, sms, peak)


if __name__ == "__main__":
    main()
