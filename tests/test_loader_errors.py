"""Broken checkpoints fail with a message naming the file and the tensor; nothing loads silently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel import LLM
from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_hf_checkpoint("tiny-llama", tmp_path_factory.mktemp("good") / "m")


def _copy(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst, dst / "model.safetensors"


def test_missing_tensor_is_named(good, tmp_path):
    folder, f = _copy(good, tmp_path)
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj"):
        LLM(str(folder), load_format="safetensors")


def test_mismatched_shape_is_named(good, tmp_path):
    folder, f = _copy(good, tmp_path)
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(3, 128)
    save_file(tensors, f)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight"):
        LLM(str(folder))


def test_truncated_file_is_named(good, tmp_path):
    folder, f = _copy(good, tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(folder))


def test_pickle_checkpoint_only_with_weights_only(good, tmp_path):
    folder, f = _copy(good, tmp_path)
    torch.save(load_file(f), folder / "pytorch_model.bin")
    f.unlink()
    assert LLM(str(folder)).engine is not None  # plain tensors load through weights_only=True

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        LLM(str(folder))


def test_bad_config_is_named(good, tmp_path):
    folder, _ = _copy(good, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(folder))
