"""Offline throughput: N requests handed to the engine at once, continuous batching does the rest.

Output tokens/s, total (prompt + output) tokens/s and requests/min over the wall time from the
first request in to the last one out. Latency statistics come from the engine's own per-request
timestamps (every request arrives at the start, so TTFT includes queueing).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kestrel.bench.metrics import RequestRecord, aggregate
from kestrel.bench.report import startup_rows
from kestrel.bench.roofline import synchronize
from kestrel.bench.workloads import Workload, make_prompts
from kestrel.sampling_params import SamplingParams


def build_requests(llm: Any, workload: Workload, seed: int = 0, source: str = "random",
                   text: str | None = None) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request, lengths drawn from the workload."""
    engine = llm.engine
    lengths = workload.lengths(seed)
    max_len = engine.cfg.scheduler.max_model_len
    too_long = [(i, o) for i, o in lengths if i + o > max_len]
    if too_long:
        raise ValueError(f"workload {workload.name!r}: {len(too_long)} requests need more than "
                         f"max_model_len={max_len} tokens (e.g. {too_long[0][0]} + "
                         f"{too_long[0][1]}); use --input-len/--output-len or a larger context")
    prompts = make_prompts([i for i, _ in lengths], engine.cfg.model_config.vocab_size, source,
                           seed, engine.tokenizer, text)
    return [(p, o) for p, (_, o) in zip(prompts, lengths)]


def record_from_output(out: Any) -> RequestRecord:
    """An engine RequestOutput as the metrics module's RequestRecord."""
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    ok = m is not None and m.first_token_time is not None and m.finished_time is not None
    return RequestRecord(prompt_len=len(out.prompt_token_ids), output_len=n,
                         start=m.arrival_time if m else 0.0,
                         chunk_times=list(m.token_times) if m else [],
                         end=m.finished_time if ok else float("nan"), success=ok and n > 0,
                         error="" if ok else "no metrics from the engine")


def warm_up(llm: Any, requests: list[tuple[list[int], int]]) -> None:
    """A short request first: first calls pay for allocator growth and lazy initialization."""
    p, _ = requests[0]
    llm.generate([{"prompt_token_ids": p[:16]}], SamplingParams(max_tokens=2, ignore_eos=True))


def bench_throughput(llm: Any, requests: list[tuple[list[int], int]],
                     warmup: bool = True) -> dict:
    if not requests:
        raise ValueError("no requests to run")
    device = torch.device(llm.engine.cfg.device)
    if warmup:
        warm_up(llm, requests)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0)
              for _, o in requests]
    stats = llm.engine.stats
    steps0, pre0 = stats.num_steps, stats.num_preemptions
    drafted0, accepted0 = stats.num_draft_tokens, stats.num_accepted_tokens
    synchronize(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    res = aggregate([record_from_output(o) for o in outs], elapsed)
    res["elapsed_s"] = elapsed
    res["engine_steps"] = stats.num_steps - steps0
    res["preemptions"] = stats.num_preemptions - pre0
    if llm.engine.cfg.speculative.method is not None:  # guesses verified, and kept
        res["spec_draft_tokens"] = stats.num_draft_tokens - drafted0
        res["spec_accepted_tokens"] = stats.num_accepted_tokens - accepted0
    return res


def roofline_estimate(engine: Any, res: dict, ceilings: dict) -> float:
    """Output tokens/s the roofline model (``kestrel plan``) predicts for this run: the same
    model, layout, precision, step budget, concurrency cap and KV capacity, the run's mean
    lengths, and the ceilings measured on this device."""
    from kestrel.parallel.plan import Cluster, GpuSpec, Workload as PlanWorkload, estimate

    cfg = engine.cfg
    flops = ceilings["matmul_flops"]
    bf16 = flops.get("bfloat16") or flops.get("float32")
    gpu = GpuSpec(cfg.device, float("inf"), float(ceilings["copy_bandwidth_Bps"]), float(bf16),
                  float(flops.get("fp8_rowwise") or bf16), measured=True)
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    n = max(1, res["completed"])
    wl = PlanWorkload("measured", round(res["total_input_tokens"] / n),
                      round(res["total_output_tokens"] / n),
                      min(n, cfg.scheduler.max_num_seqs), cfg.scheduler.max_num_batched_tokens)
    prec = "fp8" if (cfg.quant.method or "").startswith("fp8") else "bf16"
    kv = engine.executor.num_blocks * cfg.cache.block_size
    kv_elem = 1 if cfg.cache.kv_cache_dtype != "auto" else 2
    return estimate(cfg.model_config, Cluster(gpu, tp * pp, tp * pp), wl, tp, pp, prec,
                    kv_tokens=kv, kv_elem_bytes=kv_elem).throughput


def throughput_rows(res: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("requests (completed / failed)", f"{res['completed']} / {res['failed']}"),
        ("elapsed (s)", res["duration_s"]),
        ("input / output tokens", f"{res['total_input_tokens']} / {res['total_output_tokens']}"),
        ("output tokens/s", res["output_throughput"]),
        ("total tokens/s", res["total_token_throughput"]),
        ("requests/min", res["requests_per_min"]),
        ("TTFT median (ms)", res["ttft_ms"]["median"]),
        ("TPOT median (ms)", res["tpot_ms"]["median"]),
    ]
    if "max_num_batched_tokens" in res:
        rows.append(("step token budget / max sequences",
                     f"{res['max_num_batched_tokens']} / {res['max_num_seqs']}"))
    rows += startup_rows(res)
    if "spec_draft_tokens" in res:
        drafted, kept = res["spec_draft_tokens"], res["spec_accepted_tokens"]
        rows.append(("speculative guesses verified / kept",
                     f"{drafted} / {kept} ({kept / drafted if drafted else 0:.1%})"))
    if "roofline_output_throughput" in res:
        rows += [("roofline estimate output tokens/s", res["roofline_output_throughput"]),
                 ("output tokens/s / estimate", res["roofline_fraction"])]
    if "hf" in res:
        rows += [("HF generate output tokens/s", res["hf"]["output_throughput"]),
                 ("speed-up vs HF (tokens/s ratio)", res["speedup_vs_hf"])]
    return rows
