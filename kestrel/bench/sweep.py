"""The same workload at increasing load → a throughput–latency curve per configuration.

Offline (in process): batch sizes through ``bench_latency`` for each engine configuration
(for example BF16 vs FP8), plotted as prefill and decode panels like Figure 27 of the Llama 3
paper. Against servers: request rates or concurrency caps through the serve client, one curve
per server (for example Kestrel vs vLLM), TTFT and TPOT panels.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kestrel.bench.report import plot_curves
from kestrel.bench.serve import ServeOptions, ServeRequest, run_serve


def parse_values(text: str, name: str, allow_inf: bool = False) -> list[float]:
    """"1,2,4,inf" → [1.0, 2.0, 4.0, inf], each > 0."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a number") from None
        if v <= 0 or (math.isinf(v) and not allow_inf) or math.isnan(v):
            raise ValueError(f"{name}: values must be positive{' (or inf)' if allow_inf else ''}"
                             f", got {part!r}")
        out.append(v)
    if not out:
        raise ValueError(f"{name}: give at least one value")
    return out


def parse_labeled(items: list[str], what: str) -> dict[str, str]:
    """["bf16=--dtype bfloat16", "fp8=-q fp8"] → {label: value}; labels must be distinct."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not label.strip():
            raise ValueError(f"bad {what} {item!r}: write LABEL=VALUE")
        if label in out:
            raise ValueError(f"{what} label {label!r} given twice")
        out[label.strip()] = value.strip()
    return out


def sweep_offline(configs: dict[str, Any], batch_sizes: list[int], input_len: int,
                  output_len: int, iters: int, ceilings: dict | None) -> dict:
    """``configs``: label → EngineArgs. One engine per configuration, all batch sizes on it."""
    from kestrel.bench.latency import bench_latency
    from kestrel.engine.llm import LLM

    points = []
    for label, args in configs.items():
        budget = args.max_num_batched_tokens or max(2048, max(batch_sizes) * input_len)
        args = dataclasses.replace(args, max_num_batched_tokens=budget,
                                   max_num_seqs=max(args.max_num_seqs, max(batch_sizes)))
        llm = LLM(**vars(args))
        for b in batch_sizes:
            res = bench_latency(llm, b, input_len, output_len, iters=iters, ceilings=ceilings)
            res.pop("ceilings", None)
            points.append({"config": label, "x": b, **res})
        llm.engine.executor.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():  # the next engine sizes its KV cache from free memory
            torch.cuda.empty_cache()
    return {"mode": "batch", "input_len": input_len, "output_len": output_len,
            "points": points}


def sweep_servers(servers: dict[str, ServeOptions], requests: Callable[[int], list[ServeRequest]],
                  values: list[float], mode: str, slo: dict[str, float] | None = None,
                  gpu_hour_price: float | None = None, num_gpus: int = 1) -> dict:
    """``mode``: "rate" (requests/s) or "concurrency" (requests in flight). ``requests(i)``:
    the requests of the i-th value, each server the same ones; fresh prompts per value, or every
    point after the first would find its prompts in the server's prefix cache."""
    if mode not in ("rate", "concurrency"):
        raise ValueError(f"unknown sweep mode {mode!r}")
    points = []
    for label, base in servers.items():
        for i, v in enumerate(values):
            opts = (dataclasses.replace(base, request_rate=v) if mode == "rate" else
                    dataclasses.replace(base, max_concurrency=int(v), request_rate=math.inf))
            res = run_serve(opts, requests(i), slo, gpu_hour_price, num_gpus)
            points.append({"config": label, "x": v, **res})
    return {"mode": mode, "points": points}


def _curves(points: list[dict], xkey: str, ykey: str, xscale: float = 1.0) -> dict:
    curves: dict[str, tuple[list, list, list]] = {}
    for p in points:
        x, y = _get(p, xkey), _get(p, ykey)
        if x is None or y is None:
            continue
        xs, ys, names = curves.setdefault(p["config"], ([], [], []))
        xs.append(x * xscale)
        ys.append(y)
        names.append(_point_name(p["x"]))
    return curves


def _get(p: dict, key: str) -> Any:
    for part in key.split("."):
        p = p.get(part) if isinstance(p, dict) else None
    return p


def _point_name(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def plot_sweep(result: dict, path: str | Path, env: dict | None = None) -> Path:
    """Latency on x, throughput on y; each point labeled with its batch size, rate or cap."""
    pts = result["points"]
    if result["mode"] == "batch":
        panels = [
            {"xlabel": "prefill latency (ms)", "ylabel": "prefill tokens/s",
             "curves": _curves(pts, "prefill_time_s", "prefill_tokens_per_s", 1e3)},
            {"xlabel": "time per output token (ms)", "ylabel": "decode tokens/s",
             "curves": _curves(pts, "tpot_s", "decode_tokens_per_s", 1e3)},
        ]
        title = (f"throughput vs latency by batch size ({result['input_len']} in, "
                 f"{result['output_len']} out)")
    else:
        panels = [
            {"xlabel": "median TTFT (ms)", "ylabel": "output tokens/s",
             "curves": _curves(pts, "ttft_ms.median", "output_throughput")},
            {"xlabel": "median TPOT (ms)", "ylabel": "output tokens/s",
             "curves": _curves(pts, "tpot_ms.median", "output_throughput")},
        ]
        title = f"throughput vs latency by request {result['mode']}"
    return plot_curves(path, panels, title, env)


def sweep_table(result: dict) -> tuple[list[str], list[list[Any]]]:
    if result["mode"] == "batch":
        header = ["config", "batch", "prefill ms", "prefill tok/s", "TPOT ms", "decode tok/s",
                  "tok/s"]
        rows = [[p["config"], int(p["x"]), _ms(p["prefill_time_s"]),
                 p["prefill_tokens_per_s"], _ms(p["tpot_s"]), p["decode_tokens_per_s"],
                 p["tokens_per_s"]] for p in result["points"]]
        return header, rows
    header = ["config", result["mode"], "done/failed", "req/s", "out tok/s", "TTFT p50 ms",
              "TPOT p50 ms", "E2E p99 ms"]
    rows = [[p["config"], _point_name(p["x"]), f"{p['completed']}/{p['failed']}",
             p["request_throughput"], p["output_throughput"], p["ttft_ms"]["median"],
             p["tpot_ms"]["median"], p["e2e_ms"]["p99"]] for p in result["points"]]
    return header, rows


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3
