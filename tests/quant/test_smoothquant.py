"""W8A8 and SmoothQuant: the int8 product within its rounding bound, smoothing as an exact
rewrite of the float model that flattens the quantized inputs, the compressed-tensors folder
loading back (and refused when broken), and smoothing paying off on the real model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel import LLM
from kestrel.quant.calibrate import block_forward, load_float_model
from kestrel.quant.smoothquant import smooth_model, write_smoothquant_folder
from kestrel.quant.w8a8 import w8a8_matmul
from tests.helpers import prompt_logits
from tests.parallel.common import make_tiny_checkpoint

TOKENS = [3, 17, 101, 45, 9, 250, 77, 12, 300, 5, 61, 200, 33, 90, 8, 140]
CALIB = [[(7 * i + 13 * j) % 500 + 1 for j in range(48)] for i in range(4)]


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory):
    """A 2-layer random Llama whose input norms make channel 5 of every block's attention and
    MLP inputs ~40× the others: the activation outlier SmoothQuant is for."""
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("sq") / "float", layers=2, seed=3)
    path = folder / "model.safetensors"
    t = load_file(path)
    for name in t:
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t[name][5] *= 40.0
    save_file(t, path, metadata={"format": "pt"})
    return folder


def test_w8a8_matmul_within_the_rounding_bound():
    """|x·w − x̂·ŵ| ≤ Σ_k |x| e_w + |w| e_x + e_x e_w per element, e = half a step of each
    row's grid: the CPU's int8 product is exact, so only rounding remains."""
    torch.manual_seed(0)
    x = torch.randn(9, 64) * torch.rand(9, 1) * 4
    x[:, 3] *= 30  # an outlier channel
    w = torch.randn(24, 64)
    from kestrel.quant.w8a8 import quantize_rows_int8

    wq, ws = quantize_rows_int8(w)
    y = w8a8_matmul(x, wq, ws)
    ex = x.abs().amax(1, keepdim=True) / 127 / 2  # [T, 1]
    ew = ws.t() / 2  # [1, N]
    bound = ex * w.abs().sum(1)[None] + x.abs().sum(1, keepdim=True) * ew + 64 * ex * ew
    err = (y - x @ w.t()).abs()
    assert (err <= bound * 1.001 + 1e-5).all()
    assert err.max() > 0  # it did quantize


@torch.no_grad()
def test_smoothing_is_exact_and_flattens_the_inputs(outlier_ckpt):
    model = load_float_model(outlier_ckpt)
    x0 = model.embed_tokens(torch.tensor(TOKENS))

    def hidden_and_qkv_input_range():
        seen = []
        hook = model.layers["1"].self_attn.qkv_proj.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].abs().amax(0)))
        state = (x0, None)
        for layer in model.layers.values():
            state = block_forward(model.cfg, layer, *state)
        hook.remove()
        amax = seen[0]
        return state[0] + state[1], float(amax.max() / amax.median())

    before, spread_before = hidden_and_qkv_input_range()
    smooth_model(model, CALIB, alpha=0.5)
    after, spread_after = hidden_and_qkv_input_range()
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert spread_before > 10 and spread_after < spread_before / 3
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, CALIB, alpha=1.5)


def test_folder_loads_back(outlier_ckpt, tmp_path):
    """The written folder loads as W8A8 from its config alone, and on the planted outlier its
    logits are closer to the float model's than plain W8A8's (the real model's figures:
    test_smoothquant_beats_plain_w8a8_on_the_default_model)."""
    out = write_smoothquant_folder(outlier_ckpt, tmp_path / "sq", alpha=0.5, calibration=CALIB)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    ref = prompt_logits(LLM(str(outlier_ckpt), device="cpu"), TOKENS)
    llm = LLM(str(out), device="cpu")
    assert llm.engine.cfg.quant.method == "w8a8"
    smooth = prompt_logits(llm, TOKENS)
    plain = prompt_logits(LLM(str(outlier_ckpt), device="cpu", quantization="w8a8"), TOKENS)

    def err(x):
        return float((x - ref).norm() / ref.norm())

    assert 0 < err(smooth) < err(plain), (err(smooth), err(plain))


def test_smoothquant_beats_plain_w8a8_on_the_default_model(default_model_path, tmp_path):
    """The real model, which has outlier channels: W8A8 without smoothing loses ~4% perplexity
    on pydoc text, SmoothQuant (α 0.5, calibrated on the text's end) about a third of that."""
    from kestrel.eval.compare import compare_models
    from kestrel.eval.perplexity import corpus_ids, eval_engine_kwargs, token_windows
    from kestrel.quant.calibrate import calibration_windows

    out = write_smoothquant_folder(default_model_path, tmp_path / "sq", alpha=0.5,
                                   calibration=calibration_windows(default_model_path, 4, 256))
    kw = dict(device="cpu", **eval_engine_kwargs(128, batch_size=12))
    base = LLM(str(default_model_path), **kw)
    windows = token_windows(corpus_ids(base.get_tokenizer()), 128, 12)
    plain = compare_models(base, LLM(str(default_model_path), quantization="w8a8", **kw),
                           windows, batch_size=12)
    smooth = compare_models(base, LLM(str(out), **kw), windows, batch_size=12)
    assert smooth["ppl_delta_rel"] < 0.6 * plain["ppl_delta_rel"], (smooth, plain)
    assert smooth["kl_mean"] < plain["kl_mean"] and smooth["ppl_delta_rel"] < 0.03


@pytest.mark.parametrize("break_it, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight_scale"),
     r"missing model\.layers\.1\.self_attn\.k_proj\.weight_scale"),
    (lambda t: t["model.layers.0.mlp.up_proj.weight_scale"].fill_(float("nan")),
     r"up_proj\.weight_scale: scales must be finite"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.weight_scale":
                         t["model.layers.0.mlp.down_proj.weight_scale"][:, 0]}),
     r"down_proj\.weight_scale: shape .* expected \[out_features, 1\]"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                         t["model.layers.0.self_attn.o_proj.weight"].float()}),
     r"o_proj\.weight: dtype torch\.float32, expected int8"),
])
def test_broken_folders_are_refused(outlier_ckpt, tmp_path, break_it, message):
    out = write_smoothquant_folder(outlier_ckpt, tmp_path / "sq", calibration=CALIB[:1])
    path = out / "model.safetensors"
    t = load_file(path)
    break_it(t)
    save_file(t, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        LLM(str(out), device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 16, 17, 300])
def test_w8a8_matmul_on_gpu_equals_cpu(rows):
    """torch._int_mm's int32 sums (rows padded to 17) are the CPU's exact float64 sums; the
    same scaling follows."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 256) * 3
    from kestrel.quant.w8a8 import quantize_rows_int8

    wq, ws = quantize_rows_int8(torch.randn(512, 256))
    cpu = w8a8_matmul(x, wq, ws)
    gpu = w8a8_matmul(x.cuda(), wq.cuda(), ws.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
