"""`kestrel bench roofline|latency|throughput|serve|sweep`: every speed claim as a command."""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path
from typing import Any

from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: roofline, latency, throughput, serve, sweep")
    from kestrel.bench.report import RecordingSubParsers

    p.set_defaults(_argv_prefix=["bench"])
    bsub = p.add_subparsers(dest="bench_command", required=True, action=RecordingSubParsers)
    _roofline_parser(bsub)
    _latency_parser(bsub)
    _throughput_parser(bsub)
    _serve_parser(bsub)
    _sweep_parser(bsub)


def _add(bsub: Any, name: str, help_: str) -> argparse.ArgumentParser:
    p = bsub.add_parser(name, help=help_, allow_abbrev=False)
    p.add_argument("--json", dest="json_path", default=None, help="write the result here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); on a CPU shared with other "
                        "jobs, 1 avoids OpenMP threads waiting on descheduled peers")
    return p


def set_threads(ns: Any) -> None:
    """Apply --threads before anything runs (results name the count in their device)."""
    n = getattr(ns, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _roofline_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}copy-mib", type=int, nargs="+", default=None,
                   help="copy buffer sizes (MiB) to try")
    p.add_argument(f"--{prefix}matmul-n", type=int, nargs="+", default=None,
                   help="square matmul sizes to try")
    p.add_argument(f"--{prefix}iters", type=int, default=3)


def _roofline_parser(bsub: Any) -> None:
    p = _add(bsub, "roofline", "the device's copy bandwidth and matmul ceilings")
    p.add_argument("--device", default=None)
    _roofline_args(p)
    p.set_defaults(func=run_roofline)


def _lengths_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", "--input", dest="input_len", type=int, default=None)
    p.add_argument("--output-len", "--output", dest="output_len", type=int, default=None)


def _latency_parser(bsub: Any) -> None:
    p = _add(bsub, "latency", "one batch: prefill time, time per output token, tokens/s")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=1)
    _lengths_args(p)
    p.add_argument("--iters", dest="bench_iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rest", dest="rest_s", type=float, default=0.0, metavar="S",
                   help="seconds the device idles before each timed run (a GPU at its power "
                        "limit runs a long prefill slower right after another one)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the ceilings")
    p.add_argument("--ceilings", default=None, metavar="JSON",
                   help="ceilings from an earlier `bench roofline --json` on this device")
    _roofline_args(p, "roofline-")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    add_engine_cli_args(p)
    p.set_defaults(func=run_latency)


def _workload_args(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default=default, help="llama3-paper, trtllm-2k-128, "
                   "trtllm-32k-2k, trtllm-120k-2k, mixed-100-1024, chat")
    g.add_argument("--num-prompts", type=int, default=None)
    _lengths_args(g)
    g.add_argument("--prompt-source", choices=["random", "text"], default="random")
    g.add_argument("--text", default=None, help="text file for --prompt-source text "
                   "(default: pydoc topics)")
    g.add_argument("--workload-seed", type=int, default=0)


def _throughput_parser(bsub: Any) -> None:
    p = _add(bsub, "throughput", "N requests through the engine: tokens/s, requests/min")
    _workload_args(p, "mixed-100-1024")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--ceilings", default=None, metavar="JSON",
                   help="`bench roofline --json` of this device: adds the roofline estimate")
    add_engine_cli_args(p)
    p.set_defaults(func=run_throughput)


def _client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving client")
    g.add_argument("--endpoint", default="/v1/completions")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--prompt-format", choices=["ids", "text"], default="ids")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="random prompts without a tokenizer draw ids below this")
    g.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:10000")
    g.add_argument("--gpu-hour-price", type=float, default=None, help="$ per GPU-hour")
    g.add_argument("--num-gpus", type=int, default=1)
    g.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _serve_parser(bsub: Any) -> None:
    from kestrel.bench.cli_serve import run_serve

    p = _add(bsub, "serve", "client benchmark of any OpenAI-compatible server")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for prompts (default: the default model's)")
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--max-concurrency", type=int, default=None)
    _workload_args(p, "mixed-100-1024")
    _client_args(p)
    p.set_defaults(func=run_serve)


def _sweep_parser(bsub: Any) -> None:
    from kestrel.bench.cli_serve import run_sweep

    p = _add(bsub, "sweep", "throughput-latency curves over load, several configs, PNG")
    p.add_argument("--server", action="append", default=[], metavar="LABEL=URL",
                   help="benchmark a running server (repeat for several curves)")
    p.add_argument("--request-rates", default=None, help="e.g. 1,2,4,inf (server mode)")
    p.add_argument("--concurrencies", default=None, help="e.g. 1,4,16 (server mode)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=FLAGS",
                   help='in-process engine variant, e.g. "fp8=--quantization fp8"')
    p.add_argument("--batch-sizes", default="1,2,4,8", help="in-process mode")
    p.add_argument("--iters", dest="bench_iters", type=int, default=2)
    p.add_argument("--plot", default="bench-sweep.png")
    p.add_argument("--no-roofline", action="store_true")
    _workload_args(p, "mixed-100-1024")
    _client_args(p)
    add_engine_cli_args(p)
    p.set_defaults(func=run_sweep, _parser=p)


# ---------------------------------------------------------------------------- commands


def _finish(ns: Any, title: str, res: dict, rows: list, device: str | None) -> dict:
    from kestrel.bench.report import environment, print_table, write_json

    res["env"] = environment(device, getattr(ns, "_argv", None))
    print_table(title, rows, res["env"])
    write_json(res, ns.json_path)
    return res


def _ceilings(ns: Any, device: str, prefix: str = "roofline_") -> dict | None:
    if getattr(ns, "no_roofline", False):
        return None
    if getattr(ns, "ceilings", None):
        return _load_ceilings(ns.ceilings)
    from kestrel.bench.roofline import measure_roofline

    return measure_roofline(device, getattr(ns, f"{prefix}copy_mib", None),
                            getattr(ns, f"{prefix}matmul_n", None),
                            getattr(ns, f"{prefix}iters", 3))


def _load_ceilings(path: str) -> dict:
    """Ceilings from a `bench roofline --json` file: measure once, then run many benchmarks."""
    import json

    try:
        res = json.loads(Path(path).read_text())
        _ = res["copy_bandwidth_Bps"], res["matmul_flops"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--ceilings {path}: not a `kestrel bench roofline --json` file ({e})")
    res.pop("env", None)
    return res


def run_roofline(ns: Any) -> int:
    import torch

    from kestrel.bench.roofline import measure_roofline, roofline_rows

    set_threads(ns)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = measure_roofline(device, ns.copy_mib, ns.matmul_n, ns.iters)
    _finish(ns, "roofline", res, roofline_rows(res), device)
    return 0


def _engine_args(ns: Any, tokens: int, seqs: int) -> Any:
    """Engine args with a token budget and sequence cap that fit the whole batch in a step."""
    args = engine_args_from_cli(ns)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = max(2048, tokens)
    args.max_num_seqs = max(args.max_num_seqs, seqs)
    return args


def _release(llm: Any) -> Any:
    """Free an engine's KV cache; the caller then drops its last reference and calls
    ``_collect`` so a baseline model fits where the engine was. Returns the engine's config."""
    llm.engine.executor.shutdown()
    return llm.engine.cfg


def _collect() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_latency(ns: Any) -> int:
    from kestrel.bench.latency import bench_latency, latency_rows
    from kestrel.engine.engine import heap_frozen
    from kestrel.engine.llm import LLM

    set_threads(ns)
    i_len, o_len = ns.input_len or 32, ns.output_len or 16
    t0 = time.perf_counter()
    llm = LLM(**vars(_engine_args(ns, ns.batch * i_len, ns.batch)))
    startup = time.perf_counter() - t0  # load, KV sizing, graph capture: until it can serve
    device = llm.engine.cfg.device
    ceilings = _ceilings(ns, device)
    with heap_frozen():
        res = bench_latency(llm, ns.batch, i_len, o_len, ns.bench_iters, ns.warmup, ns.seed,
                            ceilings, ns.rest_s)
    res["startup_s"] = startup
    res["startup_phases_s"] = getattr(llm.engine.executor, "startup_phases", None)
    res["model"], res["dtype"] = llm.engine.cfg.model, str(llm.engine.cfg.dtype)
    res["quantization"] = llm.engine.cfg.quant.method
    res["kv_cache_dtype"] = llm.engine.cfg.cache.kv_cache_dtype
    if ns.baseline == "hf":
        from kestrel.bench.hf_baseline import hf_latency, load_hf_model
        from kestrel.bench.workloads import random_prompts

        cfg = _release(llm)
        del llm
        _collect()
        prompts = random_prompts([i_len] * ns.batch, cfg.model_config.vocab_size, ns.seed)
        res["hf"] = hf_latency(load_hf_model(cfg), prompts, o_len, ns.bench_iters)
        res["speedup_vs_hf"] = res["tokens_per_s"] / res["hf"]["tokens_per_s"]
    _finish(ns, "latency", res, latency_rows(res), device)
    return 0


def _workload(ns: Any) -> Any:
    from kestrel.bench.workloads import get_workload

    return get_workload(ns.workload).with_overrides(ns.num_prompts, ns.input_len, ns.output_len)


def run_throughput(ns: Any) -> int:
    from kestrel.bench.throughput import bench_throughput, build_requests, throughput_rows
    from kestrel.engine.engine import heap_frozen
    from kestrel.engine.llm import LLM

    set_threads(ns)
    wl = _workload(ns)
    t0 = time.perf_counter()
    llm = LLM(**vars(engine_args_from_cli(ns)))
    startup = time.perf_counter() - t0
    device = llm.engine.cfg.device
    reqs = build_requests(llm, wl, ns.workload_seed, ns.prompt_source, ns.text)
    with heap_frozen():
        res = bench_throughput(llm, reqs)
    res.update({"startup_s": startup,
                "startup_phases_s": getattr(llm.engine.executor, "startup_phases", None),
                "workload": wl.name, "num_prompts": wl.num_prompts,
                "model": llm.engine.cfg.model, "dtype": str(llm.engine.cfg.dtype),
                "quantization": llm.engine.cfg.quant.method,
                "kv_cache_dtype": llm.engine.cfg.cache.kv_cache_dtype,
                "max_num_batched_tokens": llm.engine.cfg.scheduler.max_num_batched_tokens,
                "max_num_seqs": llm.engine.cfg.scheduler.max_num_seqs})
    if ns.ceilings:
        from kestrel.bench.throughput import roofline_estimate

        est = roofline_estimate(llm.engine, res, _load_ceilings(ns.ceilings))
        res["roofline_output_throughput"] = est
        res["roofline_fraction"] = res["output_throughput"] / est if est > 0 else None
    if ns.baseline == "hf":
        from kestrel.bench.hf_baseline import hf_throughput, load_hf_model

        cfg = _release(llm)
        del llm
        _collect()
        res["hf"] = hf_throughput(load_hf_model(cfg), reqs, ns.hf_batch_size)
        res["speedup_vs_hf"] = res["output_throughput"] / res["hf"]["output_throughput"]
    _finish(ns, f"throughput: {wl.name}", res, throughput_rows(res), device)
    return 0
