"""Benchmark and tune the FP8 skinny GEMM on CUDA (a plain script; pytest does not collect it).

    python tests/quant/bench_fp8_gemm.py [--m 1 4 16] [--quick] [--rep 100]
    python tests/quant/bench_fp8_gemm.py --sweep [--json PATH] [--budget-s 180]

Compare (default): Llama 3 8B FFN shapes (gate_up 4096→28672, down 14336→4096) at decode batch
sizes M: bf16 F.linear vs torch._scaled_mm (row-wise scales) vs fp8_gemm_small_m with its
default config and (unless --quick) the best of the tile grid. The summary gives the row count
up to which the skinny GEMM beats _scaled_mm on both shapes (kestrel.quant.fp8_ops.SMALL_M_MAX).

Sweep (--sweep): the 8B and 70B FFN shapes at M = 1, 2, 4, 8, 16, in three passes: every case
through the tile grid (with the default's split-K rule); refinement around each case's two
fastest (num_stages, split-K, evict-first weight loads), M = 1 first, until --budget-s is spent;
the default and the three fastest timed again with longer runs. Prints per case the best config,
its µs and fraction of the copy bandwidth against default_config's µs and _scaled_mm's, the
lines to paste into kestrel.kernels.fp8_gemm.TUNED, and writes everything to --json.

Timing: in a CUDA graph (as the engine runs decode) with triton.testing.do_bench_cudagraph; each
timed call runs the GEMM over several weight copies (≥ 4× L2 in all), as 32 layers would, so no
weight is served from L2. GB/s = weight bytes / time, against a device-to-device copy on the same
card. Every config's output is checked against the float32 emulation before it is timed; a
config that is wrong or does not compile is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, uninstalled
from kestrel.kernels.fp8_gemm import (
    SkinnyConfig,
    default_config,
    fp8_gemm_small_m,
    sm_count,
    split_to_fill,
)
from kestrel.quant.fp8_ops import SMALL_M_MAX, fp8_matmul_emulated, quantize_rowwise_ref

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}  # Llama 3 8B, name → (N, K)
SHAPES_70B = {"70b_gate_up": (57344, 8192), "70b_down": (8192, 28672)}
SWEEP_MS = [1, 2, 4, 8, 16]
# (block_n, block_k, num_warps). FMA: 16 to 128 float32 accumulators per thread; x rows of
# 512·num_warps give x the weight tile's layout, shorter ones are tried with broadcast_x too.
FMA_TILES = [(2, 4096, 8), (4, 2048, 4), (8, 2048, 4), (4, 1024, 2), (8, 1024, 2),
             (8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 4), (32, 256, 4), (32, 512, 8)]
# Tensor-core dot: 64 rows fill a wgmma; the weight tile of 3 stages stays in shared memory.
DOT_TILES = [(32, 256, 4), (32, 512, 4), (64, 128, 4), (64, 256, 4), (64, 512, 4),
             (128, 128, 4), (128, 256, 4), (128, 256, 8)]
COARSE_REP, FINE_REP = 5, 20  # ms of graph replays per timing: ranking, reported figures


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def tile_configs(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """The tile grid, each with the default's split-K rule (FMA: one x row, so M == 1 only)."""
    out = [SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 2 * sms), True, w)
           for bn, bk, w in DOT_TILES]
    for bn, bk, w in FMA_TILES if m == 1 else []:
        cfg = SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 4 * sms), False, w)
        out += [cfg] + ([dataclasses.replace(cfg, broadcast_x=True)] if bk < 512 * w else [])
    return out


def variants(c: SkinnyConfig, n: int, k: int) -> list[SkinnyConfig]:
    """Around one config: other pipeline depths, half / double / no split-K, evict-first."""
    out = [dataclasses.replace(c, num_stages=s) for s in (1, 2, 4) if s != c.num_stages]
    k_steps = triton.cdiv(k, c.block_k)
    for split in {1, max(1, c.split_k // 2), min(k_steps // 2, 2 * c.split_k)} - {c.split_k}:
        if split >= 1:
            out.append(dataclasses.replace(c, split_k=split))
    return out + [dataclasses.replace(c, evict_first=True)]


def _describe(c: SkinnyConfig) -> str:
    kind = "dot" if c.use_dot else "fma"
    return (f"{kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"
            + (" ef" if c.evict_first else "") + (" bx" if c.broadcast_x else ""))


def _time_us(fn: Callable[[int], torch.Tensor], copies: int, rep: int) -> float:
    """µs per GEMM: one timed call runs it on every weight copy, replayed in a CUDA graph."""
    def all_copies() -> None:
        for i in range(copies):
            fn(i)

    all_copies()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(all_copies, rep=rep, return_mode="median") * 1e3 \
        / copies


def _correct(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(torch.isfinite(y).all()) and float((y.float() - ref).abs().max()) <= \
        1e-2 * float(ref.abs().max())


def _weights(n: int, k: int, l2_bytes: int, with_bf16: bool) -> dict:
    """Weight copies, fp8 (and bf16), each set ≥ 4× L2 (as 32 layers would stream them)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = 0.02 * torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    wq, ws = quantize_rowwise_ref(w)
    n_fp8, n_bf16 = (max(2, triton.cdiv(4 * l2_bytes, n * k * b)) for b in (1, 2))
    return {"ws": ws, "wq": [wq] + [wq.clone() for _ in range(n_fp8 - 1)],
            "wb": [w] + [w.clone() for _ in range(n_bf16 - 1)] if with_bf16 else []}


def _with_activation(op: dict, m: int) -> dict:
    """``op`` plus x [M, K] bf16, its quantization and the float32 reference output."""
    x = torch.randn(m, op["wq"][0].shape[1], device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_rowwise_ref(x)
    ref = fp8_matmul_emulated(xq, xs, op["wq"][0], op["ws"], torch.float32)
    return {**op, "x": x, "xq": xq, "xs": xs, "ref": ref}


def _time_config(op: dict, cfg: SkinnyConfig, rep: int) -> float | None:
    """µs of the skinny GEMM with ``cfg`` on op's operands; None if it fails or is wrong."""
    def skinny(i: int) -> torch.Tensor:
        return fp8_gemm_small_m(op["xq"], op["xs"], op["wq"][i], op["ws"], torch.bfloat16,
                                config=cfg)
    try:
        if not _correct(skinny(0), op["ref"]):
            print(f"    {_describe(cfg):<32} WRONG, skipped")
            return None
        return _time_us(skinny, len(op["wq"]), rep)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
        print(f"    {_describe(cfg):<32} fails: {e!r:.70}")
        return None


def _time_scaled_mm(op: dict, rep: int) -> tuple[float, bool] | None:
    """(µs, correct) of torch._scaled_mm on op's operands; None where it does not run."""
    xq, xs, ws = op["xq"], op["xs"], op["ws"]

    def smm(i: int) -> torch.Tensor:
        return torch._scaled_mm(xq, op["wq"][i].t(), scale_a=xs, scale_b=ws.view(1, -1),
                                out_dtype=torch.bfloat16)
    try:
        return _time_us(smm, len(op["wq"]), rep), _correct(smm(0), op["ref"])
    except RuntimeError as e:
        print(f"    _scaled_mm fails: {str(e).splitlines()[0][:60]}")
        return None


# ----------------------------------------------------------------------------- compare


def _row(name: str, m: int, kernel: str, config: str, us: float, nbytes: int, peak: float,
         base_us: float) -> None:
    gbs = nbytes / us / 1e3
    print(f"{name:>8} {m:>3}  {kernel:<12} {config:<32} {us:>8.1f} {gbs:>8.0f} "
          f"{100 * gbs / peak:>5.0f}% {base_us / us:>6.2f}x")


def bench_case(name: str, op: dict, m: int, grid: bool, rep: int, peak: float,
               sms: int) -> dict[str, tuple[float, str]]:
    """Time one (shape, M); returns kernel → (µs, config) for the summary."""
    op = _with_activation(op, m)
    n, k = op["wq"][0].shape
    res: dict[str, tuple[float, str]] = {}
    base = _time_us(lambda i: F.linear(op["x"], op["wb"][i]), len(op["wb"]), rep)
    _row(name, m, "bf16 linear", "-", base, 2 * n * k, peak, base)
    smm = _time_scaled_mm(op, rep)
    if smm is not None:
        res["scaled_mm"] = (smm[0], "-")
        _row(name, m, "_scaled_mm", "-" if smm[1] else "WRONG", smm[0], n * k, peak, base)
    configs = [default_config(m, n, k, sms)] + (tile_configs(m, n, k, sms) if grid else [])
    for j, cfg in enumerate(configs):
        us = _time_config(op, cfg, rep)
        if us is None:
            continue
        _row(name, m, "skinny" if j == 0 else "  grid", _describe(cfg), us, n * k, peak, base)
        if j == 0:
            res["skinny"] = (us, _describe(cfg))
        if us < res.get("best", (float("inf"), ""))[0]:
            res["best"] = (us, _describe(cfg))
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
        op = _weights(n, k, l2, with_bf16=True)
        for m in ms:
            results[(name, m)] = bench_case(name, op, m, not args.quick, args.rep, peak, sms)
        del op
        torch.cuda.empty_cache()
    summary(results, ms)


# ----------------------------------------------------------------------------- sweep


def _fastest(timed: dict[SkinnyConfig, float], count: int) -> list[SkinnyConfig]:
    return sorted(timed, key=timed.__getitem__)[:count]


def _coarse(op: dict, configs: list[SkinnyConfig], timed: dict[SkinnyConfig, float]) -> None:
    """Times the configs not yet in ``timed`` with COARSE_REP; failures are left out."""
    for cfg in configs:
        if cfg not in timed and (us := _time_config(op, cfg, COARSE_REP)) is not None:
            timed[cfg] = us


def _case_json(case: dict, default: SkinnyConfig, fine: dict[SkinnyConfig, float],
               smm: float | None, peak: float) -> dict:
    n, k = case["n"], case["k"]

    def stats(us: float | None) -> dict:
        gbs = n * k / us / 1e3 if us else None
        return {"us": us, "weight_gbs": gbs, "copy_fraction": gbs / peak if gbs else None}

    best = _fastest(fine, 1)[0]
    return {"shape": case["name"], "n": n, "k": k, "m": case["m"],
            "best": {"config": dataclasses.asdict(best), **stats(fine[best])},
            "default": {"config": dataclasses.asdict(default), **stats(fine.get(default))},
            "scaled_mm": stats(smm),
            "coarse": [{"config": dataclasses.asdict(c), "us": us}
                       for c, us in sorted(case["timed"].items(), key=lambda cu: cu[1])]}


def _report(c: dict, sms: int) -> str | None:
    """Prints one case's result; returns its TUNED line if the default is > 2% slower."""
    best, dflt = c["best"], c["default"]
    cfg, dcfg = SkinnyConfig(**best["config"]), SkinnyConfig(**dflt["config"])
    nan = float("nan")
    print(f"{c['shape']:>12} M={c['m']:<3} best {_describe(cfg):<32} {best['us']:7.1f} µs "
          f"{100 * best['copy_fraction']:4.0f}% of copy | default {_describe(dcfg):<32} "
          f"{dflt['us'] or nan:7.1f} µs | _scaled_mm {c['scaled_mm']['us'] or nan:7.1f} µs")
    gain = (dflt["us"] or float("inf")) / best["us"]
    if gain <= 1.02:
        return None
    return (f"    ({sms}, {triton.next_power_of_2(c['m'])}, {c['n']}, {c['k']}): {cfg!r},"
            f"  # {gain:.2f}x the rule")


def sweep(args: argparse.Namespace, l2: int, sms: int, peak: float, meta: dict) -> None:
    """Three passes over every (shape, M): the tile grid; refinement around each case's two
    fastest, M = 1 first, until --budget-s; default and the best three timed with FINE_REP."""
    ms, start = args.m or SWEEP_MS, time.monotonic()
    ops = {name: _weights(n, k, l2, with_bf16=False)
           for name, (n, k) in {**SHAPES, **SHAPES_70B}.items()}
    cases = [{"name": name, "m": m, "n": op["wq"][0].shape[0], "k": op["wq"][0].shape[1],
              "op": _with_activation(op, m), "timed": {}}
             for m in sorted(ms) for name, op in ops.items()]  # refinement priority order

    def progress(what: str, i: int, case: dict) -> None:
        print(f"[{time.monotonic() - start:5.0f}s] {what} {i + 1}/{len(cases)}: {case['name']} "
              f"N={case['n']} K={case['k']} M={case['m']}", flush=True)

    for i, case in enumerate(cases):
        progress("grid", i, case)
        _coarse(case["op"], tile_configs(case["m"], case["n"], case["k"], sms), case["timed"])
    for i, case in enumerate(cases):
        if time.monotonic() - start > args.budget_s:
            print(f"# budget of {args.budget_s:.0f} s spent: {len(cases) - i} cases not refined")
            break
        progress("refine", i, case)
        _coarse(case["op"], [v for c in _fastest(case["timed"], 2)
                             for v in variants(c, case["n"], case["k"])], case["timed"])
    results, tuned = [], []
    for i, case in enumerate(cases):
        progress("final", i, case)
        default = default_config(case["m"], case["n"], case["k"], sms)
        fine = {c: us for c in {default, *_fastest(case["timed"], 3)}
                if (us := _time_config(case["op"], c, FINE_REP)) is not None}
        if not fine:
            print("    no config ran")
            continue
        smm = _time_scaled_mm(case["op"], FINE_REP)
        results.append(_case_json(case, default, fine, smm[0] if smm else None, peak))
    print(f"\n# sweep took {time.monotonic() - start:.0f} s; copy {peak:.0f} GB/s")
    for c in sorted(results, key=lambda c: (c["n"] * c["k"], c["n"], c["m"])):
        if (line := _report(c, sms)) is not None:
            tuned.append(line)
    print("# TUNED entries for kestrel/kernels/fp8_gemm.py (the default is > 2% slower):")
    print("\n".join(tuned) or "    (none)")
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "cases": results, "tuned": tuned},
                                              indent=1))
        print(f"# wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", help="batch rows (compare: 1 4 16; sweep: "
                    f"{' '.join(map(str, SWEEP_MS))})")
    ap.add_argument("--quick", action="store_true", help="compare: default configs only")
    ap.add_argument("--rep", type=int, default=100, help="compare: ms of replays per timing")
    ap.add_argument("--sweep", action="store_true", help="tune configs on 8B and 70B shapes")
    ap.add_argument("--json", help="sweep: write the results here")
    ap.add_argument("--budget-s", type=float, default=180.0,
                    help="sweep: seconds after which refinement stops")
    args = ap.parse_args()
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
    else:
        compare(args, l2, sms, peak)


if __name__ == "__main__":
    main()
