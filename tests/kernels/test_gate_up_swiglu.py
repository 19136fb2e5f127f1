"""gate_up_swiglu: the MLP's gate_up GEMM with SiLU·mul in its epilogue (quack's gated GEMM) for
steps of many rows.

CPU: quack's ``gemm_gated_out`` stood in by plain torch (the operands the engine hands it, the
product it must store), so which steps take it and what they compute are tested without a GPU;
GPU with quack installed: the real kernel against the float32 product.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.config import QuantConfig
from kestrel.layers import linear
from kestrel.layers.activation import silu_and_mul_ref
from kestrel.loader.dummy import preset_config
from kestrel.models.llama import LlamaMLP
from kestrel.parallel.state import SINGLE


def _quack_reference(calls: list):
    """gemm_gated_out's contract as the engine uses it, in plain torch: A [M, K]; B = Wᵀ [K, N]
    with W = [gate; up]; postact [M, N/2] = silu(A·gateᵀ) · (A·upᵀ) from the float32 product,
    rounded once; no pre-activation output."""
    def gemm_gated_out(a, b, preact, postact, activation, concat_layout, tuned):
        calls.append(a.shape[0])
        assert preact is None and activation == "swiglu" and concat_layout == "B" and not tuned
        assert b.shape == (a.shape[1], 2 * postact.shape[1]) and postact.shape[0] == a.shape[0]
        gate, up = (a.float() @ b.float()).chunk(2, dim=-1)
        postact.copy_(F.silu(gate) * up)
    return gemm_gated_out


def _mlp(quant: QuantConfig, seed: int) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(preset_config("tiny-llama"), 1, torch.bfloat16, quant, SINGLE)
    for p in mlp.parameters():
        if p.dtype == torch.bfloat16:
            p.data.normal_(0, 0.05)
    mlp.fold_act = True
    return mlp


def test_many_rows_take_one_gated_gemm(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(linear, "_quack_gated", lambda device: _quack_reference(calls))
    mlp = _mlp(QuantConfig(), seed=3)
    n = linear.GATED_MIN_TOKENS
    x = torch.randn(n + 37, mlp.gate_up_proj.weight.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        got = mlp(x)
        gate, up = F.linear(x.float(), mlp.gate_up_proj.weight.float()).chunk(2, dim=-1)
        want = mlp.down_proj((F.silu(gate) * up).to(torch.bfloat16))
        assert calls == [n + 37]
        assert torch.equal(got, want)
        # the two-step path rounds the product to bf16 before SiLU·mul: close, not equal
        two_steps = mlp.down_proj(silu_and_mul_ref(mlp.gate_up_proj(x)))
        torch.testing.assert_close(got, two_steps, rtol=2e-2, atol=2e-2)
        assert not torch.equal(got, two_steps)
        # fewer rows, float32, or a model whose MLP was not handed the GPU paths: the two steps
        assert torch.equal(mlp(x[: n - 1]), two_steps[: n - 1])
        assert linear.gate_up_swiglu(mlp.gate_up_proj.float(), x.float()) is None
        mlp.bfloat16()
        mlp.fold_act = False
        assert torch.equal(mlp(x), two_steps)
    assert calls == [n + 37]


def test_quantized_gate_up_keeps_its_method(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(linear, "_quack_gated", lambda device: _quack_reference(calls))
    mlp = _mlp(QuantConfig(method="fp8", fp8_skip_layers=False), seed=4)
    assert type(mlp.gate_up_proj.quant_method) is not linear.UnquantizedLinearMethod
    x = torch.randn(linear.GATED_MIN_TOKENS, mlp.gate_up_proj.input_size, dtype=torch.bfloat16)
    with torch.no_grad():
        assert linear.gate_up_swiglu(mlp.gate_up_proj, x) is None
    assert calls == []


def test_no_quack_off_hopper() -> None:
    assert linear._quack_gated(torch.device("cpu")) is None


def test_self_check_leaves_out_a_failing_or_wrong_kernel() -> None:
    """An installed kernel that raises (as quack does where it cannot fingerprint its code)
    or computes wrongly is reported, so the MLP keeps its two steps."""
    calls: list[int] = []
    cpu = torch.device("cpu")
    assert linear.gated_self_check(_quack_reference(calls), cpu) is None and calls

    def raises(*args, **kwargs):
        raise TypeError("epilogue fn depends on <ContextVar>")

    def gate_times_up(a, b, preact, postact, **kwargs):  # no SiLU
        gate, up = (a.float() @ b.float()).chunk(2, dim=-1)
        postact.copy_(gate * up)

    def skips_rows(a, b, preact, postact, **kwargs):
        _quack_reference([])(a[:-1], b, preact, postact[:-1], **kwargs)

    assert "TypeError: epilogue fn" in linear.gated_self_check(raises, cpu)
    assert "against the float64 product" in linear.gated_self_check(gate_times_up, cpu)
    assert "inf" in linear.gated_self_check(skips_rows, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quack_gated_gemm_gpu() -> None:
    """The real kernel (where quack is installed and the GPU is a Hopper) passes the engine's
    check of it, and against the float32 product at rows not a multiple of its tile."""
    quack = pytest.importorskip("quack.gemm_interface")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("quack is used on Hopper only")
    assert linear.gated_self_check(quack.gemm_gated_out, torch.device("cuda")) is None
    assert linear._quack_gated(torch.device("cuda")) is quack.gemm_gated_out
    gate_up = linear.MergedColumnParallelLinear(1024, [2816] * 2, dtype=torch.bfloat16).cuda()
    gate_up.weight.data.normal_(0, 1024 ** -0.5)
    x = torch.randn(linear.GATED_MIN_TOKENS + 301, 1024, dtype=torch.bfloat16, device="cuda")
    got = linear.gate_up_swiglu(gate_up, x)
    gate, up = F.linear(x.float(), gate_up.weight.float()).chunk(2, dim=-1)
    want = F.silu(gate) * up
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3)
    assert linear.gate_up_swiglu(gate_up, x[: linear.GATED_MIN_TOKENS - 1]) is None
