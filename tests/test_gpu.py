"""GPU path end to end: Triton kernels + CUDA graphs give the CPU reference's greedy tokens."""

from __future__ import annotations

import gc
import json
import re

import pytest
import torch

from kestrel import LLM, SamplingParams
from tests.helpers import make_hf_checkpoint

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # SmolLM2-135M's shape with random weights: the real file reaches the GPU machine only when
    # scripts/model_carry.sh brings it (test_default_model_greedy_on_gpu_equals_cpu_reference).
    return make_hf_checkpoint("smollm2-135m", tmp_path_factory.mktemp("ckpt") / "m", seed=3)


def _prompts(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"prompt_token_ids": torch.randint(0, 49152, (10 + 37 * i,), generator=g).tolist()}
            for i in range(n)]


def _tokens(checkpoint, prompts, check=None, **kw) -> list[list[int]]:
    """Build an engine, generate, then release its GPU memory before the next one."""
    llm = LLM(str(checkpoint), gpu_memory_utilization=0.3, max_num_seqs=8, **kw)
    try:
        if check:
            check(llm)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _uses_fast_path(llm: LLM) -> None:
    runner = llm.engine.executor.runner
    assert runner.backend_name == "triton" and runner.graphs is not None


def test_gpu_greedy_equals_cpu_reference(checkpoint):
    prompts = _prompts(4)
    cpu = _tokens(checkpoint, prompts, device="cpu", dtype="float32")
    gpu = _tokens(checkpoint, prompts, _uses_fast_path, device="cuda", dtype="float32")
    assert gpu == cpu


def test_verified_steps_run_in_the_decode_graphs(checkpoint):
    """Prompt lookup on prompts that repeat a block: steps that verify guesses run as decode
    rows in the CUDA graphs (ModelRunner.flat_drafts), and give plain greedy decoding's
    tokens."""
    g = torch.Generator().manual_seed(7)
    prompts = [{"prompt_token_ids": torch.randint(0, 49152, (40,), generator=g).repeat(4)
                .tolist()} for _ in range(3)]
    plain = _tokens(checkpoint, prompts, device="cuda", dtype="float32")
    seen = {"graph": 0, "eager": 0}

    def count_verified_steps(llm: LLM) -> None:
        runner = llm.engine.executor.runner
        use_graph = runner.use_graph

        def counted(batch) -> bool:
            graph = use_graph(batch)
            if batch.prompt_rows:  # a step with guesses to verify
                seen["graph" if graph else "eager"] += 1
            return graph

        runner.use_graph = counted
        seen["stats"] = llm.engine.stats

    spec = _tokens(checkpoint, prompts, count_verified_steps, device="cuda", dtype="float32",
                   speculative_method="ngram")
    assert spec == plain
    assert seen["stats"].num_draft_tokens > 0 and seen["graph"] > 0


def test_sampled_requests_with_speculation_on_gpu(checkpoint):
    """Sampled (seeded, filtered) requests verified together on the device, in the decode
    graphs: each finishes with the tokens asked for, guesses are verified, and the same seeds
    give the same tokens in a second engine."""
    g = torch.Generator().manual_seed(8)
    prompts = [{"prompt_token_ids": torch.randint(0, 49152, (30,), generator=g).repeat(4)
                .tolist()} for _ in range(4)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50 * (i + 1), seed=11 + i,
                             max_tokens=24, ignore_eos=True) for i in range(4)]

    def run() -> tuple[list[list[int]], int]:
        llm = LLM(str(checkpoint), gpu_memory_utilization=0.3, max_num_seqs=8, device="cuda",
                  dtype="float32", speculative_method="ngram")
        try:
            _uses_fast_path(llm)
            outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            return outs, llm.engine.stats.num_draft_tokens
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    first, drafted = run()
    assert drafted > 0 and [len(t) for t in first] == [24] * 4
    assert all(0 <= t < 49152 for toks in first for t in toks)
    assert run()[0] == first


def test_default_model_structured_output_on_gpu_equals_cpu(default_model):
    """Grammar masks on CUDA logits (bitmask unpacked on the device), in the decode graphs:
    greedy tokens equal the CPU reference's, and every answer fits its constraint. Needs
    xgrammar (carried in scripts/model_carry.sh's .m1) and a tokenizer: the real model's."""
    pytest.importorskip("xgrammar")
    from kestrel.structured import StructuredOutput

    specs = [StructuredOutput(regex=r"[a-z]{3,8}-[0-9]{2}"),
             StructuredOutput(choice=["alpha", "beta", "gamma delta"]),
             StructuredOutput(json={"type": "object", "required": ["n"],
                                    "additionalProperties": False,
                                    "properties": {"n": {"type": "integer", "minimum": 0,
                                                         "maximum": 99}}})]
    prompts = _prompts(3)
    params = [SamplingParams(temperature=0, max_tokens=24, structured=s) for s in specs]

    def run(**kw) -> list:
        llm = LLM(str(default_model), gpu_memory_utilization=0.3, max_num_seqs=8,
                  dtype="float32", **kw)
        try:
            return [o.outputs[0] for o in llm.generate(prompts, params)]
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    gpu, cpu = run(device="cuda"), run(device="cpu")
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert re.fullmatch(r"[a-z]{3,8}-[0-9]{2}", gpu[0].text), gpu[0].text
    assert gpu[1].text in ("alpha", "beta", "gamma delta")
    if gpu[2].finish_reason == "stop":
        assert 0 <= json.loads(gpu[2].text)["n"] <= 99


@pytest.fixture(scope="module")
def default_model():
    """The real default model's folder. Its GGUF reaches the GPU machine only through
    scripts/model_carry.sh: elsewhere these tests skip."""
    from kestrel.loader.pull import (
        default_gguf_path,
        default_model_path,
        pull_default_model,
        read_marker,
    )

    if not default_gguf_path().is_file() and read_marker(default_model_path()) is None:
        pytest.skip("the default model is not on this machine (scripts/model_carry.sh)")
    return pull_default_model(progress=False)


def test_default_model_greedy_on_gpu_equals_cpu_reference(default_model):
    """The real default model, chat prompts: the GPU's fast path gives the CPU reference's
    greedy tokens."""
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               "Explain what a hash table is in two sentences.", "List three prime numbers."]
    cpu = _tokens(default_model, prompts, device="cpu", dtype="float32")
    assert _tokens(default_model, prompts, _uses_fast_path, device="cuda", dtype="float32") == cpu


def test_default_model_speculative_on_gpu_equals_cpu_reference(default_model):
    """Prompt lookup on the GPU: verified steps (decode rows in the CUDA graphs, or several
    query tokens over the paged cache when a prompt chunk shares the step) give the CPU
    reference's greedy tokens, on prompts whose continuations repeat."""
    prompts = ["Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
               "The cat sat on the mat. The cat sat on the mat. The cat",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul"]
    cpu = _tokens(default_model, prompts, device="cpu", dtype="float32")
    assert _tokens(default_model, prompts, device="cuda", dtype="float32",
                   speculative_method="ngram") == cpu


def test_default_model_fp8_recipe_quality_on_gpu(default_model):
    """Issue 6's quality bound on the GPU's own FP8 path (fast-accumulating _scaled_mm at
    8,192-row forwards, the fused quantization kernels): the recipe against BF16 on the real
    model, 64 pydoc windows of 128 tokens, perplexity within 1% and top-1 agreement above 85%
    (512 windows measured +0.55% and 91.3% on an H200)."""
    from kestrel.eval.compare import compare_models
    from kestrel.eval.perplexity import corpus_ids, eval_engine_kwargs, token_windows

    kw = dict(device="cuda", dtype="bfloat16", **eval_engine_kwargs(128, batch_size=64))
    base = LLM(str(default_model), **kw)
    cand = LLM(str(default_model), quantization="fp8", **kw)
    try:
        windows = token_windows(corpus_ids(base.get_tokenizer()), 128, 64)
        res = compare_models(base, cand, windows, batch_size=64)
    finally:
        del base, cand
        gc.collect()
        torch.cuda.empty_cache()
    assert res["kl_mean"] > 0.0
    assert res["ppl_delta_rel"] < 0.01 and res["top1_agreement"] > 0.85, res


def test_fp8_kv_cache_on_gpu_equals_cpu_reference(checkpoint):
    """FP8 KV cache: the Triton kernels (hardware e4m3 cast, dequantizing attention) in CUDA
    graphs give the torch reference's tokens on CPU, and eager steps the same."""
    prompts = _prompts(4)
    kw = {"dtype": "float32", "kv_cache_dtype": "fp8"}
    cpu = _tokens(checkpoint, prompts, device="cpu", **kw)
    assert _tokens(checkpoint, prompts, _uses_fast_path, device="cuda", **kw) == cpu
    assert _tokens(checkpoint, prompts, device="cuda", enforce_eager=True, **kw) == cpu


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_cuda_graphs_on_and_off_identical(checkpoint, batch):
    prompts = _prompts(batch)
    eager = _tokens(checkpoint, prompts, device="cuda", dtype="float32", enforce_eager=True)
    graphs = _tokens(checkpoint, prompts, _uses_fast_path, device="cuda", dtype="float32")
    assert graphs == eager


def test_cuda_graphs_per_context_range_identical(checkpoint, monkeypatch):
    """Batch 1 takes the new token into the attention launch only up to FUSED_NEW_TOKEN_MAX_LEN
    tokens, so it has a graph per side of it: a 10-token prompt decoding past 20 replays both,
    with eager steps' tokens."""
    monkeypatch.setattr("kestrel.attention.triton_backend.FUSED_NEW_TOKEN_MAX_LEN", 20)
    prompts = _prompts(1)

    def both_sides(llm: LLM) -> None:
        _uses_fast_path(llm)
        graphs = llm.engine.executor.runner.graphs
        assert {(1, 20), (1, graphs.max_model_len)} <= set(graphs.graphs)
        assert (2, 20) not in graphs.graphs

    eager = _tokens(checkpoint, prompts, device="cuda", dtype="float32", enforce_eager=True)
    assert len(eager[0]) + 10 > 20
    assert _tokens(checkpoint, prompts, both_sides, device="cuda", dtype="float32") == eager


def test_overlapped_steps_identical_to_sync_on_gpu(checkpoint):
    """Async scheduling on CUDA (placeholder tokens filled on the device, pinned non-blocking
    uploads) against plain steps: the same tokens, greedy and seeded sampling both."""
    prompts = _prompts(6)
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=50, seed=7, max_tokens=24)] * 3

    def run(overlap):
        llm = LLM(str(checkpoint), gpu_memory_utilization=0.3, max_num_seqs=8, device="cuda",
                  dtype="float32", async_scheduling=overlap)
        try:
            assert llm.engine.overlap == overlap
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        finally:
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    assert run(True) == run(False)


def test_programmatic_dependent_launch_on_and_off_identical(checkpoint, monkeypatch):
    """Kernels launched with PDL (kernels/pdl.py: each waits for its predecessor before touching
    memory) in CUDA graphs and eagerly: the tokens of plain launches."""
    from kestrel.kernels import pdl

    prompts = _prompts(4)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("KESTREL_PDL", flag)
        pdl._enabled.cache_clear()
        assert pdl.pdl_args(torch.device("cuda")).get("launch_pdl", False) == (
            flag == "1" and torch.cuda.get_device_capability()[0] >= 9)
        runs[flag] = [_tokens(checkpoint, prompts, _uses_fast_path, device="cuda",
                              dtype=dt) for dt in ("float32", "bfloat16")]
        runs[flag].append(_tokens(checkpoint, prompts, device="cuda", dtype="bfloat16",
                                  enforce_eager=True))
    pdl._enabled.cache_clear()
    assert runs["1"] == runs["0"]


def test_llm_int8_on_gpu_equals_cpu_and_decodes_eagerly(checkpoint):
    """-q int8 (LLM.int8()): torch._int_mm's exact int32 sums give the tokens of the CPU's
    float64 ones; its outlier search reads back to the host, so the runner skips CUDA graphs."""
    prompts = _prompts(3)
    kw = {"dtype": "float32", "quantization": "int8"}
    cpu = _tokens(checkpoint, prompts, device="cpu", **kw)

    def eager(llm):
        assert llm.engine.executor.runner.graphs is None

    assert _tokens(checkpoint, prompts, eager, device="cuda", **kw) == cpu


def test_w8a8_on_gpu_equals_cpu_in_cuda_graphs(checkpoint):
    """-q w8a8: the per-token activation quantization and torch._int_mm's exact sums run inside
    the decode CUDA graphs (nothing reads back to the host) and give the CPU's tokens."""
    prompts = _prompts(3)
    kw = {"dtype": "float32", "quantization": "w8a8"}
    cpu = _tokens(checkpoint, prompts, device="cpu", **kw)

    def graphs(llm):
        assert llm.engine.executor.runner.graphs is not None

    assert _tokens(checkpoint, prompts, graphs, device="cuda", **kw) == cpu
