"""`kestrel bench roofline|latency|throughput|sweep` on tiny settings on CPU.

The figures themselves depend on the machine; what is checked is that every field is there and
that the fields agree with each other (tokens/s = tokens / time, fractions = figure / ceiling).
"""

from __future__ import annotations

import json

import pytest

from kestrel.bench.latency import kv_bytes_per_token, linear_params, weight_bytes
from kestrel.cli import main
from kestrel.loader.dummy import preset_config

TINY = ["--preset", "tiny-llama", "--device", "cpu", "--dtype", "float32"]
ROOF = ["--roofline-copy-mib", "4", "--roofline-matmul-n", "64", "--roofline-iters", "2"]


def run(args: list[str], tmp_path, name: str = "out.json") -> dict:
    out = tmp_path / name
    assert main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def check_env(res: dict) -> None:
    for key in ("device", "date", "commit", "command"):
        assert res["env"][key], key
    assert res["env"]["command"].startswith("kestrel bench ")


def test_roofline(tmp_path):
    res = run(["bench", "roofline", "--device", "cpu", "--copy-mib", "4", "--matmul-n", "64",
               "--iters", "2"], tmp_path)
    check_env(res)
    assert res["copy_bandwidth_Bps"] > 0 and res["matmul_n"] == [64]
    assert set(res["matmul_flops"]) == {"float32", "bfloat16", "fp8_rowwise", "int8"}
    assert res["matmul_flops"]["float32"] > 0  # float32 runs everywhere


def test_latency_fields_consistent(tmp_path):
    b, i, o = 2, 12, 5
    res = run(["bench", "latency", *TINY, *ROOF, "--batch", str(b), "--input-len", str(i),
               "--output-len", str(o), "--iters", "2", "--warmup", "1"], tmp_path)
    check_env(res)
    assert (res["batch"], res["input_len"], res["output_len"]) == (b, i, o)
    assert res["output_tokens"] == b * o
    assert res["tokens_per_s"] == pytest.approx(b * o / res["total_time_s"])
    assert res["prefill_tokens_per_s"] == pytest.approx(b * i / res["prefill_time_s"])
    assert res["decode_tokens_per_s"] == pytest.approx(b / res["tpot_s"])
    assert res["prefill_steps"] == 1 and res["decode_steps"] == o - 1  # whole batch per step
    assert res["full_batch_decode_steps"] == o - 1
    assert res["prefill_time_s"] + (o - 1) * res["tpot_s"] <= res["total_time_s"] * 1.0001
    assert res["preemptions"] == 0
    mcfg = preset_config("tiny-llama")
    kv = 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * mcfg.head_dim * 4
    assert res["kv_bytes_per_token"] == kv
    assert res["decode_bytes_per_step"] == pytest.approx(
        res["weight_bytes"] + b * kv * (i + o / 2))
    assert res["decode_bandwidth_Bps"] == pytest.approx(
        res["decode_bytes_per_step"] / res["tpot_s"])
    assert res["prefill_flops_per_s"] == pytest.approx(
        res["prefill_flops"] / res["prefill_time_s"])
    # every layer's linears for every token but the last layer's o_proj + MLP (one row per
    # prompt: the model's ``keep``), plus the LM head on one row per prompt and attention
    # (causal in every layer but the last, whose one kept row per prompt attends i keys)
    h, tail = mcfg.hidden_size, mcfg.q_size * mcfg.hidden_size + 3 * mcfg.hidden_size \
        * mcfg.intermediate_size
    head = 2 * mcfg.vocab_size * h * b
    attn = 2 * (mcfg.num_hidden_layers - 1) * mcfg.q_size * i * (i + 1) * b \
        + 4 * mcfg.q_size * i * b
    assert res["prefill_flops"] == pytest.approx(
        2 * (linear_params(mcfg) * b * i - tail * (b * i - b)) + head + attn)
    ceil = res["ceilings"]
    assert res["ceiling_matmul_kind"] == "float32"
    assert res["decode_bandwidth_fraction"] == pytest.approx(
        res["decode_bandwidth_Bps"] / ceil["copy_bandwidth_Bps"])
    assert res["prefill_flops_fraction"] == pytest.approx(
        res["prefill_flops_per_s"] / ceil["matmul_flops"]["float32"])


def test_latency_times_only_full_batch_decode_steps(tmp_path):
    """One prompt per step (the token budget holds one): requests admitted first decode while
    the rest prefill and finish first, so only the steps that run all of them give the TPOT."""
    b, i = 3, 16
    args = ["bench", "latency", *TINY, *ROOF, "--batch", str(b), "--input-len", str(i),
            "--iters", "1", "--warmup", "0", "--max-num-batched-tokens", str(i)]
    res = run([*args, "--output-len", "8"], tmp_path)
    # at least b prefill steps (decode tokens share the budget, so a prompt may be chunked);
    # the first requests' tokens run partly alongside the later prefills.
    assert res["prefill_steps"] >= b
    assert 0 < res["full_batch_decode_steps"] < res["decode_steps"]
    assert res["tpot_s"] is not None
    short = run([*args, "--output-len", "2"], tmp_path, "short.json")  # done before the last
    assert short["full_batch_decode_steps"] == 0 and short["tpot_s"] is None


def test_latency_runs_never_hit_the_prefix_cache():
    """A sweep reuses one engine with the same prompt seeds at every batch size: each run must
    still compute its prompts (a hit would time the cache, not the prefill)."""
    from kestrel import LLM
    from kestrel.bench.latency import bench_latency

    llm = LLM("tiny-llama", load_format="dummy", device="cpu", dtype="float32")
    pool = llm.engine.kv.pool
    for batch in (1, 2, 2):
        hits = pool.hits
        res = bench_latency(llm, batch, 40, 2, iters=1, warmup=1)
        assert pool.hits == hits and res["prefill_steps"] == 1


def test_latency_rest_idles_before_each_timed_run_only(monkeypatch):
    """--rest: the device idles before every timed run (not the warm-up), so each starts from
    the same power state; the JSON says how long; a negative rest is refused."""
    from kestrel import LLM
    from kestrel.bench import latency

    llm = LLM("tiny-llama", load_format="dummy", device="cpu", dtype="float32")
    events = []
    real = latency._one_iteration
    monkeypatch.setattr(latency.time, "sleep", lambda s: events.append(("rest", s)))
    monkeypatch.setattr(latency, "_one_iteration",
                        lambda *a: (events.append(("run", None)), real(*a))[1])
    res = latency.bench_latency(llm, 1, 8, 2, iters=2, warmup=1, rest_s=1.5)
    assert events == [("run", None), ("rest", 1.5), ("run", None), ("rest", 1.5),
                      ("run", None)]
    assert res["rest_s"] == 1.5 and res["iters"] == 2
    assert ("rest before each run (s)", 1.5) in latency.latency_rows(res)
    assert not any(k.startswith("rest") for k, _ in latency.latency_rows({**res, "rest_s": 0}))
    with pytest.raises(ValueError, match="rest_s"):
        latency.bench_latency(llm, 1, 8, 2, rest_s=-1)


def test_weight_bytes_match_the_model():
    from kestrel import LLM

    llm = LLM("tiny-llama", load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=8,
              max_model_len=128)
    mcfg = llm.engine.cfg.model_config
    h, v = mcfg.hidden_size, mcfg.vocab_size
    # untied: every parameter but the embedding table (the LM head is its own matrix)
    norms = (2 * mcfg.num_hidden_layers + 1) * h
    assert weight_bytes(llm.engine) == 4 * (linear_params(mcfg) + v * h + norms)
    assert kv_bytes_per_token(llm.engine) == 2 * 2 * 2 * 32 * 4


def test_latency_hf_baseline(tmp_path):
    res = run(["bench", "latency", *TINY, "--no-roofline", "--batch", "1", "--input-len", "8",
               "--output-len", "3", "--iters", "1", "--baseline", "hf"], tmp_path)
    hf = res["hf"]
    assert hf["tokens_per_s"] == pytest.approx(hf["output_tokens"] / hf["total_time_s"])
    assert res["speedup_vs_hf"] == pytest.approx(res["tokens_per_s"] / hf["tokens_per_s"])
    assert "decode_bandwidth_fraction" not in res  # --no-roofline: no ceilings, no fractions


def test_throughput_fields_consistent(tmp_path):
    n, i, o = 5, 10, 4
    res = run(["bench", "throughput", *TINY, "--workload", "trtllm-2k-128", "--num-prompts",
               str(n), "--input-len", str(i), "--output-len", str(o), "--baseline", "hf",
               "--hf-batch-size", "2"], tmp_path)
    check_env(res)
    assert (res["completed"], res["failed"]) == (n, 0)
    assert res["total_output_tokens"] == n * o and res["total_input_tokens"] == n * i
    d = res["duration_s"]
    assert res["output_throughput"] == pytest.approx(n * o / d)
    assert res["total_token_throughput"] == pytest.approx(n * (i + o) / d)
    assert res["requests_per_min"] == pytest.approx(60 * n / d)
    assert 0 < res["ttft_ms"]["median"] <= res["e2e_ms"]["median"] <= d * 1e3
    assert res["hf"]["output_tokens"] == n * o
    assert res["speedup_vs_hf"] == pytest.approx(
        res["output_throughput"] / res["hf"]["output_throughput"])
    # the engine's own settings travel with the figures: the CPU's default step budget
    from kestrel.engine.args import TOKEN_BUDGET, EngineArgs

    assert (res["max_num_batched_tokens"], res["max_num_seqs"]) == (TOKEN_BUDGET,
                                                                    EngineArgs.max_num_seqs)
    assert res["startup_s"] > 0
    phases = res["startup_phases_s"]  # where it went: the phases fit inside it
    assert list(phases) == ["model", "kv_sizing", "graphs"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= res["startup_s"]


def test_throughput_sampled_lengths(tmp_path):
    res = run(["bench", "throughput", *TINY, "--workload", "chat", "--num-prompts", "3",
               "--output-len", "4", "--max-model-len", "1024"], tmp_path)
    from kestrel.bench.workloads import get_workload

    lengths = get_workload("chat").with_overrides(num_prompts=3, output_len=4).lengths(0)
    assert len({i for i, _ in lengths}) == 3  # sampled input lengths, fixed output
    assert res["total_input_tokens"] == sum(i for i, _ in lengths)
    assert res["total_output_tokens"] == 3 * 4


def test_offline_sweep_two_configs(tmp_path):
    plot = tmp_path / "sweep.png"
    res = run(["bench", "sweep", *TINY, "--config", "fp32=", "--config",
               "bf16=--dtype bfloat16", "--batch-sizes", "1,2", "--input-len", "8",
               "--output-len", "3", "--iters", "1", "--no-roofline", "--plot", str(plot)],
              tmp_path)
    assert plot.stat().st_size > 0 and res["plot"] == str(plot)
    assert [(p["config"], p["x"], p["batch"]) for p in res["points"]] == [
        ("fp32", 1, 1), ("fp32", 2, 2), ("bf16", 1, 1), ("bf16", 2, 2)]
    assert all(p["tokens_per_s"] > 0 for p in res["points"])


@pytest.mark.parametrize("args, message", [
    (["bench", "latency", "--preset", "llama-9"], "unknown preset 'llama-9'"),
    (["bench", "throughput", *TINY, "--workload", "nope"], "unknown workload 'nope'"),
    (["bench", "throughput", *TINY, "--input-len", "8", "--output-len", "2",
      "--prompt-source", "text"],
     "text prompts need a tokenizer"),
    (["bench", "latency", *TINY, "--no-roofline", "--input-len", "2000"],
     "exceed max_model_len"),
    (["bench", "sweep", *TINY, "--config", "x"], "bad --config 'x'"),
])
def test_bad_arguments_name_the_problem(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_throughput_roofline_estimate_from_ceilings(tmp_path):
    """--ceilings adds the roofline model's estimate for the run; with every ceiling doubled
    (one GPU: no link terms) the estimate doubles, and the fraction is measured / estimate."""
    import json

    from kestrel.bench.throughput import roofline_estimate
    from kestrel.engine.llm import LLM

    ceil = {"copy_bandwidth_Bps": 2e10, "matmul_flops": {"float32": 5e10, "bfloat16": 5e10}}
    path = tmp_path / "roofline.json"
    path.write_text(json.dumps(ceil))
    res = run(["bench", "throughput", *TINY, "--workload", "trtllm-2k-128", "--num-prompts", "4",
               "--input-len", "12", "--output-len", "5", "--ceilings", str(path)], tmp_path)
    est = res["roofline_output_throughput"]
    assert est > 0 and res["roofline_fraction"] == pytest.approx(res["output_throughput"] / est)
    llm = LLM("tiny-llama", load_format="dummy", max_num_batched_tokens=2048)
    double = {"copy_bandwidth_Bps": 4e10, "matmul_flops": {"float32": 1e11, "bfloat16": 1e11}}
    one, two = (roofline_estimate(llm.engine, res, c) for c in (ceil, double))
    assert one == pytest.approx(est) and two == pytest.approx(2 * one)
