"""2:4 sparsity: the pattern kept is the two highest-scoring weights of every group of four,
-q sparse24 prunes every decoder linear on load, and a folder that claims 2:4 loads as such and
is refused when it does not hold the pattern."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel import LLM
from kestrel.quant.sparse import prune_2_4, violates_2_4, write_sparse_folder
from tests.parallel.common import make_tiny_checkpoint

CALIB = [[(11 * i + 7 * j) % 500 + 1 for j in range(40)] for i in range(3)]


def test_prune_keeps_the_two_best_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    score = torch.rand(6, 16)
    for s in (None, score):
        p = prune_2_4(w, s)
        assert violates_2_4(p) == 0 and int((p != 0).sum()) == w.numel() // 2
        key = w.abs() if s is None else s
        for r, g in itertools.product(range(6), range(4)):
            cols = range(4 * g, 4 * g + 4)
            best = sorted(cols, key=lambda c: -float(key[r, c]))[:2]
            assert {c for c in cols if p[r, c] != 0} == set(best)
            assert all(p[r, c] == w[r, c] for c in best)
    with pytest.raises(ValueError, match="multiples of 4"):
        prune_2_4(torch.randn(2, 6))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sp") / "float", layers=2, seed=2)


def test_quantization_sparse24_prunes_every_decoder_linear_on_load(ckpt):
    llm = LLM(str(ckpt), device="cpu", quantization="sparse24")
    model = llm.engine.executor.runner.model
    src = load_file(ckpt / "model.safetensors")
    layer = model.layers["1"]
    assert torch.equal(layer.mlp.down_proj.weight,
                       prune_2_4(src["model.layers.1.mlp.down_proj.weight"]))
    qkv = torch.cat([prune_2_4(src[f"model.layers.1.self_attn.{p}_proj.weight"]) for p in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    assert torch.equal(model.embed_tokens.weight, src["model.embed_tokens.weight"])
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}])[0].outputs[0]
    assert len(out.token_ids) > 0


def test_sparse_folder_loads_checked_and_refuses_a_broken_pattern(ckpt, tmp_path):
    out = write_sparse_folder(ckpt, tmp_path / "wanda", score="wanda", calibration=CALIB)
    sp = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sp["sparsity_structure"] == "2:4"
    t = load_file(out / "model.safetensors")
    w = t["model.layers.0.self_attn.o_proj.weight"]
    assert violates_2_4(w) == 0
    # Wanda's choice differs from magnitude's somewhere (the inputs' norms weigh in)
    assert not torch.equal(w != 0, prune_2_4(load_file(ckpt / "model.safetensors")[
        "model.layers.0.self_attn.o_proj.weight"]) != 0)
    llm = LLM(str(out), device="cpu")
    assert llm.engine.cfg.quant.method == "sparse24"
    assert torch.equal(llm.engine.executor.runner.model.layers["0"].self_attn.o_proj.weight, w)
    t["model.layers.1.mlp.up_proj.weight"][3, 4:8] = 1.0  # four non-zeros in one group
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"gate_up_proj\.weight: the checkpoint claims 2:4 "
                                         r"sparsity but 1 groups"):
        LLM(str(out), device="cpu")


def test_wanda_beats_magnitude_on_the_default_model(default_model_path, tmp_path):
    """2:4 without retraining costs a 135M model dearly either way, but Wanda's score (weights
    times their inputs' norms) keeps perplexity several times lower than magnitude pruning
    (the Wanda paper's finding; docs/QUANTIZATION.md has the figures)."""
    from kestrel.eval.compare import compare_models
    from kestrel.eval.perplexity import corpus_ids, eval_engine_kwargs, token_windows
    from kestrel.quant.calibrate import calibration_windows

    out = write_sparse_folder(default_model_path, tmp_path / "wanda",
                              calibration=calibration_windows(default_model_path, 4, 256))
    kw = dict(device="cpu", **eval_engine_kwargs(128, batch_size=12))
    base = LLM(str(default_model_path), **kw)
    windows = token_windows(corpus_ids(base.get_tokenizer()), 128, 12)
    magnitude = compare_models(base, LLM(str(default_model_path), quantization="sparse24", **kw),
                               windows, batch_size=12)
    wanda = compare_models(base, LLM(str(out), **kw), windows, batch_size=12)
    assert wanda["ppl_candidate"] < 0.3 * magnitude["ppl_candidate"], (wanda, magnitude)
    assert wanda["top1_agreement"] > magnitude["top1_agreement"]
