"""`kestrel plan` reproduces the seeds' statements about Llama 3.1 405B."""

from __future__ import annotations

import json

import pytest

from kestrel.cli import main
from kestrel.loader.dummy import preset_config
from kestrel.parallel.plan import Cluster, Workload, best, gpu_spec, plan

PAPER = Workload("llama3-paper", 4096, 256)
M405 = preset_config("llama-3.1-405b")


def _plan(gpu: str, n: int, prec: str, wl: Workload = PAPER):
    return plan(M405, Cluster(gpu_spec(gpu), n, 8), wl, (prec,))


def test_bf16_needs_two_machines():
    """Llama 3 paper §6: BF16 405B does not fit on one 8×H100 machine; it runs on 16 GPUs
    as TP=8 within a machine × PP=2 across the two."""
    assert not any(e.fits for e in _plan("h100", 8, "bf16"))
    two = {(e.tp, e.pp): e for e in _plan("h100", 16, "bf16")}
    assert two[(8, 2)].fits and two[(8, 2)].replicas == 1


def test_fp8_fits_one_machine():
    assert any(e.fits and e.tp * e.pp == 8 for e in _plan("h100", 8, "fp8"))
    assert any(e.fits for e in _plan("h200", 8, "fp8"))


@pytest.mark.parametrize("gpu,n,prec", [("h200", 8, "fp8"), ("h100", 16, "bf16")])
def test_tp_for_latency_pp_for_throughput(gpu, n, prec):
    """NVIDIA (seed 001): tensor parallelism gives the lowest latency, pipeline parallelism
    (with micro-batching) the highest throughput."""
    ests = _plan(gpu, n, prec, Workload("trtllm-2k-128", 2048, 128))
    lat, tput = best(ests, "latency"), best(ests, "throughput")
    assert lat.pp == 1 and lat.tp == n  # all tensor parallel
    assert tput.pp > 1 and tput.micro_batches == tput.pp
    assert tput.throughput > lat.throughput and lat.tpot < tput.tpot


def test_tp_divides_latency_pp_does_not():
    ests = {(e.tp, e.pp): e for e in _plan("h200", 8, "fp8")}
    assert ests[(8, 1)].tpot < ests[(4, 2)].tpot / 1.5 < ests[(2, 4)].tpot / 2.5
    assert ests[(1, 8)].bubble > ests[(2, 4)].bubble >= 0


def test_cli_prints_the_tables(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-3.1-405b", "--gpus", "16", "--gpus-per-node", "8",
                 "--gpu", "h100", "--objective", "throughput", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| TP8xPP2 | yes |" in text and "BF16: fits on 16 x H100" in text
    data = json.loads(out_json.read_text())
    assert any(e["tp"] == 8 and e["pp"] == 2 and e["fits"] for e in data["estimates"])
    assert main(["plan", "--gpus", "8", "--precision", "bf16"]) == 0
    assert "BF16: does not fit on 8 x H100" in capsys.readouterr().out


def test_cli_refuses_bad_input(capsys):
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert main(["plan", "--layout", "8by2"]) == 2
    assert "write TPxPP" in capsys.readouterr().err


def test_validate_against_measured(tmp_path, capsys):
    """The validation table: predicted vs measured, with the error in percent."""
    (tmp_path / "roofline.json").write_text(json.dumps(
        {"copy_bandwidth_Bps": 3.0e12, "matmul_flops": {"bfloat16": 7.0e14}}))
    (tmp_path / "lat.json").write_text(json.dumps(
        {"batch": 1, "input_len": 128, "output_len": 256, "tpot_s": 0.010,
         "prefill_time_s": 0.02}))
    (tmp_path / "manifest.json").write_text(json.dumps({"roofline": "roofline.json", "runs": [
        {"kind": "latency", "file": "lat.json", "model": "llama-3-8b", "tp": 2, "pp": 1},
        {"kind": "throughput", "file": "absent.json", "model": "llama-3-8b", "tp": 1, "pp": 2},
    ]}))
    assert main(["plan", "--gpu", "h100", "--validate", str(tmp_path / "manifest.json")]) == 0
    text = capsys.readouterr().out
    assert "| lat.json | TP2xPP1 | TPOT ms |" in text and "%" in text
    assert "absent.json | - | missing" in text


def test_layer_overhead_adds_per_layer_time_that_tp_does_not_shrink():
    """--layer-overhead-us: every token's trip through the model pays it once per layer, on
    whichever layout (the small kernels each rank still launches)."""
    wl = Workload("one", 128, 16, max_num_seqs=1)
    cfg = preset_config("llama-3-8b")
    for tp in (1, 2):
        base, extra = (
            {(e.tp, e.pp): e for e in plan(cfg, Cluster(gpu_spec("h200"), 2, 2, **kw), wl,
                                           ("bf16",))}[(tp, 1)]
            for kw in ({}, {"layer_overhead": 20e-6}))
        assert extra.tpot - base.tpot == pytest.approx(cfg.num_hidden_layers * 20e-6, rel=1e-6)


def test_fp8_kv_cache_doubles_the_kv_tokens_and_cuts_decode_kv_reads():
    """--kv-cache-dtype fp8: a cached token takes half the bytes, so the same free memory
    holds twice the tokens, and a long-context decode step reads less."""
    wl = Workload("long", 16384, 256, max_num_seqs=8)
    cl = Cluster(gpu_spec("h200"), 8, 8)
    bf16, fp8 = ({(e.tp, e.pp): e for e in plan(M405, cl, wl, ("fp8",), kv_elem_bytes=b)}
                 for b in (2, 1))
    for key, e in bf16.items():
        if e.fits:
            assert fp8[key].kv_tokens == pytest.approx(2 * e.kv_tokens, abs=2)
            assert fp8[key].tpot < e.tpot
