"""`kestrel plan`: which TP × PP layouts fit a model on N GPUs, and which is fastest.

    kestrel plan --model llama-3.1-405b --gpus 16 --gpus-per-node 8 --gpu h100 \\
        --workload llama3-paper --objective throughput

``--validate MANIFEST`` compares the model's predictions with measured benchmark JSON files
(scripts/parallel_check.sh writes the manifest) and prints the error of each.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kestrel.config import ModelConfig
from kestrel.parallel.plan import (GB, Cluster, Estimate, Workload, best, estimate, gpu_spec,
                                   plan)


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="which tensor/pipeline-parallel layouts fit, and how fast",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="llama-3.1-405b",
                   help="preset name (e.g. llama-3.1-405b) or a Hugging Face model folder")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine (NVLink)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200"])
    p.add_argument("--workload", default="llama3-paper",
                   help="a bench workload name (llama3-paper, trtllm-2k-128, ...)")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--precision", default="both", choices=["bf16", "fp8", "both"])
    p.add_argument("--layout", default=None, help="only this layout, e.g. 8x2 (TP x PP)")
    p.add_argument("--micro-batches", type=int, default=None, help="default: the PP size")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="auto: a BF16 KV cache; fp8: half the bytes per cached token")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--roofline", default=None,
                   help="JSON from `kestrel bench roofline --json` (default: datasheet x "
                        "efficiency)")
    p.add_argument("--nvlink-gbps", type=float, default=450.0,
                   help="NVLink GB/s per GPU, one direction")
    p.add_argument("--internode-gbps", type=float, default=50.0,
                   help="inter-machine GB/s per GPU (400 Gb/s NIC: 50)")
    p.add_argument("--nvlink-latency-us", type=float, default=8.0)
    p.add_argument("--internode-latency-us", type=float, default=20.0)
    p.add_argument("--step-overhead-ms", type=float, default=0.0,
                   help="host time per engine step (scheduling, launches, sampling)")
    p.add_argument("--layer-overhead-us", type=float, default=0.0,
                   help="GPU time per decoder layer of small kernels that bytes and FLOPs do "
                        "not count (measured: ~20 on an H200 at batch 1; default: none)")
    p.add_argument("--json", dest="json_path", default=None, help="write the estimates here")
    p.add_argument("--validate", default=None, metavar="MANIFEST",
                   help="compare predictions with measured runs listed in this JSON file")
    p.set_defaults(func=run_plan)


def model_config(name: str) -> ModelConfig:
    from kestrel.loader.dummy import PRESETS, preset_config
    from kestrel.loader.hf import load_model_config

    if name in PRESETS:
        return preset_config(name)
    if Path(name).is_dir():
        return load_model_config(name)
    raise ValueError(f"--model {name!r}: neither a preset ({sorted(PRESETS)}) nor a folder")


def workload(ns: Any) -> Workload:
    from kestrel.bench.workloads import WORKLOADS

    if ns.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {ns.workload!r}; known: {sorted(WORKLOADS)}")
    lengths = WORKLOADS[ns.workload].lengths()
    ins = ns.input_len or round(sum(i for i, _ in lengths) / len(lengths))
    outs = ns.output_len or round(sum(o for _, o in lengths) / len(lengths))
    return Workload(ns.workload, ins, outs, ns.max_num_seqs, ns.max_num_batched_tokens)


def cluster(ns: Any, num_gpus: int | None = None, roofline: dict | None = None) -> Cluster:
    if roofline is None and ns.roofline:
        roofline = json.loads(Path(ns.roofline).read_text())
    return Cluster(gpu_spec(ns.gpu, roofline), num_gpus or ns.gpus, ns.gpus_per_node,
                   nvlink_bw=ns.nvlink_gbps * GB, internode_bw=ns.internode_gbps * GB,
                   nvlink_latency=ns.nvlink_latency_us * 1e-6,
                   internode_latency=ns.internode_latency_us * 1e-6,
                   step_overhead=ns.step_overhead_ms * 1e-3,
                   layer_overhead=ns.layer_overhead_us * 1e-6)


def _layout_arg(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        tp, pp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--layout {text!r}: write TPxPP, e.g. 8x2") from None
    return tp, pp


def run_plan(ns: Any) -> int:
    if ns.validate:
        return run_validate(ns)
    cfg = model_config(ns.model)
    cl, wl = cluster(ns), workload(ns)
    precisions = ("bf16", "fp8") if ns.precision == "both" else (ns.precision,)
    ests = plan(cfg, cl, wl, precisions, ns.micro_batches, _layout_arg(ns.layout),
                kv_elem_bytes=1 if ns.kv_cache_dtype == "fp8" else 2)
    print(header(ns, cfg, cl, wl))
    for prec in precisions:
        rows = [e for e in ests if e.precision == prec]
        print(table(rows, prec))
        print(verdict(rows, prec, cl, ns.objective))
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(
            {"model": ns.model, "gpu": cl.gpu.name, "gpus": cl.num_gpus,
             "gpus_per_node": cl.gpus_per_node, "workload": asdict(wl),
             "objective": ns.objective, "estimates": [_clean(asdict(e)) for e in ests]},
            indent=2) + "\n")
    return 0


def header(ns: Any, cfg: ModelConfig, cl: Cluster, wl: Workload) -> str:
    g = cl.gpu
    src = "measured by bench roofline" if g.measured else "datasheet x efficiency"
    return (f"kestrel plan: {ns.model} ({cfg.num_params() / 1e9:.0f}B parameters) on "
            f"{cl.num_gpus} x {g.name} ({cl.gpus_per_node} per machine)\n"
            f"  ceilings ({src}): {g.bandwidth / 1e12:.2f} TB/s, BF16 {g.bf16_flops / 1e12:.0f} "
            f"TFLOP/s, FP8 {g.fp8_flops / 1e12:.0f} TFLOP/s; NVLink {cl.nvlink_bw / GB:.0f} GB/s,"
            f" inter-node {cl.internode_bw / GB:.0f} GB/s per GPU\n"
            f"  workload {wl.name}: {wl.input_len} in / {wl.output_len} out, up to "
            f"{wl.max_num_seqs} sequences, {wl.token_budget}-token prefill chunks; "
            f"KV cache {'FP8' if ns.kv_cache_dtype == 'fp8' else 'BF16'}; "
            f"objective: {ns.objective}\n")


def _f(x: float, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) \
        else f"{x * scale:,.{digits}f}"


def table(rows: list[Estimate], prec: str) -> str:
    head = ("| layout | fits | weights/GPU GB | KV tokens | batch | TTFT ms | TPOT ms | "
            "e2e s (1 req) | out tok/s (full load) | micro-batches | prefill bubble |")
    lines = [f"{prec.upper()}:", "", head, "|" + "---|" * 11]
    for e in rows:
        if not e.fits:
            lines.append(f"| {e.label} | no: {e.reason} |" + " |" * 9)
            continue
        lines.append(f"| {e.label} | yes | {_f(e.weight_bytes, 1 / GB, 1)} | {e.kv_tokens:,} | "
                     f"{e.concurrency} | {_f(e.ttft, 1e3)} | {_f(e.tpot, 1e3, 1)} | "
                     f"{_f(e.e2e, 1, 1)} | {_f(e.throughput)} | {e.micro_batches} | "
                     f"{e.bubble:.2f} |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[Estimate], prec: str, cl: Cluster, objective: str) -> str:
    fit = [e for e in rows if e.fits]
    where = f"{cl.num_gpus} x {cl.gpu.name}"
    if not fit:
        return f"{prec.upper()}: does not fit on {where} in any layout.\n"
    lat, tput = best(rows, "latency"), best(rows, "throughput")
    pick = lat if objective == "latency" else tput
    return (f"{prec.upper()}: fits on {where} ({len(fit)} of {len(rows)} layouts). Lowest "
            f"latency: {lat.label} ({_f(lat.tpot, 1e3, 1)} ms/token); highest throughput: "
            f"{tput.label} ({_f(tput.throughput)} tokens/s). For {objective}: {pick.label}.\n")


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# ---- validation against measured runs --------------------------------------------------------

def run_validate(ns: Any) -> int:
    """Each manifest entry: {"kind": "latency"|"throughput", "file", "model", "tp", "pp",
    "gpus_per_node"?, "max_num_seqs"?}; the roofline JSON sits in "roofline"."""
    manifest = json.loads(Path(ns.validate).read_text())
    base = Path(ns.validate).parent
    roof = json.loads((base / manifest["roofline"]).read_text()) if manifest.get("roofline") \
        else None
    print("| run | layout | quantity | predicted | measured | error |")
    print("|---|---|---|---|---|---|")
    for entry in manifest["runs"]:
        path = base / entry["file"]
        if not path.is_file():
            print(f"| {entry['file']} | - | missing | - | - | - |")
            continue
        for qty, pred, meas in compare(entry, json.loads(path.read_text()), ns, roof):
            err = (pred - meas) / meas * 100 if meas else math.nan
            print(f"| {entry['file']} | TP{entry['tp']}xPP{entry['pp']} | {qty} | "
                  f"{pred:,.2f} | {meas:,.2f} | {err:+.0f}% |")
    return 0


def compare(entry: dict, res: dict, ns: Any, roof: dict | None) -> list[tuple[str, float, float]]:
    """(quantity, predicted, measured) for one benchmark result."""
    cfg = model_config(entry["model"])
    tp, pp = entry["tp"], entry["pp"]
    cl = cluster(ns, tp * pp, roof)
    prec = "fp8" if (res.get("quantization") or entry.get("quantization") or "").startswith(
        "fp8") else "bf16"
    if entry["kind"] == "latency":
        wl = Workload("measured", res["input_len"], res["output_len"], res.get("batch", 1),
                      entry.get("max_num_batched_tokens", 2048))
        e = estimate(cfg, cl, wl, tp, pp, prec)
        return [("TPOT ms", e.tpot * 1e3, res["tpot_s"] * 1e3),
                ("prefill ms", e.ttft * 1e3, res["prefill_time_s"] * 1e3)]
    n = max(1, res["completed"])
    wl = Workload("measured", round(res["total_input_tokens"] / n),
                  round(res["total_output_tokens"] / n), min(n, entry.get("max_num_seqs", 256)),
                  entry.get("max_num_batched_tokens", 2048))
    e = estimate(cfg, cl, wl, tp, pp, prec)
    return [("output tokens/s", e.throughput, res["output_throughput"])]
