"""GPTQ-format checkpoints (kestrel/quant/gptq.py): packing, reading, refusing what is not
supported. Sharding under TP: tests/parallel/test_tp_quant.py."""

from __future__ import annotations

import json

import pytest
import torch

from kestrel import LLM
from kestrel.quant.gptq import (
    GptqLinearMethod,
    dequantize,
    pack_rows,
    quantize_rtn,
    unpack_rows,
    write_rtn_folder,
)
from tests.helpers import max_rel_err, prompt_logits
from tests.parallel.common import LONG, make_tiny_checkpoint


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_pack_as_autogptq_does(bits):
    """Each column a little-endian bit stream: 4-bit code j of a word at bits 4j (AutoGPTQ's
    layout), 3-bit codes 10 and 21 split across words; unpacking inverts packing."""
    codes = torch.randint(0, 1 << bits, (96, 5), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    assert torch.equal(unpack_rows(packed, bits, 96), codes.int())
    words = packed.long() & 0xFFFFFFFF
    if bits == 4:
        assert int(words[0, 0]) == sum(int(codes[j, 0]) << 4 * j for j in range(8))
    if bits == 3:  # code 10 holds bits 30..32 of the column's stream
        c10 = int(codes[10, 0])
        assert (int(words[0, 0]) >> 30) | ((int(words[1, 0]) & 1) << 2) == c10


@pytest.mark.parametrize("sym", [False, True])
def test_round_to_nearest_within_half_a_step(sym):
    w = 0.05 * torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    codes, zero, scale = quantize_rtn(w, 4, 64, sym)
    assert codes.shape == (256, 48) and zero.shape == scale.shape == (4, 48)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert int(zero.min()) >= 1  # the format stores zero − 1
    if sym:
        assert bool((zero == 8).all())
    deq = dequantize(pack_rows(codes, 4), zero, scale, 4, 64)
    step = scale.repeat_interleave(64, dim=0).t()  # [48, 256]
    # half a step, plus the symmetric grid's edge (7.5 steps) moved by the fp16 scale's rounding
    assert bool(((deq - w).abs() <= step * (0.5 + 8 * 2.0 ** -11)).all())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    dense = make_tiny_checkpoint(root / "dense", layers=2, seed=5)
    return dense, write_rtn_folder(dense, root / "gptq4", bits=4, group_size=32)


def test_rtn_folder_loads_to_the_dequantized_weights(tiny_pair):
    """Each linear's dequantized weight is the round-to-nearest of the float checkpoint's, and
    the model computes what the float model does with those weights."""
    from safetensors.torch import load_file

    dense, folder = tiny_pair  # on the CPU in float32: the format's bits, not a kernel's
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                   "sym": False, "checkpoint_format": "gptq"}
    llm = LLM(str(folder), device="cpu")
    layer = llm.engine.executor.runner.model.layers["1"].mlp.down_proj
    assert isinstance(layer.quant_method, GptqLinearMethod)
    w = load_file(str(dense / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    codes, zero, scale = quantize_rtn(w, 4, 32)
    torch.testing.assert_close(
        dequantize(layer.qweight, layer.qzeros, layer.scales, 4, 32),
        dequantize(pack_rows(codes, 4), zero, scale, 4, 32), rtol=0, atol=0)
    # the float model with every linear weight replaced by its dequantized codes: same logits
    ref = LLM(str(dense), device="cpu")
    ref_model = ref.engine.executor.runner.model
    for name, module in llm.engine.executor.runner.model.named_modules():
        if isinstance(getattr(module, "quant_method", None), GptqLinearMethod):
            ref_model.get_submodule(name).weight.data.copy_(
                dequantize(module.qweight, module.qzeros, module.scales, 4, 32))
    assert max_rel_err(prompt_logits(llm, LONG), prompt_logits(ref, LONG)) < 1e-5


def test_unsupported_gptq_checkpoints_are_refused(tiny_pair, tmp_path):
    import shutil

    dense, folder = tiny_pair
    with pytest.raises(ValueError, match="GPTQ-format checkpoints"):
        LLM(str(dense), quantization="gptq")
    act = tmp_path / "act"
    shutil.copytree(folder, act)
    cfg = json.loads((act / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True
    (act / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="act-order"):
        LLM(str(act))
    with pytest.raises(ValueError, match="bits"):
        GptqLinearMethod(5, 128)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    """The solver's point: on inputs with correlated features, pushing each column's rounding
    error onto the columns not yet quantized leaves a smaller output error ‖X(Ŵ − W)ᵀ‖ than
    rounding each weight alone, on the same grid family; codes stay in range."""
    from kestrel.quant.gptq_solver import gptq_quantize

    g = torch.Generator().manual_seed(3)
    k, n = 256, 64
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, k, generator=g) \
        + 0.1 * torch.randn(2048, k, generator=g)  # low-rank features plus noise
    w = 0.05 * torch.randn(n, k, generator=g)
    exact = x @ w.t()
    errs = {}
    for name, (codes, zero, scale) in {
            "rtn": quantize_rtn(w, 4, 64),
            "gptq": gptq_quantize(w, x.double().t() @ x.double(), 4, 64)}.items():
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15 and int(zero.min()) >= 1
        deq = dequantize(pack_rows(codes, 4), zero, scale, 4, 64)
        errs[name] = float((x @ deq.t() - exact).norm())
    assert errs["gptq"] < 0.7 * errs["rtn"], errs


def test_gptq_folder_from_calibration_windows(tiny_pair, tmp_path):
    """write_gptq_folder on the tiny model (token windows given, it has no tokenizer): a GPTQ
    folder that loads, closer to the float model than round-to-nearest on the same windows'
    kind of text."""
    from kestrel.quant.gptq_solver import write_gptq_folder

    dense, rtn = tiny_pair
    gen = torch.Generator().manual_seed(8)
    calib = [torch.randint(1, 500, (64,), generator=gen).tolist() for _ in range(16)]
    out = write_gptq_folder(dense, tmp_path / "gptq", bits=4, group_size=32,
                            calibration=calib)
    want = prompt_logits(LLM(str(dense)), LONG)
    err_gptq = max_rel_err(prompt_logits(LLM(str(out)), LONG), want)
    err_rtn = max_rel_err(prompt_logits(LLM(str(rtn)), LONG), want)
    assert 0 < err_gptq < err_rtn, (err_gptq, err_rtn)
