"""EngineArgs: defaults that depend on the device (the step token budget), scheduler flags."""

from __future__ import annotations

import types

import pytest
import torch

from kestrel.engine import args as engine_args
from kestrel.engine.args import EngineArgs, default_token_budget


def _fake_gpu(monkeypatch, capability: tuple[int, int], gib: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev=None: types.SimpleNamespace(total_memory=gib * 2**30))


def test_cpu_keeps_the_small_budget():
    assert default_token_budget("cpu") == default_token_budget("cpu", "server") == 2048
    cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu").create_config()
    assert cfg.scheduler.max_num_batched_tokens == 2048


@pytest.mark.parametrize("capability, gib, offline, server", [
    ((9, 0), 141, 16384, 8192),  # H200
    ((9, 0), 80, 16384, 8192),  # H100
    ((9, 0), 64, 2048, 2048),  # too little memory for 16k tokens of activations
    ((8, 0), 80, 2048, 2048),  # A100: not measured
])
def test_hopper_gpus_with_memory_take_big_budgets(monkeypatch, capability, gib, offline,
                                                   server):
    _fake_gpu(monkeypatch, capability, gib)
    assert default_token_budget("cuda:0") == offline
    assert default_token_budget("cuda", "server") == server


def test_a_given_budget_wins(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), 141)
    big = engine_args.BIG_GPU_TOKEN_BUDGET
    assert EngineArgs(max_num_batched_tokens=4096)._token_budget(8192, "cuda", "server") == 4096
    assert EngineArgs()._token_budget(8192, "cuda", "offline") == big["offline"]
    assert EngineArgs()._token_budget(8192, "cuda", "server") == big["server"]
    # without chunked prefill a whole prompt must fit one step
    assert EngineArgs(enable_chunked_prefill=False)._token_budget(32768, "cuda",
                                                                  "server") == 32768


def test_the_server_asks_for_its_budget(monkeypatch):
    """`kestrel serve` builds its config with usage "server" (CPU: the same 2,048)."""
    from kestrel.cli import build_parser
    from kestrel.engine import engine

    seen = []
    real = EngineArgs.create_config
    monkeypatch.setattr(EngineArgs, "create_config",
                        lambda self, usage="offline": seen.append(usage) or real(self, usage))

    def stop(cfg, tokenizer):
        seen.append(cfg.scheduler.max_num_batched_tokens)
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(engine, "Engine", stop)
    ns = build_parser().parse_args(["serve", "--preset", "tiny-llama", "--device", "cpu"])
    with pytest.raises(RuntimeError, match="stop before loading"):
        ns.func(ns)
    assert seen == ["server", engine_args.TOKEN_BUDGET]


def test_long_prefill_token_threshold_from_the_command_line():
    from kestrel.cli import build_parser
    from kestrel.engine.args import engine_args_from_cli

    ns = build_parser().parse_args(["generate", "--preset", "tiny-llama", "--device", "cpu",
                                    "--long-prefill-token-threshold", "512", "hi"])
    cfg = engine_args_from_cli(ns).create_config()
    assert cfg.scheduler.long_prefill_token_threshold == 512
    assert EngineArgs(model="tiny-llama", load_format="dummy", device="cpu").create_config() \
        .scheduler.long_prefill_token_threshold == 0


@pytest.mark.parametrize("native, dtype, hint", [
    (True, "auto", True), (False, "auto", False), (True, "float32", False),
    (True, "bfloat16", False)])
def test_cpu_with_native_bf16_hears_of_the_faster_dtype(monkeypatch, caplog, native, dtype,
                                                        hint):
    """'auto' stays float32 on CPU (the exact path); where the CPU multiplies bf16 natively the
    engine says --dtype bfloat16 would be faster, and says nothing once a dtype is chosen."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("INFO", logger="kestrel.engine.args"):
        cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu",
                         dtype=dtype).create_config()
    assert cfg.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    assert ("--dtype bfloat16" in caplog.text) == hint


def test_a_named_attention_backend_is_found_or_refused_clearly(monkeypatch):
    """``--attention-backend`` names a built-in backend whether or not its module was imported
    (a fresh process: the registry fills on import); triton on a CPU without Triton's
    interpreter, or an unknown name, is a ValueError that says why."""
    import subprocess
    import sys

    from kestrel.attention.base import get_backend_cls
    from kestrel.executor.model_runner import select_backend

    code = ("from kestrel.attention.base import get_backend_cls; "
            "print(get_backend_cls('torch').name, get_backend_cls('triton').name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["torch", "triton"]
    cfg = EngineArgs(model="tiny-llama", load_format="dummy", device="cpu",
                     attention_backend="triton").create_config()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA devices"):
        select_backend(cfg)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(cfg) == "triton"
    with pytest.raises(ValueError, match=r"unknown attention backend 'bogus'.*'torch', 'triton'"):
        get_backend_cls("bogus")
