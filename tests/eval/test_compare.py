"""Model comparison: KL and agreement by hand on tiny distributions, then on the default model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kestrel.cli import main
from kestrel.eval.compare import compare_models, window_divergence
from kestrel.eval.perplexity import corpus_ids, token_windows


def test_divergence_by_hand():
    # position 0: P = (.6, .4), Q = (.3, .7); position 1: both (.9, .1); position 2 unscored
    p = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]).log()
    q = torch.tensor([[0.3, 0.7], [0.9, 0.1], [0.2, 0.8]]).log()
    ids = [1, 0, 1]  # targets: token 0 at position 0, token 1 at position 1
    d = window_divergence(p, q, ids)
    kl0 = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert d["kl"].tolist() == pytest.approx([kl0, 0.0], abs=1e-6)
    assert d["agree"].tolist() == [False, True]
    assert d["ll_base"] == pytest.approx(math.log(0.6) + math.log(0.1), rel=1e-6)
    assert d["ll_cand"] == pytest.approx(math.log(0.3) + math.log(0.1), rel=1e-6)


def test_model_against_itself(smollm_llm):
    windows = token_windows(corpus_ids(smollm_llm.get_tokenizer()), 64, 2)
    res = compare_models(smollm_llm, smollm_llm, windows)
    assert res["kl_mean"] == 0.0 and res["kl_max"] == 0.0
    assert res["top1_agreement"] == 1.0
    assert res["ppl_delta"] == 0.0
    assert res["seq_ll_diff"] == [0.0, 0.0]
    assert res["positions"] == 2 * 63


def test_float32_vs_bfloat16_cli(tmp_path):
    out, plot = tmp_path / "cmp.json", tmp_path / "hist.png"
    assert main(["eval", "compare", "--dtype", "bfloat16", "--baseline-dtype", "float32",
                 "--device", "cpu", "--window", "64", "--max-windows", "4", "--no-progress",
                 "--plot", str(plot), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["baseline"], res["candidate"]) == ("float32", "bfloat16")
    assert res["num_sequences"] == 4 and len(res["seq_ll_diff"]) == 4
    assert 0.0 < res["kl_mean"] < 0.05  # bf16 rounding: small but not zero
    assert res["kl_mean"] <= res["kl_p99"] <= res["kl_max"]
    assert 0.8 < res["top1_agreement"] <= 1.0
    assert abs(res["ppl_delta_rel"]) < 0.05
    assert res["ppl_delta"] == pytest.approx(res["ppl_candidate"] - res["ppl_baseline"])
    assert plot.stat().st_size > 0 and res["plot"] == str(plot)
    assert res["env"]["command"].startswith("kestrel eval compare ")


def test_fp8_against_unquantized(default_model_path):
    from kestrel import LLM
    from kestrel.eval.perplexity import eval_engine_kwargs
    from kestrel.quant.base import quant_methods

    if "fp8" not in quant_methods():
        pytest.skip("fp8 quantization is not built")
    kw = dict(device="cpu", dtype="float32", **eval_engine_kwargs(32, batch_size=8))
    base = LLM(str(default_model_path), **kw)
    cand = LLM(str(default_model_path), quantization="fp8", **kw)
    windows = token_windows(corpus_ids(base.get_tokenizer()), 32, 2)
    res = compare_models(base, cand, windows)
    assert res["kl_mean"] > 0.0  # quantization changes the distributions...
    assert res["top1_agreement"] > 0.5  # ...but not into a different model
