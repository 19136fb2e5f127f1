"""Benchmark and tune the FP8 skinny GEMM on CUDA (a plain script; pytest does not collect it).

    python tests/quant/bench_fp8_gemm.py [--m 1 4 16] [--quick] [--rep 100]
    python tests/quant/bench_fp8_gemm.py --sweep [--json PATH] [--budget-s 180]
    python tests/quant/bench_fp8_gemm.py --sweep-bf16 [--m 1 2 4 8 16] [--json PATH] [--budget-s 60]

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

BF16 sweep (--sweep-bf16): does the same kernel on bf16 weights (bf16_gemm_small_m) beat cuBLAS
(F.linear) at decode? The Llama 3 8B linear shapes at TP=1 (qkv, o_proj, gate_up, down, lm_head)
at M = 1, 2, 4, 8, 16, M = 1 first: the default config and a pruned bf16 grid (K in elements, 8
per 16-byte vector), then refinement, both within --budget-s (default 60 s; past it a case gets
its default only); then the default, the two fastest and F.linear timed with longer runs. Prints
per case the best config, µs, share of the copy bandwidth, F.linear's µs and F.linear / best;
per M the decode-step sum (32 layers + lm_head); lines for fp8_gemm.TUNED_16BIT; --json. Meant
to take under 2 minutes on an H200 (60 s of tuning, ~30 s of final timings), compiles included;
with a cold Triton cache they may use up the budget before the M > 1 grids ("grid cut").

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
    bf16_gemm_small_m,
    default_config,
    fp8_gemm_small_m,
    sm_count,
    split_to_fill,
)
from kestrel.quant.fp8_ops import SMALL_M_MAX, fp8_matmul_emulated, quantize_rowwise_ref

DEVICE = "cuda"  # a CPU dry run of the code paths may set "cpu" (TRITON_INTERPRET=1)
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

# --sweep-bf16: Llama 3 8B linears at TP=1, name → (N, K); one decode step runs the first four
# once per layer and lm_head once.
SHAPES_BF16 = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
               "down": (4096, 14336), "lm_head": (128256, 4096)}
LAYERS_8B = 32
# bf16 tiles, K in elements: the FP8 winners at the same bytes per step and their neighbours.
# FMA rows shorter than 256·num_warps take broadcast_x only (it won every such FP8 case).
BF16_FMA_TILES = [(2, 2048, 8), (4, 1024, 4), (4, 512, 2), (8, 512, 4), (8, 256, 2),
                  (16, 128, 4), (16, 256, 4)]
BF16_DOT_TILES = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4),
                  (128, 128, 8)]
BUDGET_S = {"sweep": 180.0, "sweep_bf16": 60.0}  # --budget-s defaults


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def tile_configs(m: int, n: int, k: int, sms: int, dot_tiles: list = DOT_TILES,
                 fma_tiles: list = FMA_TILES, elem_bytes: int = 1,
                 bx_only: bool = False) -> list[SkinnyConfig]:
    """The tile grid, each with the default's split-K rule (FMA: one x row, so M == 1 only).
    An FMA x row shorter than a 16-byte vector per thread is tried with broadcast_x too
    (``bx_only``: instead)."""
    out = [SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 2 * sms), True, w)
           for bn, bk, w in dot_tiles]
    for bn, bk, w in fma_tiles if m == 1 else []:
        cfg = SkinnyConfig(bn, bk, split_to_fill(n, k, bn, bk, 4 * sms), False, w)
        bx = [dataclasses.replace(cfg, broadcast_x=True)] if bk * elem_bytes < 512 * w else []
        out += bx if bx and bx_only else [cfg] + bx
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


def _weights(n: int, k: int, l2_bytes: int, with_bf16: bool, with_fp8: bool = True) -> dict:
    """Weight copies, fp8 (and bf16), each set ≥ 4× L2 (as 32 layers would stream them)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w = 0.02 * torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    n_fp8, n_bf16 = (max(2, triton.cdiv(4 * l2_bytes, n * k * b)) for b in (1, 2))
    op = {"wb": [w] + [w.clone() for _ in range(n_bf16 - 1)] if with_bf16 else []}
    if with_fp8:
        wq, ws = quantize_rowwise_ref(w)
        op.update(ws=ws, wq=[wq] + [wq.clone() for _ in range(n_fp8 - 1)])
    return op


def _with_activation(op: dict, m: int) -> dict:
    """``op`` plus x [M, K] bf16, its quantization, the float32 reference output and the fp8
    skinny GEMM on weight copy i as ``skinny(i, config)``."""
    x = torch.randn(m, op["wq"][0].shape[1], device=DEVICE, dtype=torch.bfloat16)
    xq, xs = quantize_rowwise_ref(x)
    ref = fp8_matmul_emulated(xq, xs, op["wq"][0], op["ws"], torch.float32)

    def skinny(i: int, cfg: SkinnyConfig) -> torch.Tensor:
        return fp8_gemm_small_m(xq, xs, op["wq"][i], op["ws"], torch.bfloat16, config=cfg)
    return {**op, "x": x, "xq": xq, "xs": xs, "ref": ref, "skinny": skinny,
            "copies": len(op["wq"])}


def _with_activation_bf16(op: dict, m: int) -> dict:
    """``op`` (bf16 weights) plus x [M, K] bf16, the float32 reference output and
    ``skinny(i, config)``: bf16_gemm_small_m on weight copy i."""
    x = torch.randn(m, op["wb"][0].shape[1], device=DEVICE, dtype=torch.bfloat16)
    ref = x.float() @ op["wb"][0].float().T

    def skinny(i: int, cfg: SkinnyConfig) -> torch.Tensor:
        return bf16_gemm_small_m(x, op["wb"][i], config=cfg)
    return {**op, "x": x, "ref": ref, "skinny": skinny, "copies": len(op["wb"])}


def _time_config(op: dict, cfg: SkinnyConfig, rep: int) -> float | None:
    """µs of the skinny GEMM with ``cfg`` on op's operands; None if it fails or is wrong."""
    def skinny(i: int) -> torch.Tensor:
        return op["skinny"](i, cfg)
    try:
        if not _correct(skinny(0), op["ref"]):
            print(f"    {_describe(cfg):<32} WRONG, skipped")
            return None
        return _time_us(skinny, op["copies"], rep)
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


def _time_linear(op: dict, rep: int) -> tuple[float, bool]:
    """(µs, correct) of F.linear (cuBLAS) on op's bf16 x and weight copies."""
    def linear(i: int) -> torch.Tensor:
        return F.linear(op["x"], op["wb"][i])
    return _time_us(linear, len(op["wb"]), rep), _correct(linear(0), op["ref"])


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


def _coarse(op: dict, configs: list[SkinnyConfig], timed: dict[SkinnyConfig, float],
            deadline: float = float("inf")) -> bool:
    """Times the configs not yet in ``timed`` with COARSE_REP; failures are left out. Past
    ``deadline`` (time.monotonic()) only the first config: returns False if any was left."""
    for j, cfg in enumerate(configs):
        if j > 0 and time.monotonic() > deadline:
            print(f"    budget spent: {len(configs) - j} configs not timed")
            return False
        if cfg not in timed and (us := _time_config(op, cfg, COARSE_REP)) is not None:
            timed[cfg] = us
    return True


def _progress(what: str, i: int, cases: list[dict], start: float) -> None:
    case = cases[i]
    print(f"[{time.monotonic() - start:5.0f}s] {what} {i + 1}/{len(cases)}: {case['name']} "
          f"N={case['n']} K={case['k']} M={case['m']}", flush=True)


def _refine(cases: list[dict], budget_s: float, start: float, strict: bool = False) -> None:
    """Pass 2 of a sweep: variants around each case's two fastest, in order, until budget_s
    (``strict``: also within a case)."""
    deadline = start + budget_s if strict else float("inf")
    for i, case in enumerate(cases):
        if time.monotonic() - start > budget_s:
            print(f"# budget of {budget_s:.0f} s spent: {len(cases) - i} cases not refined")
            break
        _progress("refine", i, cases, start)
        _coarse(case["op"], [v for c in _fastest(case["timed"], 2)
                             for v in variants(c, case["n"], case["k"])], case["timed"],
                deadline)


def _case_json(case: dict, default: SkinnyConfig, fine: dict[SkinnyConfig, float],
               others: dict[str, float | None], peak: float, elem_bytes: int = 1) -> dict:
    """One case's results; ``others``: baseline name (scaled_mm, cublas) → µs."""
    n, k = case["n"], case["k"]

    def stats(us: float | None) -> dict:
        gbs = elem_bytes * n * k / us / 1e3 if us else None
        return {"us": us, "weight_gbs": gbs, "copy_fraction": gbs / peak if gbs else None}

    best = _fastest(fine, 1)[0]
    return {"shape": case["name"], "n": n, "k": k, "m": case["m"],
            "best": {"config": dataclasses.asdict(best), **stats(fine[best])},
            "default": {"config": dataclasses.asdict(default), **stats(fine.get(default))},
            **{name: stats(us) for name, us in others.items()},
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

    for i, case in enumerate(cases):
        _progress("grid", i, cases, start)
        _coarse(case["op"], tile_configs(case["m"], case["n"], case["k"], sms), case["timed"])
    _refine(cases, args.budget_s, start)
    results, tuned = [], []
    for i, case in enumerate(cases):
        _progress("final", i, cases, start)
        default = default_config(case["m"], case["n"], case["k"], sms)
        fine = {c: us for c in {default, *_fastest(case["timed"], 3)}
                if (us := _time_config(case["op"], c, FINE_REP)) is not None}
        if not fine:
            print("    no config ran")
            continue
        smm = _time_scaled_mm(case["op"], FINE_REP)
        results.append(_case_json(case, default, fine, {"scaled_mm": smm[0] if smm else None},
                                  peak))
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


# ----------------------------------------------------------------------------- sweep bf16


def bf16_grid(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """The bf16 default config, then the pruned bf16 tile grid."""
    grid = tile_configs(m, n, k, sms, BF16_DOT_TILES, BF16_FMA_TILES, elem_bytes=2,
                        bx_only=True)
    return [default_config(m, n, k, sms, elem_bytes=2)] + grid


def _report_bf16(c: dict, sms: int) -> str | None:
    """Prints one case; returns its TUNED_16BIT line if the default is > 2% slower."""
    best, dflt, lin = c["best"], c["default"], c["cublas"]
    cfg = SkinnyConfig(**best["config"])
    nan = float("nan")
    print(f"{c['shape']:>8} M={c['m']:<3} best {_describe(cfg):<32} {best['us']:7.1f} µs "
          f"{100 * best['copy_fraction']:4.0f}% | default {dflt['us'] or nan:7.1f} µs | "
          f"F.linear {lin['us'] or nan:7.1f} µs {100 * (lin['copy_fraction'] or nan):4.0f}%"
          f"{'' if c['cublas_correct'] else ' WRONG'} | F.linear/best "
          f"{c['cublas_over_best'] or nan:5.2f}x" + ("" if c["grid_complete"] else
                                                     "  (grid cut by the budget)"))
    gain = (dflt["us"] or float("inf")) / best["us"]
    if gain <= 1.02:
        return None
    return (f"    ({sms}, {triton.next_power_of_2(c['m'])}, {c['n']}, {c['k']}): {cfg!r},"
            f"  # {gain:.2f}x the rule")


def _decode_step(results: list[dict]) -> dict[int, dict[str, float]]:
    """Per M with every shape timed: µs of one decode step's linears (LAYERS_8B × the four
    layer GEMMs + lm_head) with the best skinny configs, with F.linear, with the faster of
    the two per shape."""
    by_m: dict[int, dict[str, dict]] = {}
    for c in results:
        by_m.setdefault(c["m"], {})[c["shape"]] = c
    out = {}
    for m, cases in sorted(by_m.items()):
        if set(cases) != set(SHAPES_BF16) or any(c["cublas"]["us"] is None
                                                 for c in cases.values()):
            continue
        sums = {"skinny": 0.0, "cublas": 0.0, "faster": 0.0}
        for name, c in cases.items():
            times = c["best"]["us"], c["cublas"]["us"]
            count = 1 if name == "lm_head" else LAYERS_8B
            for key, us in zip(sums, (*times, min(times))):
                sums[key] += count * us
        out[m] = sums
    return out


def sweep_bf16(args: argparse.Namespace, l2: int, sms: int, peak: float, meta: dict) -> None:
    """bf16_gemm_small_m against F.linear (cuBLAS) on the Llama 3 8B linears: the default and
    the pruned grid, then refinement, within --budget-s; final timings with FINE_REP."""
    ms, start = args.m or SWEEP_MS, time.monotonic()
    deadline = start + args.budget_s
    ops = {name: _weights(n, k, l2, with_bf16=True, with_fp8=False)
           for name, (n, k) in SHAPES_BF16.items()}
    cases = [{"name": name, "m": m, "n": op["wb"][0].shape[0], "k": op["wb"][0].shape[1],
              "op": _with_activation_bf16(op, m), "timed": {}}
             for m in sorted(ms) for name, op in ops.items()]  # M = 1 first
    for i, case in enumerate(cases):
        _progress("grid", i, cases, start)
        case["grid_complete"] = _coarse(
            case["op"], bf16_grid(case["m"], case["n"], case["k"], sms), case["timed"],
            deadline)
    _refine(cases, args.budget_s, start, strict=True)
    results, tuned = [], []
    for i, case in enumerate(cases):
        _progress("final", i, cases, start)
        default = default_config(case["m"], case["n"], case["k"], sms, elem_bytes=2)
        fine = {c: us for c in {default, *_fastest(case["timed"], 2)}
                if (us := _time_config(case["op"], c, FINE_REP)) is not None}
        if not fine:
            print("    no config ran")
            continue
        lin_us, lin_ok = _time_linear(case["op"], FINE_REP)
        res = _case_json(case, default, fine, {"cublas": lin_us}, peak, elem_bytes=2)
        res.update(cublas_correct=lin_ok, cublas_over_best=lin_us / res["best"]["us"],
                   grid_complete=case["grid_complete"])
        results.append(res)
    print(f"\n# sweep took {time.monotonic() - start:.0f} s; copy {peak:.0f} GB/s; weight bytes "
          "2·N·K; F.linear/best > 1: the skinny GEMM is faster")
    for c in results:  # M = 1 first, as the cases
        if (line := _report_bf16(c, sms)) is not None:
            tuned.append(line)
    step = _decode_step(results)
    print(f"# one decode step's linears ({LAYERS_8B} × qkv, o_proj, gate_up, down + lm_head), µs:")
    for m, sums in step.items():
        print(f"    M={m:<3} skinny best {sums['skinny']:8.1f}  F.linear {sums['cublas']:8.1f}  "
              f"faster of the two per shape {sums['faster']:8.1f}  "
              f"(F.linear/skinny {sums['cublas'] / sums['skinny']:.3f}x)")
    print("# TUNED_16BIT entries for kestrel/kernels/fp8_gemm.py (the default is > 2% slower):")
    print("\n".join(tuned) or "    (none)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**meta, "mode": "sweep-bf16", "cases": results, "decode_step_us": step,
             "tuned_16bit": tuned}, indent=1))
        print(f"# wrote {args.json}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", help="batch rows (compare: 1 4 16; sweeps: "
                    f"{' '.join(map(str, SWEEP_MS))})")
    ap.add_argument("--quick", action="store_true", help="compare: default configs only")
    ap.add_argument("--rep", type=int, default=100, help="compare: ms of replays per timing")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="tune configs on 8B and 70B shapes")
    mode.add_argument("--sweep-bf16", action="store_true",
                      help="bf16_gemm_small_m vs F.linear on the 8B linears (tunes it too)")
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
