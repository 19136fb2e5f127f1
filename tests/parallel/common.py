"""What the parallel tests share: the tiny checkpoint, the prompts, one-process comparisons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kestrel import LLM, SamplingParams
from kestrel.engine.engine import Engine
from kestrel.loader.dummy import preset_config
from tests.helpers import max_rel_err, prompt_logits

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1 + (7 * i + j) % 500 for j in range(3 + 11 * i)] for i in range(6)]  # 3..58 tokens
LONG = list(range(1, 70))


def make_tiny_checkpoint(folder: Path, layers: int = 4, seed: int = 0) -> Path:
    """A random transformers Llama of the tiny-llama shape with ``layers`` layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dataclasses.replace(preset_config("tiny-llama"), num_hidden_layers=layers).to_hf()
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def greedy_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def close_checked(llm: LLM) -> None:
    ex = llm.engine.executor
    ex.shutdown()
    assert not any(p.is_alive() for p in ex.procs), "a worker outlived shutdown"


def check_same(llm: LLM, tiny_ref) -> None:
    _, want, logits = tiny_ref
    assert greedy_tokens(llm, PROMPTS) == want
    assert max_rel_err(prompt_logits(llm, LONG), logits) < 1e-4
    llm.engine.pool.check_invariants(expect_idle=True)


def run_stream(engine: Engine, prompts: list[list[int]]) -> tuple[dict, str | None]:
    got: dict[str, list[int]] = {}
    pending, aborted, steps = list(enumerate(prompts)), None, 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 2 == 0:  # a new request every other step
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        steps += 1
        if aborted is None and steps > 10:
            flying = [r for r in engine.scheduler.running if id(r) in engine.scheduler.in_flight]
            if flying:
                aborted = flying[0].request_id
                engine.abort_request(aborted)
    return got, aborted
