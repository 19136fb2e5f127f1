"""One batch through the engine, step by step: prefill time, time per output token, tokens/s.

Each step of the engine is timed from the host, as the interval between the calls that land
it (no extra synchronization, so overlapped steps are timed as they run). A step that computes
prompt tokens is a prefill step; one that only extends every request by a token is a decode step.
Time per output token is the mean over decode steps of the full batch: with long prompts,
requests admitted early decode while later ones prefill and finish early, so the last decode
steps run fewer requests (counting them as full batches overstated the bandwidth: 144% of the
copy rate at batch 32 × 16k on an H200). Raise the output length when the JSON reports no
full-batch decode step. From the model's shape we know what each kind of step must move and
compute:

- decode bytes per step = weight bytes (every linear weight and the LM head, as stored, so
  quantized weights count at their size) + KV bytes read (every cached token of every
  request: 2 · layers · kv_heads · head_dim · itemsize per token). Achieved bandwidth =
  bytes / step time, divided by the copy bandwidth ceiling.
- prefill FLOPs = 2 · linear params · tokens + the LM head on the last row of each request +
  causal attention (QKᵀ and PV: 2 · heads · head_dim · I · (I + 1) per request and layer),
  less what the last layer skips for the rows nobody reads (``prefill_flops``).
  Achieved FLOP/s divided by the matmul ceiling of the dtype the linear layers run in.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from kestrel.bench.report import startup_rows
from kestrel.bench.roofline import ceiling_kind, synchronize
from kestrel.bench.workloads import random_prompts
from kestrel.config import ModelConfig
from kestrel.sampling_params import SamplingParams


@dataclass
class StepTiming:
    seconds: float
    prompt_tokens: int  # prompt tokens computed in the step (0: a pure decode step)
    generation_tokens: int


def run_steps(engine: Any) -> tuple[list[StepTiming], float]:
    """Step the engine until idle; each step is the wall time between step() calls, given to
    the work that landed in that call (with overlapped steps the call that launched a step
    returns before it ran, and the next one waits for it). Also the wall time of the loop."""
    device = torch.device(engine.cfg.device)
    stats = engine.stats
    steps: list[StepTiming] = []
    synchronize(device)
    t_start = t_prev = time.perf_counter()
    carry = 0.0  # calls that landed nothing (the first launch): added to the next landing
    while engine.has_unfinished_requests():
        p0, g0 = stats.landed_prompt_tokens, stats.landed_generation_tokens
        engine.step()
        t = time.perf_counter()
        dt, t_prev = carry + t - t_prev, t
        p, g = stats.landed_prompt_tokens - p0, stats.landed_generation_tokens - g0
        if p == 0 and g == 0:
            carry = dt
            continue
        carry = 0.0
        steps.append(StepTiming(dt, p, g))
    synchronize(device)
    return steps, time.perf_counter() - t_start


def weight_bytes(engine: Any) -> int:
    """Bytes of weights one decode step reads: all parameters but an untied embedding table."""
    mcfg: ModelConfig = engine.cfg.model_config
    runner = getattr(engine.executor, "runner", None)
    if runner is None:  # multi-process executor: estimate from the shape and dtype
        return mcfg.num_params() * engine.cfg.dtype.itemsize
    total = 0
    for name, p in runner.model.named_parameters():
        if "embed_tokens" in name and not mcfg.tie_word_embeddings:
            continue  # a lookup reads one row per token, not the table
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(engine: Any) -> int:
    mcfg: ModelConfig = engine.cfg.model_config
    runner = getattr(engine.executor, "runner", None)
    itemsize = runner.kv_dtype().itemsize if runner is not None else engine.cfg.dtype.itemsize
    return 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * mcfg.head_dim * itemsize


def linear_params(mcfg: ModelConfig) -> int:
    """Weights of the decoder layers' matmuls (embedding lookup and LM head not included)."""
    h = mcfg.hidden_size
    attn = h * (mcfg.q_size + 2 * mcfg.kv_size) + mcfg.q_size * h
    return mcfg.num_hidden_layers * (attn + 3 * h * mcfg.intermediate_size)


def prefill_flops(mcfg: ModelConfig, batch: int, input_len: int) -> float:
    """Matmul FLOPs of prefilling ``batch`` prompts of ``input_len`` tokens as the engine runs
    it on a GPU, so FLOP/s stays work done per second: every decoder layer's linears for every
    token, but the last layer's o_proj and MLP for each prompt's last token only (the rows
    whose output is read: LlamaForCausalLM.forward's ``keep``); causal attention in every
    layer but the last, whose attention is for the last token only (the Triton backend's
    ``forward_kept``); the LM head on one row per prompt."""
    tokens = batch * input_len
    h = mcfg.hidden_size
    skipped = (tokens - batch) * (mcfg.q_size * h + 3 * h * mcfg.intermediate_size)
    per_head = 2 * mcfg.head_dim * batch * ((mcfg.num_hidden_layers - 1) * input_len
                                            * (input_len + 1) + 2 * input_len)
    attn = mcfg.num_attention_heads * per_head
    head = 2 * mcfg.vocab_size * h * batch
    return 2.0 * (linear_params(mcfg) * tokens - skipped) + head + attn


def decode_bytes_per_step(engine: Any, batch: int, input_len: int, output_len: int) -> float:
    """Mean bytes per decode step: decode step k (1 .. O-1) reads I + k cached tokens each."""
    mean_ctx = input_len + output_len / 2.0  # mean of I + k over k = 1 .. O-1
    return weight_bytes(engine) + batch * mean_ctx * kv_bytes_per_token(engine)


def _one_iteration(llm: Any, prompts: list[list[int]], output_len: int) -> dict:
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0,
                            output_kind="final_only")  # the steps' outputs are not read
    # Every run computes its prompts in full: a warm-up or a sweep's smaller batch (same seeds)
    # left their prefixes cached, and hits made a sweep's prefill look faster than the GPU.
    engine.kv.pool.reset_prefix_cache()
    pre0 = engine.stats.num_preemptions
    for i, ids in enumerate(prompts):
        engine.add_request(f"bench-latency-{time.monotonic_ns()}-{i}", ids, params)
    steps, total = run_steps(engine)
    prefill = [s for s in steps if s.prompt_tokens > 0]
    decode = [s for s in steps if s.prompt_tokens == 0 and s.generation_tokens > 0]
    full = [s for s in decode if s.generation_tokens == len(prompts)]  # the whole batch
    return {"total_s": total, "prefill_s": sum(s.seconds for s in prefill),
            "prefill_steps": len(prefill), "decode_steps": len(decode),
            "full_batch_decode_steps": len(full),
            "tpot_s": statistics.fmean(s.seconds for s in full) if full else None,
            "preemptions": engine.stats.num_preemptions - pre0}


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def bench_latency(llm: Any, batch: int, input_len: int, output_len: int, iters: int = 3,
                  warmup: int = 1, seed: int = 0, ceilings: dict | None = None,
                  rest_s: float = 0.0) -> dict:
    """Median figures over ``iters`` runs of one batch; fresh random prompts each run.

    ``rest_s``: the device idles this long before each timed run. A GPU at its power limit
    lowers its clocks after tens of ms of dense matmuls (an H200 at 700 W: ~87% of its burst
    matmul rate after ~75 ms, ``scripts/sustained_matmul.py``), so back-to-back runs of a long
    prefill measure it throttled and rested ones, as a request to an idle server, not.
    """
    if min(batch, input_len, output_len, iters) < 1:
        raise ValueError("batch, input, output and iters must all be >= 1")
    if rest_s < 0:
        raise ValueError(f"rest_s must be >= 0, got {rest_s}")
    engine = llm.engine
    mcfg: ModelConfig = engine.cfg.model_config
    max_len = engine.cfg.scheduler.max_model_len
    if input_len + output_len > max_len:
        raise ValueError(f"input {input_len} + output {output_len} tokens exceed max_model_len "
                         f"{max_len}")
    runs = []
    for it in range(warmup + iters):
        prompts = random_prompts([input_len] * batch, mcfg.vocab_size, seed + it,
                                 engine.tokenizer)
        if it >= warmup and rest_s:
            time.sleep(rest_s)
        run = _one_iteration(llm, prompts, output_len)
        if it >= warmup:
            runs.append(run)
    res = _summarize(runs, engine, batch, input_len, output_len)
    res["rest_s"] = rest_s
    if res["tpot_s"] is None and output_len > 1:
        logging.getLogger(__name__).warning(
            "no decode step ran all %d requests (early ones finished while later ones were "
            "still in prefill): no time per output token; raise --output-len", batch)
    if ceilings is not None:
        add_fractions(res, ceilings, engine.cfg.dtype, engine.cfg.quant.method)
    return res


def _summarize(runs: list[dict], engine: Any, batch: int, input_len: int,
               output_len: int) -> dict:
    total = _median([r["total_s"] for r in runs])
    prefill = _median([r["prefill_s"] for r in runs])
    tpot = _median([r["tpot_s"] for r in runs])
    flops = prefill_flops(engine.cfg.model_config, batch, input_len)
    step_bytes = decode_bytes_per_step(engine, batch, input_len, output_len)
    return {
        "batch": batch, "input_len": input_len, "output_len": output_len,
        "iters": len(runs), "total_time_s": total, "prefill_time_s": prefill,
        "tpot_s": tpot, "output_tokens": batch * output_len,
        "tokens_per_s": batch * output_len / total,
        "prefill_tokens_per_s": batch * input_len / prefill if prefill else None,
        "decode_tokens_per_s": batch / tpot if tpot else None,
        "prefill_steps": runs[-1]["prefill_steps"], "decode_steps": runs[-1]["decode_steps"],
        "full_batch_decode_steps": runs[-1]["full_batch_decode_steps"],
        "preemptions": sum(r["preemptions"] for r in runs),
        "weight_bytes": weight_bytes(engine), "kv_bytes_per_token": kv_bytes_per_token(engine),
        "decode_bytes_per_step": step_bytes,
        "decode_bandwidth_Bps": step_bytes / tpot if tpot else None,
        "prefill_flops": flops, "prefill_flops_per_s": flops / prefill if prefill else None,
        "runs": runs,
    }


def add_fractions(res: dict, ceilings: dict, dtype: torch.dtype, quant: str | None) -> None:
    """Achieved figures as fractions of the measured ceilings (None where one is missing)."""
    kind = ceiling_kind(dtype, quant)
    peak = ceilings["matmul_flops"].get(kind)
    bw = ceilings["copy_bandwidth_Bps"]
    res["ceiling_matmul_kind"] = kind
    res["ceilings"] = ceilings
    res["decode_bandwidth_fraction"] = (res["decode_bandwidth_Bps"] / bw
                                        if res["decode_bandwidth_Bps"] else None)
    res["prefill_flops_fraction"] = (res["prefill_flops_per_s"] / peak
                                     if peak and res["prefill_flops_per_s"] else None)


def latency_rows(res: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("batch x input -> output",
         f"{res['batch']} x {res['input_len']} -> {res['output_len']}"),
        *([("rest before each run (s)", res["rest_s"])] if res.get("rest_s") else []),
        ("prefill time (ms)", _ms(res["prefill_time_s"])),
        ("time per output token (ms)", _ms(res["tpot_s"])),
        ("total time (s)", res["total_time_s"]),
        ("output tokens/s", res["tokens_per_s"]),
        ("prefill tokens/s", res["prefill_tokens_per_s"]),
        ("decode bandwidth (GB/s)", _scale(res["decode_bandwidth_Bps"], 1e-9)),
        ("prefill TFLOP/s", _scale(res["prefill_flops_per_s"], 1e-12)),
    ]
    if "decode_bandwidth_fraction" in res:
        rows += [("decode bandwidth / copy ceiling", res["decode_bandwidth_fraction"]),
                 (f"prefill FLOP/s / {res['ceiling_matmul_kind']} ceiling",
                  res["prefill_flops_fraction"])]
    rows += startup_rows(res)
    if "hf" in res:
        rows += [("HF generate output tokens/s", res["hf"]["tokens_per_s"]),
                 ("speed-up vs HF (tokens/s ratio)", res["speedup_vs_hf"])]
    return rows


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _scale(x: float | None, f: float) -> float | None:
    return None if x is None else x * f
