"""LLM.int8() (kestrel/quant/int8.py): vector-wise int8 with the outlier features in float."""

from __future__ import annotations

import math

import pytest
import torch

from kestrel.config import QuantConfig
from kestrel.quant.int8 import Int8LinearMethod, llm_int8_matmul
from kestrel.quant.w8a8 import INT8_MAX, int8_matmul, quantize_rows_int8


def _operands(t: int, k: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, k, generator=g), 0.05 * torch.randn(n, k, generator=g)


def test_rows_quantize_within_half_a_step():
    _, w = _operands(1, 100, 24, seed=0)
    w[3] = 0.0  # an all-zero row stays zero, with a finite scale
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.shape == (24, 1) and bool(torch.isfinite(s).all())
    assert int(q.abs().max()) == INT8_MAX and not q[3].any()
    assert bool(((q.float() * s - w).abs() <= s / 2 + 1e-9).all())


def test_int8_product_is_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (5, 4096), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 4096), generator=g, dtype=torch.int8)
    want = a.long() @ b.long().t()
    assert torch.equal(int8_matmul(a, b).long(), want)


def test_outlier_columns_are_multiplied_in_float():
    """Planted outlier features: with the decomposition they contribute exactly (float), the
    rest within int8's resolution; without it (threshold inf) every row's scale stretches and
    the error grows several-fold: the paper's reason for the decomposition."""
    x, w = _operands(6, 256, 40, seed=2)
    x[:, [7, 100]] *= 30.0  # two outlier features, in every token
    x[4, 200] = 9.0  # one large value makes its whole column an outlier
    q, s = quantize_rows_int8(w)
    deq = q.float() * s
    y = llm_int8_matmul(x, q, s, 6.0)
    cols = [7, 100, 200]
    regular = x.clone()
    regular[:, cols] = 0.0
    xs = regular.abs().amax(1, keepdim=True) / INT8_MAX
    # exact arithmetic of the method: int8 codes of the regular part, float outliers
    want = (torch.round(regular / xs) * xs) @ deq.t() + x[:, cols] @ deq[:, cols].t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    exact = x @ w.t()
    err_mixed = float((y - exact).abs().max())
    err_plain = float((llm_int8_matmul(x, q, s, math.inf) - exact).abs().max())
    assert err_plain > 3 * err_mixed
    # bound: |Δx|·|w| + |x|·|Δw| + |Δx|·|Δw| per product, Δ = half a quantization step
    reg = [c for c in range(256) if c not in cols]
    bound = (xs / 2) * w[:, reg].abs().sum(1) + x.abs().sum(1, keepdim=True) * (s / 2).t() \
        + (xs / 2) * (s / 2).t() * len(reg)
    assert bool(((y - exact).abs() <= bound + 1e-5).all())


def test_bf16_activations_and_a_bias():
    from kestrel.layers.linear import ReplicatedLinear

    x, w = _operands(3, 64, 16, seed=3)
    layer = ReplicatedLinear(64, 16, True, torch.bfloat16, Int8LinearMethod(prefix="t"))
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.data.copy_(torch.randn(16))
    layer.quant_method.process_weights_after_loading(layer)
    y = layer(x.to(torch.bfloat16).view(1, 3, 64))
    assert y.shape == (1, 3, 16) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y[0].float(), x @ w.t() + layer.bias.float(), rtol=0.05,
                               atol=0.05)
    with pytest.raises(ValueError, match="float checkpoints"):
        layer.weight.weight_loader(layer.weight, w.to(torch.int8))
    with pytest.raises(ValueError, match="threshold"):
        Int8LinearMethod(threshold=0.0)


def test_tiny_model_in_int8_stays_close_to_float(h):
    """Every decoder linear in int8 (embedding and LM head float): logits close to the float
    model's, the same top-1 on nearly every position."""
    cfg = h.tiny_config(3)
    weights = h.hf_weights(cfg, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(4))
    want = h.prefill_logits(h.build(cfg, None, weights), ids.tolist())
    model = h.build(cfg, QuantConfig(method="int8"), weights)
    qs = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None),
                                                   Int8LinearMethod)]
    assert len(qs) == 4 * cfg.num_hidden_layers  # qkv, o, gate_up, down per layer
    assert model.embed_tokens.weight.dtype == torch.float32
    got = h.prefill_logits(model, ids.tolist())
    assert float((got - want).norm() / want.norm()) < 0.05  # a few int8 steps, 12 layers deep
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
