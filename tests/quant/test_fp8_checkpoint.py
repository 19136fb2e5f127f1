"""fbgemm_fp8 checkpoints: write → load gives the on-the-fly logits bit for bit; bad files fail
with a ValueError naming the tensor; compressed-tensors FP8 maps onto the same layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kestrel.config import QuantConfig
from kestrel.loader.dummy import init_dummy_weights
from kestrel.loader.hf import iterate_weights, read_config
from kestrel.quant.fp8 import Fp8LinearMethod
from kestrel.quant.fp8_checkpoint import checkpoint_weights, quant_config_from_hf, quantize_folder

IDS = list(range(3, 40, 2))


def _load(h, folder):
    """What the model loader does with a folder (see fp8_checkpoint's module docstring)."""
    quant = quant_config_from_hf(read_config(folder))
    model = h.build(h.tiny_config(4), quant)
    model.load_weights(checkpoint_weights(iterate_weights(folder), quant))
    return model


@pytest.fixture
def folders(h, tmp_path):
    cfg = h.tiny_config(4)
    weights = h.hf_weights(cfg, seed=7)
    src = h.write_folder(tmp_path / "float", cfg, weights)
    return weights, src, quantize_folder(src, tmp_path / "fp8")


def test_written_folder_has_the_fbgemm_layout(folders):
    out = folders[2]
    qc = read_config(out)["quantization_config"]
    assert qc["quant_method"] == "fbgemm_fp8" and qc["activation_scale_ub"] == 1200.0
    not_converted = set(qc["modules_to_not_convert"])
    assert "lm_head" in not_converted
    assert {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 3) for p in ("gate", "up", "down")} \
        <= not_converted
    assert "model.layers.1.self_attn.q_proj" in not_converted
    tensors = dict(iterate_weights(out))
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    s = tensors["model.layers.1.mlp.down_proj.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and w.shape == (128, 256)
    assert s.dtype == torch.float32 and s.shape == (128, 1)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.weight_scale" not in tensors
    assert (out / "tokenizer.json").is_file()


def test_round_trip_logits_bit_identical_to_on_the_fly(h, folders):
    weights, _, out = folders
    on_the_fly = h.build(h.tiny_config(4), QuantConfig(method="fp8"), weights)
    from_file = _load(h, out)
    assert isinstance(from_file.layers["1"].mlp.down_proj.quant_method, Fp8LinearMethod)
    assert torch.equal(h.prefill_logits(from_file, IDS), h.prefill_logits(on_the_fly, IDS))


def test_compressed_tensors_fp8_dynamic_folder_loads(h, folders, tmp_path):
    """Same tensors under a compressed-tensors config (bf16 scales, as llm-compressor writes)."""
    weights, _, out = folders
    tensors = {k: (v.to(torch.bfloat16) if k.endswith("weight_scale") else v)
               for k, v in iterate_weights(out)}
    quantized = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    qc = _compressed_config(ignore=["lm_head"] + sorted(
        n for n in _linear_modules(4) if n not in quantized))
    folder = h.write_folder(tmp_path / "ct", h.tiny_config(4), tensors, qc)
    quant = quant_config_from_hf(read_config(folder))
    assert quant.method == "fp8" and quant.fp8_activation_scale_ub == math.inf
    logits = h.prefill_logits(_load(h, folder), IDS)
    ref = h.prefill_logits(h.build(h.tiny_config(4), None, weights), IDS)
    assert float((logits - ref).norm() / ref.norm()) < 0.05


# ----------------------------------------------------------------------------- bad checkpoints


def _broken(h, out, tmp_path, edit):
    tensors = dict(iterate_weights(out))
    edit(tensors)
    qc = read_config(out)["quantization_config"]
    return h.write_folder(tmp_path / "broken", h.tiny_config(4), tensors, qc)


@pytest.mark.parametrize("case,match", [
    ("drop_one_shard", "model.layers.2.mlp.up_proj.weight_scale"),
    ("drop_whole", "down_proj.weight_scale"),
    ("flat", "model.layers.1.mlp.gate_proj.weight_scale"),
    ("rows", "model.layers.1.mlp.gate_proj.weight_scale"),
    ("nan", "model.layers.2.mlp.down_proj.weight_scale"),
    ("inf", "model.layers.1.mlp.up_proj.weight_scale"),
    ("weight_nan", "model.layers.2.mlp.down_proj.weight"),
    ("weight_nan_fused", "model.layers.1.mlp.up_proj.weight"),  # one shard of gate_up
])
def test_bad_scales_raise_value_error_naming_the_tensor(h, folders, tmp_path, case, match):
    def edit(t):
        if case == "drop_one_shard":
            del t["model.layers.2.mlp.up_proj.weight_scale"]
        elif case == "drop_whole":
            del t["model.layers.1.mlp.down_proj.weight_scale"]
        elif case == "flat":
            t["model.layers.1.mlp.gate_proj.weight_scale"] = torch.ones(256)
        elif case == "rows":
            t["model.layers.1.mlp.gate_proj.weight_scale"] = torch.ones(255, 1)
        elif case == "nan":
            t["model.layers.2.mlp.down_proj.weight_scale"][5, 0] = float("nan")
        elif case == "weight_nan":
            t["model.layers.2.mlp.down_proj.weight"].view(torch.uint8)[3, 7] = 0xFF  # -NaN
        elif case == "weight_nan_fused":
            t["model.layers.1.mlp.up_proj.weight"].view(torch.uint8)[0, 0] = 0x7F  # +NaN
        else:
            t["model.layers.1.mlp.up_proj.weight_scale"][0, 0] = float("inf")

    folder = _broken(h, folders[2], tmp_path, edit)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        _load(h, folder)


def test_fp8_weight_without_checkpoint_config_is_refused(h, folders):
    model = h.build(h.tiny_config(4), QuantConfig(method="fp8"))
    with pytest.raises(ValueError, match="already FP8"):
        model.load_weights(iterate_weights(folders[2]))


# ----------------------------------------------------------------------------- configs


def test_quant_config_from_hf():
    assert quant_config_from_hf({}) is None
    assert quant_config_from_hf({"quantization_config": {"quant_method": "gptq"}}) is None
    q = quant_config_from_hf({"quantization_config": {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 800.0,
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}})
    assert q.method == "fp8" and q.fp8_activation_scale_ub == 800.0
    assert q.extra == {"checkpoint_format": "fbgemm_fp8",
                       "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"]}
    with pytest.raises(ValueError, match="activation_scale_ub"):
        quant_config_from_hf({"quantization_config": {"quant_method": "fbgemm_fp8",
                                                      "activation_scale_ub": float("nan")}})
    int4 = _compressed_config([])
    int4["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4)
    assert quant_config_from_hf({"quantization_config": int4}) is None
    tensor_wise = _compressed_config([])
    tensor_wise["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    with pytest.raises(ValueError, match="strategy 'tensor'"):
        quant_config_from_hf({"quantization_config": tensor_wise})
    static_act = _compressed_config([])
    static_act["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(ValueError, match="dynamic per-token"):
        quant_config_from_hf({"quantization_config": static_act})


def test_checkpoint_exclusion_list_selects_layers_and_guards_fused_ones(h):
    extra = {"checkpoint_format": "fbgemm_fp8",
             "modules_to_not_convert": ["lm_head", "self_attn", "model.layers.3.mlp.up_proj",
                                        "model.layers.3.mlp.gate_proj", "re:.*layers\\.0\\."]}
    model = h.build(h.tiny_config(4), QuantConfig(method="fp8", extra=extra))
    fp8 = {n for n, m in model.named_modules() if isinstance(getattr(m, "quant_method", None),
                                                            Fp8LinearMethod)}
    assert fp8 == {"layers.1.mlp.gate_up_proj", "layers.1.mlp.down_proj",
                   "layers.2.mlp.gate_up_proj", "layers.2.mlp.down_proj",
                   "layers.3.mlp.down_proj"}
    extra["modules_to_not_convert"] = ["model.layers.1.mlp.up_proj"]  # half of gate_up
    with pytest.raises(ValueError, match="all FP8 or all dense"):
        h.build(h.tiny_config(4), QuantConfig(method="fp8", extra=extra))


def test_dummy_weights_with_a_checkpoint_config(h):
    quant = QuantConfig(method="fp8", extra={"checkpoint_format": "fbgemm_fp8",
                                             "modules_to_not_convert": ["lm_head"]})
    model = h.build(h.tiny_config(2), quant)
    init_dummy_weights(model, seed=1)  # fills weight_scale (a parameter here) with signed noise
    scale = model.layers["0"].self_attn.qkv_proj.weight_scale
    assert bool((scale > 0).all()) and torch.isfinite(h.prefill_logits(model, IDS)).all()


def test_checkpoint_weights_drops_input_scale_ub():
    quant = quant_config_from_hf({"quantization_config": {"quant_method": "fbgemm_fp8"}})
    items = [("a.weight", torch.ones(1)), ("a.input_scale_ub", torch.ones(1))]
    assert [n for n, _ in checkpoint_weights(items, quant)] == ["a.weight"]
    assert len(list(checkpoint_weights(items, None))) == 2


def _linear_modules(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(num_layers)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _compressed_config(ignore: list[str]) -> dict:
    """An llm-compressor FP8_DYNAMIC config.json section."""
    return json.loads(json.dumps({
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ignore,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                        "dynamic": False, "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                  "dynamic": True, "symmetric": True}}}}))
