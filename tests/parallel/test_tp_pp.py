"""Tensor and pipeline parallelism over real processes and gloo, against one process.

Each parallel engine spawns its worker processes; every test shuts its engine down and checks
that no worker outlives it. The tiny model has 4 layers so that PP=2 puts 2 on each stage.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny4") / "tiny4")


@pytest.fixture(scope="module")
def tiny_ref(tiny4):
    llm = LLM(str(tiny4), debug_checks=True)
    tokens = _tokens(llm, PROMPTS)
    return llm, tokens, prompt_logits(llm, LONG)


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def _close(llm: LLM) -> None:
    ex = llm.engine.executor
    ex.shutdown()
    assert not any(p.is_alive() for p in ex.procs), "a worker outlived shutdown"


def _check_same(llm: LLM, tiny_ref) -> None:
    _, want, logits = tiny_ref
    assert _tokens(llm, PROMPTS) == want
    assert max_rel_err(prompt_logits(llm, LONG), logits) < 1e-4
    llm.engine.pool.check_invariants(expect_idle=True)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_tiny_tp_and_tp_pp_match_one_process(tiny4, tiny_ref, tp, pp):
    llm = LLM(str(tiny4), debug_checks=True, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert llm.engine.executor.stage.layer_range == ((0, 2) if pp == 2 else (0, 4))
        _check_same(llm, tiny_ref)
    finally:
        _close(llm)


def test_tp2_overlapped_steps_match_one_process(tiny4, tiny_ref):
    """Async scheduling under TP: the driver's sampled tokens reach the other rank by a TP
    broadcast, which fills the next step's placeholders there; prompt logprobs (which need the
    host-side tokens) fall back to plain steps in between."""
    llm = LLM(str(tiny4), debug_checks=True, tensor_parallel_size=2, async_scheduling=True,
              max_num_seqs=4)
    try:
        assert llm.engine.overlap
        _check_same(llm, tiny_ref)
        sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=12)
        assert _tokens(llm, PROMPTS, sampled) == _tokens(tiny_ref[0], PROMPTS, sampled)
    finally:
        _close(llm)


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
        _check_same(llm, tiny_ref)
        _check_stream(llm, tiny_ref[0], max_depth=micro_batches or 3)
    finally:
        _close(llm)


def _check_stream(llm: LLM, ref_llm: LLM, max_depth: int = 2) -> None:
    prompts = [[2 + (13 * i + j) % 480 for j in range(4 + (17 * i) % 60)] for i in range(30)]
    want = _tokens(ref_llm, prompts)
    engine, ex = llm.engine, llm.engine.executor
    depth: list[int] = []
    submit = ex.submit
    ex.submit = lambda out: (submit(out), depth.append(ex.num_in_flight))  # type: ignore
    preempted0 = engine.scheduler.num_preemptions
    try:
        got, aborted = _run_stream(engine, prompts)
    finally:
        del ex.submit
    assert aborted is not None and aborted not in got
    assert {int(k) for k in got} == set(range(30)) - {int(aborted)}
    assert all(got[str(i)] == want[i] for i in range(30) if str(i) != aborted)
    assert max(depth) == max_depth
    assert engine.scheduler.num_preemptions > preempted0
    assert not engine.scheduler.in_flight
    engine.pool.check_invariants(expect_idle=True)


def _run_stream(engine: Engine, prompts: list[list[int]]) -> tuple[dict, str | None]:
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
        _close(llm)


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
        assert _tokens(llm, PROMPTS[:1])
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
        _close(llm)


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
        _close(llm)


def test_hung_worker_times_out(tiny4, monkeypatch):
    monkeypatch.setenv("KESTREL_DIST_TIMEOUT", "6")
    llm = LLM(str(tiny4), tensor_parallel_size=2)
    ex = llm.engine.executor
    try:
        assert _tokens(llm, PROMPTS[:1])
        os.kill(ex.procs[0].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"timed out|Timed out"):
            llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY)
        assert time.monotonic() - t0 < 20
    finally:
        _close(llm)


# ---- quantized layers and shard-only loading --------------------------------------------------

def test_fp8_under_tp2(tiny4, tiny_ref):
    """FP8 weights shard exactly (row scales come from whole checkpoint rows); the TP=2 model
    is as close to float32 as the TP=1 FP8 model (row-parallel layers scale activations per
    shard, so the two FP8 runs differ slightly from each other)."""
    one = LLM(str(tiny4), quantization="fp8", fp8_skip_layers=False)
    err1 = max_rel_err(prompt_logits(one, LONG), tiny_ref[2])
    llm = LLM(str(tiny4), quantization="fp8", fp8_skip_layers=False, tensor_parallel_size=2)
    try:
        err2 = max_rel_err(prompt_logits(llm, LONG), tiny_ref[2])
        assert 0 < err2 < 1.5 * err1 + 1e-3
    finally:
        _close(llm)


def test_int8_under_tp2(tiny4, tiny_ref):
    """LLM.int8() layers shard exactly: each rank's int8 codes and row scales are the slices of
    one process's (scales from whole checkpoint rows). The TP=2 model is as close to float32 as
    one process's int8 model (row-parallel layers scale activations and find outliers per
    shard, so the two int8 runs differ slightly from each other)."""
    import kestrel.attention.torch_ref  # noqa: F401 - registers "torch"
    from kestrel.attention.base import get_backend_cls
    from kestrel.config import QuantConfig
    from kestrel.loader.hf import iterate_weights, load_model_config
    from kestrel.models.llama import LlamaForCausalLM
    from kestrel.parallel.state import TPGroup

    cfg, q = load_model_config(tiny4), QuantConfig(method="int8")
    models = [LlamaForCausalLM(cfg, torch.float32, get_backend_cls("torch"), q, tp)
              for tp in (TPGroup(), TPGroup(0, 2, None), TPGroup(1, 2, None))]
    for m in models:
        m.load_weights(iterate_weights(tiny4))
    whole = models[0].layers["1"]
    for rank, m in enumerate(models[1:]):
        lay = m.layers["1"]
        for name, dim in (("self_attn.o_proj", 1), ("mlp.down_proj", 1),
                          ("mlp.gate_up_proj", 0)):
            part, full = lay.get_submodule(name), whole.get_submodule(name)
            n = part.weight.shape[dim]
            if dim == 1:  # row-parallel: input columns, every row's scale
                assert torch.equal(part.weight, full.weight[:, rank * n:(rank + 1) * n])
                assert torch.equal(part.weight_scale, full.weight_scale)
            else:  # column-parallel gate | up: this rank's rows of each
                half, inter = n // 2, full.weight.shape[0] // 2
                rows = [*range(rank * half, (rank + 1) * half),
                        *range(inter + rank * half, inter + (rank + 1) * half)]
                assert torch.equal(part.weight, full.weight[rows])
                assert torch.equal(part.weight_scale, full.weight_scale[rows])
    one = LLM(str(tiny4), quantization="int8")
    err1 = max_rel_err(prompt_logits(one, LONG), tiny_ref[2])
    llm = LLM(str(tiny4), quantization="int8", tensor_parallel_size=2)
    try:
        err2 = max_rel_err(prompt_logits(llm, LONG), tiny_ref[2])
        assert 0 < err2 < 1.5 * err1 + 1e-3
    finally:
        _close(llm)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_under_tp2(tiny4, tmp_path, bits):
    """A GPTQ-format checkpoint (round-to-nearest codes, groups of 32) under TP=2 gives one
    process's logits: each rank dequantizes exactly its slice of the same codes."""
    from kestrel.quant.gptq import write_rtn_folder

    folder = write_rtn_folder(tiny4, tmp_path / "gptq", bits=bits, group_size=32)
    want = prompt_logits(LLM(str(folder)), LONG)
    llm = LLM(str(folder), tensor_parallel_size=2)
    try:
        assert max_rel_err(prompt_logits(llm, LONG), want) < 1e-4
    finally:
        _close(llm)


class _CountingSlice:
    """Stands in for a safetensors slice and records which regions were read."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.reads = t, []

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return "F32"

    def __getitem__(self, index):
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.t[index]


def test_loaders_read_only_their_shard():
    """Column-, row- and vocab-parallel loaders narrow a lazy tensor before reading it."""
    from kestrel.layers.embedding import VocabParallelEmbedding
    from kestrel.layers.linear import QKVParallelLinear, RowParallelLinear
    from kestrel.loader.hf import LazyTensor
    from kestrel.parallel.state import TPGroup

    tp = TPGroup(1, 2, None)  # rank 1 of 2
    qkv = QKVParallelLinear(8, 2, 4, 2, tp=tp)  # 4 heads of 2: this rank's q rows are 4..8
    q = _CountingSlice(torch.randn(8, 8))
    qkv.weight_loader(qkv.weight, LazyTensor(q, "q_proj"), "q")
    assert q.reads == [((4, 8), (0, 8))] and torch.equal(qkv.weight[:4], q.t[4:8])
    row = RowParallelLinear(16, 8, tp=tp)  # input features 8..16
    w = _CountingSlice(torch.randn(8, 16))
    row.weight_loader(row.weight, LazyTensor(w, "o_proj"))
    assert w.reads == [((0, 8), (8, 16))] and torch.equal(row.weight, w.t[:, 8:])
    emb = VocabParallelEmbedding(15, 8, torch.float32, tp)  # padded to 16: rows 8..15 + 1 pad
    e = _CountingSlice(torch.randn(15, 8))
    emb.weight_loader(emb.weight, LazyTensor(e, "embed"))
    assert e.reads == [((8, 15), (0, 8))]
    assert torch.equal(emb.weight[:7], e.t[8:]) and not emb.weight[7].any()


@pytest.mark.parametrize("quant", [None, "fp8", "fp8-checkpoint", "int8", "gptq"])
def test_lazy_shards_equal_eager_shards(tiny4, tmp_path, quant):
    """Each TP rank's parameters are the same whether it read the whole checkpoint or only
    its slices: plain, FP8 quantized on load (scales from whole rows either way), and a
    serialized FP8 checkpoint (fbgemm_fp8: FP8 weights and row scales narrowed together)."""
    import kestrel.attention.torch_ref  # noqa: F401 - registers "torch"
    from kestrel.attention.base import get_backend_cls
    from kestrel.config import QuantConfig
    from kestrel.loader.hf import iterate_weights, load_model_config, read_config
    from kestrel.models.llama import LlamaForCausalLM
    from kestrel.parallel.state import TPGroup
    from kestrel.quant.fp8_checkpoint import (
        checkpoint_weights,
        quant_config_from_hf,
        quantize_folder,
    )

    folder, q = tiny4, None
    if quant == "fp8":
        q = QuantConfig(method="fp8", fp8_skip_layers=False)
    elif quant == "int8":
        q = QuantConfig(method="int8")
    elif quant == "gptq":  # packed 4-bit codes, groups of 32: rows cut whole words and groups
        from kestrel.quant.gptq import quant_config_from_gptq, write_rtn_folder

        folder = write_rtn_folder(tiny4, tmp_path / "gptq", bits=4, group_size=32)
        q = quant_config_from_gptq(read_config(folder)["quantization_config"])
    elif quant == "fp8-checkpoint":
        folder = quantize_folder(tiny4, tmp_path / "fp8", fp8_skip_layers=False)
        q = quant_config_from_hf(read_config(folder))
    cfg = load_model_config(folder)
    for rank in range(2):
        models = [LlamaForCausalLM(cfg, torch.float32, get_backend_cls("torch"), q,
                                   TPGroup(rank, 2, None), (2, 4)) for _ in range(2)]
        models[0].load_weights(checkpoint_weights(iterate_weights(folder), q))
        models[1].load_weights(checkpoint_weights(iterate_weights(folder, lazy=True), q))
        a, b = models[0].state_dict(), models[1].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


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
    want, want_many, ref = _tokens(one, PROMPTS), _tokens(one, many), prompt_logits(one, LONG)
    del one
    llm = LLM(str(tiny4), tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    try:
        assert _tokens(llm, PROMPTS) == want
        assert max_rel_err(prompt_logits(llm, LONG), ref) < 1e-3
        assert _tokens(llm, many) == want_many
    finally:
        _close(llm)
