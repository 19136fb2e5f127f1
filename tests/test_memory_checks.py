"""Start-up memory errors say how much was needed and what to change (issue 5): the weights are
counted before anything is loaded, and a profile forward that runs out of memory is explained."""

from __future__ import annotations

import pytest
import torch

from kestrel import LLM
from kestrel.attention.base import get_backend_cls
from kestrel.cli import main
from kestrel.engine.args import EngineArgs
from kestrel.executor import model_runner
from kestrel.executor.loading import check_weights_fit, model_bytes
from kestrel.models.registry import get_model_cls
from kestrel.parallel.state import SINGLE
from kestrel.quant.gptq import write_rtn_folder
from tests.parallel.common import make_tiny_checkpoint

GiB = 2**30


def _held_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _meta_bytes(cfg) -> int:
    return model_bytes(cfg, get_model_cls(cfg.model_config.architecture),
                       get_backend_cls("torch"), SINGLE, None)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense") / "m", layers=3, seed=1)


@pytest.mark.parametrize("kw", [
    {"dtype": "float32"}, {"dtype": "bfloat16"},
    {"dtype": "bfloat16", "quantization": "fp8"},
    {"dtype": "bfloat16", "quantization": "fp8", "fp8_attention": True,
     "fp8_skip_layers": False},
    {"dtype": "bfloat16", "quantization": "fp8-tensor"},
    {"dtype": "bfloat16", "quantization": "int8"},
    {"dtype": "bfloat16", "quantization": "w8a8"},
    {"dtype": "bfloat16", "quantization": "sparse24"},
])
def test_meta_count_is_what_the_loaded_model_holds(dense, kw):
    """The meta-device count equals the bytes of the model as loaded, for every quantization
    (the 3-layer checkpoint has a middle layer the FP8 recipe quantizes)."""
    llm = LLM(str(dense), device="cpu", **kw)
    held = _held_bytes(llm.engine.executor.runner.model)
    assert _meta_bytes(llm.engine.cfg) == held


def test_meta_count_of_a_gptq_folder(dense, tmp_path):
    folder = write_rtn_folder(dense, tmp_path / "gptq4", bits=4, group_size=32)
    llm = LLM(str(folder), device="cpu")
    assert _meta_bytes(llm.engine.cfg) == _held_bytes(llm.engine.executor.runner.model)


def test_70b_in_bf16_is_refused_on_one_h200_before_loading(monkeypatch):
    """Llama-3-70B's shape: BF16 (131.4 GiB) cannot fit what 0.9 of an H200's 139.8 GiB
    leaves, and says so with the figures and what to change; the FP8 recipe fits."""
    total = int(139.8 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - GiB, total))
    bf16 = EngineArgs(model="llama-3-70b", load_format="dummy", device="cpu",
                      dtype="bfloat16").create_config()
    need = _meta_bytes(bf16)
    assert 131 * GiB < need < 132 * GiB  # 70.6e9 parameters at 2 bytes
    with pytest.raises(RuntimeError, match=r"needs 131\.4 GiB.*leaves 124\.8 GiB.*--quantization fp8"):
        check_weights_fit(bf16, need)
    fp8 = EngineArgs(model="llama-3-70b", load_format="dummy", device="cpu", dtype="bfloat16",
                     quantization="fp8").create_config()
    check_weights_fit(fp8, _meta_bytes(fp8))  # 80 GiB: fits


def test_cli_prints_the_memory_error_without_a_traceback(monkeypatch, capsys):
    """The refusal reaches the command line as one message and exit status 1, not a trace."""
    total = 80 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - GiB, total))

    def refuse(cfg, *args):  # build_model's check as on a GPU, for a model of 200 GiB
        check_weights_fit(cfg, 200 * GiB)

    monkeypatch.setattr(model_runner, "build_model", refuse)
    code = main(["generate", "hi", "--model", "tiny-llama", "--load-format", "dummy",
                 "--device", "cpu", "--max-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("kestrel: error: out of GPU memory for the weights: tiny-llama")
    assert "needs 200.0 GiB" in err and "Traceback" not in err


def test_profile_forward_out_of_memory_is_explained(monkeypatch):
    llm = LLM("tiny-llama", load_format="dummy", device="cpu", max_num_batched_tokens=512)
    runner = llm.engine.executor.runner
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GiB, 80 * GiB))

    def oom() -> int:
        runner.kv_caches = [(torch.zeros(1), torch.zeros(1))]  # what the profile had allocated
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match=r"forward of 512 tokens.*79\.0 of 80\.0 GiB.*"
                                           r"--max-num-batched-tokens") as e:
        runner.profile_or_explain(oom)
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
    assert runner.kv_caches == []


def test_meta_count_under_tp_is_this_ranks_share():
    """A TP rank counts its shard (norms and the rotary table stay whole): just over half at
    TP=2, built without a process group (the constructors read only rank and size)."""
    from kestrel.parallel.state import TPGroup

    cfg = EngineArgs(model="llama-3-8b", load_format="dummy", device="cpu",
                     dtype="bfloat16").create_config()
    cls, backend = get_model_cls(cfg.model_config.architecture), get_backend_cls("torch")
    full = model_bytes(cfg, cls, backend, SINGLE, None)
    half = model_bytes(cfg, cls, backend, TPGroup(rank=1, size=2), None)
    assert full / 2 < half < full / 2 * 1.001
