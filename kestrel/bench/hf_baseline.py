"""Hugging Face transformers ``generate`` on the same model and settings, in the same process.

The ratio Kestrel / transformers is then measured side by side on one device, not quoted.
Greedy decoding with ``min_new_tokens = max_new_tokens`` so both produce exactly the asked
number of tokens. Transformers runs the unquantized model in the engine's dtype; a quantized
Kestrel run is thus compared with the model it quantizes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from kestrel.bench.roofline import synchronize


def load_hf_model(engine_cfg: Any) -> Any:
    """The engine's model in transformers: its folder, or a random model of a preset's shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype, device = engine_cfg.dtype, torch.device(engine_cfg.device)
    if engine_cfg.load_format == "dummy":
        hf = engine_cfg.model_config.to_hf()
        cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(engine_cfg.model, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def _generate(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    device = ids.device
    synchronize(device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    synchronize(device)
    return time.perf_counter() - t0


def hf_latency(model: Any, prompts: list[list[int]], output_len: int, iters: int = 3,
               warmup: int = 1) -> dict:
    """Prefill time (generate one token), total time, TPOT and tokens/s of one equal-length batch.

    The prompts must all have the same length (no padding, so no wasted compute is timed).
    """
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("hf_latency needs prompts of one length")
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    for _ in range(warmup):
        _generate(model, ids, min(output_len, 2))
    prefill = statistics.median(_generate(model, ids, 1) for _ in range(iters))
    total = statistics.median(_generate(model, ids, output_len) for _ in range(iters))
    tokens = len(prompts) * output_len
    tpot = (total - prefill) / (output_len - 1) if output_len > 1 else None
    return {"prefill_time_s": prefill, "total_time_s": total, "tpot_s": tpot,
            "output_tokens": tokens, "tokens_per_s": tokens / total}


def hf_throughput(model: Any, requests: list[tuple[list[int], int]], batch_size: int) -> dict:
    """Requests in fixed batches (left-padded); a batch generates its longest output.

    Only each request's own output tokens count toward tokens/s, so padding and overrun are
    the baseline's cost, as they would be in a deployment built on ``generate``.
    """
    device = next(model.parameters()).device
    synchronize(device)
    t0 = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        new = max(o for _, o in chunk)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        out_tokens += sum(o for _, o in chunk)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tokens": out_tokens,
            "output_throughput": out_tokens / elapsed, "batch_size": batch_size}
