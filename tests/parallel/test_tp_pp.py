"""Tensor and pipeline parallelism over real processes and gloo, against one process.

Each parallel engine spawns its worker processes; every test shuts its engine down and checks
that no worker outlives it. The tiny model has 4 layers so that PP=2 puts 2 on each stage.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from kestrel import LLM, SamplingParams
from tests.helpers import max_rel_err, prompt_logits
from tests.parallel.common import (
    GREEDY,
    LONG,
    PROMPTS,
    check_same,
    close_checked,
    greedy_tokens,
    run_stream,
)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_tiny_tp_and_tp_pp_match_one_process(tiny4, tiny_ref, tp, pp):
    llm = LLM(str(tiny4), debug_checks=True, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert llm.engine.executor.stage.layer_range == ((0, 2) if pp == 2 else (0, 4))
        check_same(llm, tiny_ref)
    finally:
        close_checked(llm)


def test_tp2_overlapped_steps_match_one_process(tiny4, tiny_ref):
    """Async scheduling under TP: the driver's sampled tokens reach the other rank by a TP
    broadcast, which fills the next step's placeholders there; prompt logprobs (which need the
    host-side tokens) fall back to plain steps in between."""
    llm = LLM(str(tiny4), debug_checks=True, tensor_parallel_size=2, async_scheduling=True,
              max_num_seqs=4)
    try:
        assert llm.engine.overlap
        check_same(llm, tiny_ref)
        sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
        assert greedy_tokens(llm, PROMPTS, sampled) == greedy_tokens(tiny_ref[0], PROMPTS, sampled)
    finally:
        close_checked(llm)


def test_tp2_speculative_decoding_matches_one_process(tiny4, tiny_ref):
    """Prompt lookup under TP: every rank runs the verified step (rank 0 alone verifies and
    sends the tokens on); greedy tokens equal one process's without speculation."""
    repeating = [[5, 6, 7, 8, 9] * 4, [11, 12] * 8]
    llm = LLM(str(tiny4), debug_checks=True, tensor_parallel_size=2,
              speculative_method="ngram", max_num_seqs=4)
    try:
        got = greedy_tokens(llm, repeating)
        assert llm.engine.stats.num_accepted_tokens > 0
        assert got == greedy_tokens(tiny_ref[0], repeating)
    finally:
        close_checked(llm)


@pytest.mark.parametrize("micro_batches", [2, None])
def test_pp_matches_one_process_and_serves_a_stream(tiny4, tiny_ref, micro_batches):
    """PP=2 with chunked prefill (48-token budget) and a small KV pool: the same tokens and
    logits as one process; then 30 requests arriving while others run, one aborted in flight:
    none lost, the same tokens, no leaked blocks, the micro-batches really in flight (two, or
    three by default)."""
    llm = LLM(str(tiny4), debug_checks=True, pipeline_parallel_size=2, max_model_len=160,
              max_num_batched_tokens=48, num_kv_blocks=24, max_num_seqs=16,
              pipeline_micro_batches=micro_batches)
    try:
        check_same(llm, tiny_ref)
        _check_stream(llm, tiny_ref[0], max_depth=micro_batches or 3)
    finally:
        close_checked(llm)


def _check_stream(llm: LLM, ref_llm: LLM, max_depth: int = 2) -> None:
    prompts = [[2 + (13 * i + j) % 480 for j in range(4 + (17 * i) % 60)] for i in range(30)]
    want = greedy_tokens(ref_llm, prompts)
    engine, ex = llm.engine, llm.engine.executor
    depth: list[int] = []
    submit = ex.submit
    ex.submit = lambda out: (submit(out), depth.append(ex.num_in_flight))  # type: ignore
    preempted0 = engine.scheduler.num_preemptions
    try:
        got, aborted = run_stream(engine, prompts)
    finally:
        del ex.submit
    assert aborted is not None and aborted not in got
    assert {int(k) for k in got} == set(range(30)) - {int(aborted)}
    assert all(got[str(i)] == want[i] for i in range(30) if str(i) != aborted)
    assert max(depth) == max_depth
    assert engine.scheduler.num_preemptions > preempted0
    assert not engine.scheduler.in_flight
    engine.pool.check_invariants(expect_idle=True)


# ---- the default model ----------------------------------------------------------------------

DEFAULT_PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])
def test_default_model_matches_one_process(default_model_path, smollm_llm, tp, pp):
    """SmolLM2-135M has 9 heads and 3 KV heads, so its tensor-parallel size is 3, not 2."""
    want = [o.outputs[0].token_ids for o in smollm_llm.generate(DEFAULT_PROMPTS, GREEDY)]
    ids = smollm_llm.get_tokenizer().encode(DEFAULT_PROMPTS[1] * 4)
    ref_logits = prompt_logits(smollm_llm, ids)
    llm = LLM(str(default_model_path), dtype="float32", device="cpu", debug_checks=True,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(DEFAULT_PROMPTS, GREEDY)]
        assert got == want
        assert max_rel_err(prompt_logits(llm, ids), ref_logits) < 1e-4
    finally:
        close_checked(llm)


def test_sizes_that_do_not_divide_are_refused(default_model_path):
    with pytest.raises(ValueError, match="9 attention heads are not divisible by "
                                         "tensor_parallel_size 2"):
        LLM(str(default_model_path), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size 40 exceeds"):
        LLM(str(default_model_path), pipeline_parallel_size=40)


# ---- failures -------------------------------------------------------------------------------

def test_dead_worker_is_reported_while_idle_and_on_the_next_step(tiny4):
    llm = LLM(str(tiny4), tensor_parallel_size=2)
    ex = llm.engine.executor
    try:
        assert greedy_tokens(llm, PROMPTS[:1])
        os.kill(ex.procs[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while ex.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ex.healthy  # the watchdog noticed with no request running (→ /health)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        assert time.monotonic() - t0 < 2
    finally:
        close_checked(llm)


def test_worker_killed_mid_generation_fails_fast(tiny4):
    llm = LLM(str(tiny4), pipeline_parallel_size=2)
    ex = llm.engine.executor
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    killer = threading.Timer(1.0, lambda: os.kill(ex.procs[0].pid, signal.SIGKILL))
    try:
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], long)
        assert time.monotonic() - t0 < 15
        assert llm.engine.executor.dead_error is not None
    finally:
        killer.cancel()
        close_checked(llm)


def test_hung_worker_times_out(tiny4, monkeypatch):
    monkeypatch.setenv("KESTREL_DIST_TIMEOUT", "6")
    llm = LLM(str(tiny4), tensor_parallel_size=2)
    ex = llm.engine.executor
    try:
        assert greedy_tokens(llm, PROMPTS[:1])
        os.kill(ex.procs[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"timed out|Timed out"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        assert time.monotonic() - t0 < 20
    finally:
        close_checked(llm)


# ---- NCCL on two GPUs (scripts/parallel_check.sh runs these) ----------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_gpus_over_nccl_match_one_gpu(tiny4, tp, pp):
    """NCCL all-reduces (captured in the decode CUDA graphs when pp == 1) and NCCL hand-offs
    between stages give one GPU's tokens and logits."""
    kw = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 128, "max_num_seqs": 16,
          "debug_checks": True}
    many = [[1 + (5 * i + j) % 500 for j in range(2 + i % 9)] for i in range(24)]
    one = LLM(str(tiny4), **kw)
    want, want_many, ref = greedy_tokens(one, PROMPTS), greedy_tokens(one, many), prompt_logits(one, LONG)
    del one
    llm = LLM(str(tiny4), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    try:
        assert greedy_tokens(llm, PROMPTS) == want
        assert max_rel_err(prompt_logits(llm, LONG), ref) < 1e-3
        assert greedy_tokens(llm, many) == want_many
    finally:
        close_checked(llm)
