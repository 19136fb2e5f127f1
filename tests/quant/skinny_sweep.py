"""The tuning sweeps of bench_fp8_gemm.py (--sweep, --sweep-bf16): every (shape, M) through a
tile grid, refinement around the fastest within a time budget, then longer final timings; the
winners print as lines for kestrel.kernels.skinny_config's TUNED / TUNED_16BIT tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import triton

from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model
from kestrel.loader.dummy import preset_config
from tests.quant.skinny_timing import (
    SHAPES,
    describe,
    tile_configs,
    time_config,
    time_linear,
    time_scaled_mm,
    weights,
    with_activation,
    with_activation_bf16,
)

SHAPES_70B = {"70b_gate_up": (57344, 8192), "70b_down": (8192, 28672)}
SWEEP_MS = [1, 2, 4, 8, 16]
COARSE_REP, FINE_REP = 5, 20  # ms of graph replays per timing: ranking, reported figures



def bf16_shapes(preset: str, tp: int) -> tuple[dict[str, tuple[int, int]], int]:
    """--sweep-bf16's cases: one rank's linears of ``preset`` at tensor-parallel size ``tp``,
    name → (N, K) (column-parallel ones split N, row-parallel ones K), and the layer count. One
    decode step runs the first four once per layer and lm_head once."""
    c = preset_config(preset)
    q, kv = c.num_attention_heads * c.head_dim, max(1, c.num_key_value_heads // tp) * c.head_dim
    h, f = c.hidden_size, c.intermediate_size
    return {"qkv": (q // tp + 2 * kv, h), "o_proj": (h, q // tp), "gate_up": (2 * f // tp, h),
            "down": (h, f // tp), "lm_head": (-(-c.vocab_size // tp), h)}, c.num_hidden_layers

# bf16 tiles, K in elements: the FP8 winners at the same bytes per step and their neighbours.
# FMA rows shorter than 256·num_warps take broadcast_x only (it won every such FP8 case).
BF16_FMA_TILES = [(2, 2048, 8), (4, 1024, 4), (4, 512, 2), (8, 512, 4), (8, 256, 2),
                  (16, 128, 4), (16, 256, 4)]
BF16_DOT_TILES = [(32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4),
                  (128, 128, 8)]
BUDGET_S = {"sweep": 180.0, "sweep_bf16": 60.0}  # --budget-s defaults


def variants(c: SkinnyConfig, n: int, k: int) -> list[SkinnyConfig]:
    """Around one config: other pipeline depths, half / double / no split-K, evict-first,
    FMA tiles loaded a step ahead."""
    out = [dataclasses.replace(c, num_stages=s) for s in (1, 2, 4) if s != c.num_stages]
    k_steps = triton.cdiv(k, c.block_k)
    for split in {1, max(1, c.split_k // 2), min(k_steps // 2, 2 * c.split_k)} - {c.split_k}:
        if split >= 1:
            out.append(dataclasses.replace(c, split_k=split))
    out.append(dataclasses.replace(c, evict_first=True))
    return out + ([] if c.use_dot else [dataclasses.replace(c, prefetch=True)])


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
        if cfg not in timed and (us := time_config(op, cfg, COARSE_REP)) is not None:
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


def _tuned_line(c: dict, best: SkinnyConfig, sms: int) -> str | None:
    """The case's line for a TUNED table, if the rule's config is > 2% slower than ``best``."""
    gain = (c["default"]["us"] or float("inf")) / c["best"]["us"]
    if gain <= 1.02:
        return None
    return (f"    ({sms}, {triton.next_power_of_2(c['m'])}, {c['n']}, {c['k']}): {best!r},"
            f"  # {gain:.2f}x the rule")


def _report(c: dict, sms: int) -> str | None:
    """Prints one case's result; returns its TUNED line if the default is > 2% slower."""
    best, dflt = c["best"], c["default"]
    cfg, dcfg = SkinnyConfig(**best["config"]), SkinnyConfig(**dflt["config"])
    nan = float("nan")
    print(f"{c['shape']:>12} M={c['m']:<3} best {describe(cfg):<32} {best['us']:7.1f} µs "
          f"{100 * best['copy_fraction']:4.0f}% of copy | default {describe(dcfg):<32} "
          f"{dflt['us'] or nan:7.1f} µs | _scaled_mm {c['scaled_mm']['us'] or nan:7.1f} µs")
    return _tuned_line(c, cfg, sms)


def sweep(args: argparse.Namespace, l2: int, sms: int, peak: float, meta: dict) -> None:
    """Three passes over every (shape, M): the tile grid; refinement around each case's two
    fastest, M = 1 first, until --budget-s; default and the best three timed with FINE_REP."""
    ms, start = args.m or SWEEP_MS, time.monotonic()
    ops = {name: weights(n, k, l2, with_bf16=False)
           for name, (n, k) in {**SHAPES, **SHAPES_70B}.items()}
    cases = [{"name": name, "m": m, "n": op["wq"][0].shape[0], "k": op["wq"][0].shape[1],
              "op": with_activation(op, m), "timed": {}}
             for m in sorted(ms) for name, op in ops.items()]  # refinement priority order

    for i, case in enumerate(cases):
        _progress("grid", i, cases, start)
        _coarse(case["op"], tile_configs(case["m"], case["n"], case["k"], sms), case["timed"])
    _refine(cases, args.budget_s, start)
    results, tuned = [], []
    for i, case in enumerate(cases):
        _progress("final", i, cases, start)
        default = default_config(case["m"], case["n"], case["k"], sms, gpu=gpu_model("cuda", 0))
        fine = {c: us for c in {default, *_fastest(case["timed"], 3)}
                if (us := time_config(case["op"], c, FINE_REP)) is not None}
        if not fine:
            print("    no config ran")
            continue
        smm = time_scaled_mm(case["op"], FINE_REP)
        results.append(_case_json(case, default, fine, {"scaled_mm": smm[0] if smm else None},
                                  peak))
    print(f"\n# sweep took {time.monotonic() - start:.0f} s; copy {peak:.0f} GB/s")
    for c in sorted(results, key=lambda c: (c["n"] * c["k"], c["n"], c["m"])):
        if (line := _report(c, sms)) is not None:
            tuned.append(line)
    print("# TUNED entries for kestrel/kernels/skinny_config.py (the default is > 2% slower):")
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
    return [default_config(m, n, k, sms, elem_bytes=2, gpu=gpu_model("cuda", 0))] + grid


def _report_bf16(c: dict, sms: int) -> str | None:
    """Prints one case; returns its TUNED_16BIT line if the default is > 2% slower."""
    best, dflt, lin = c["best"], c["default"], c["cublas"]
    cfg = SkinnyConfig(**best["config"])
    nan = float("nan")
    print(f"{c['shape']:>8} M={c['m']:<3} best {describe(cfg):<32} {best['us']:7.1f} µs "
          f"{100 * best['copy_fraction']:4.0f}% | default {dflt['us'] or nan:7.1f} µs | "
          f"F.linear {lin['us'] or nan:7.1f} µs {100 * (lin['copy_fraction'] or nan):4.0f}%"
          f"{'' if c['cublas_correct'] else ' WRONG'} | F.linear/best "
          f"{c['cublas_over_best'] or nan:5.2f}x" + ("" if c["grid_complete"] else
                                                     "  (grid cut by the budget)"))
    return _tuned_line(c, cfg, sms)


def _decode_step(results: list[dict], names: set[str], layers: int
                 ) -> dict[int, dict[str, float]]:
    """Per M with every shape timed: µs of one decode step's linears (``layers`` × the four
    layer GEMMs + lm_head) with the best skinny configs, with F.linear, with the faster of
    the two per shape."""
    by_m: dict[int, dict[str, dict]] = {}
    for c in results:
        by_m.setdefault(c["m"], {})[c["shape"]] = c
    out = {}
    for m, cases in sorted(by_m.items()):
        if set(cases) != set(names) or any(c["cublas"]["us"] is None
                                                 for c in cases.values()):
            continue
        sums = {"skinny": 0.0, "cublas": 0.0, "faster": 0.0}
        for name, c in cases.items():
            times = c["best"]["us"], c["cublas"]["us"]
            count = 1 if name == "lm_head" else layers
            for key, us in zip(sums, (*times, min(times))):
                sums[key] += count * us
        out[m] = sums
    return out


def sweep_bf16(args: argparse.Namespace, l2: int, sms: int, peak: float, meta: dict) -> None:
    """bf16_gemm_small_m against F.linear (cuBLAS) on one rank's linears of --preset at --tp:
    the default and the pruned grid, then refinement, within --budget-s; final timings with
    FINE_REP."""
    shapes, layers = bf16_shapes(args.preset, args.tp)
    ms, start = args.m or SWEEP_MS, time.monotonic()
    deadline = start + args.budget_s
    ops = {name: weights(n, k, l2, with_bf16=True, with_fp8=False)
           for name, (n, k) in shapes.items()}
    cases = [{"name": name, "m": m, "n": op["wb"][0].shape[0], "k": op["wb"][0].shape[1],
              "op": with_activation_bf16(op, m), "timed": {}}
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
        default = default_config(case["m"], case["n"], case["k"], sms, elem_bytes=2,
                                 gpu=gpu_model("cuda", 0))
        fine = {c: us for c in {default, *_fastest(case["timed"], 2)}
                if (us := time_config(case["op"], c, FINE_REP)) is not None}
        if not fine:
            print("    no config ran")
            continue
        lin_us, lin_ok = time_linear(case["op"], FINE_REP)
        res = _case_json(case, default, fine, {"cublas": lin_us}, peak, elem_bytes=2)
        res.update(cublas_correct=lin_ok, cublas_over_best=lin_us / res["best"]["us"],
                   grid_complete=case["grid_complete"])
        results.append(res)
    print(f"\n# sweep took {time.monotonic() - start:.0f} s; copy {peak:.0f} GB/s; weight bytes "
          "2·N·K; F.linear/best > 1: the skinny GEMM is faster")
    for c in results:  # M = 1 first, as the cases
        if (line := _report_bf16(c, sms)) is not None:
            tuned.append(line)
    step = _decode_step(results, set(shapes), layers)
    print(f"# one decode step's linears ({layers} × qkv, o_proj, gate_up, down + lm_head), µs:")
    for m, sums in step.items():
        print(f"    M={m:<3} skinny best {sums['skinny']:8.1f}  F.linear {sums['cublas']:8.1f}  "
              f"faster of the two per shape {sums['faster']:8.1f}  "
              f"(F.linear/skinny {sums['cublas'] / sums['skinny']:.3f}x)")
    print("# TUNED_16BIT entries for kestrel/kernels/skinny_config.py (the default is > 2% slower):")
    print("\n".join(tuned) or "    (none)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**meta, "mode": "sweep-bf16", "cases": results, "decode_step_us": step,
             "tuned_16bit": tuned}, indent=1))
        print(f"# wrote {args.json}")
