"""The Triton FP8 skinny GEMM and the FP8 layers' choice of it, against their references (the
fused producers of the MLP: test_fp8_fused.py).

CPU runs the kernels under TRITON_INTERPRET=1 (set by conftest) on small shapes; outputs and
split-K partials are poisoned with NaN so an element the kernel forgets to write shows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.kernels import fp8_gemm, skinny_config
from kestrel.kernels.fp8_gemm import bf16_gemm_small_m, fp8_gemm_small_m
from kestrel.kernels.skinny_config import SkinnyConfig, default_config, gpu_model, sm_count
from kestrel.layers.linear import ColumnParallelLinear, RowParallelLinear
from kestrel.parallel.state import TPGroup
from kestrel.quant.fp8 import (
    Fp8LinearMethod,
    QuantInput,
    dequantize,
    fp8_matmul,
    fp8_matmul_emulated,
    quantize_rowwise_ref,
    select_small_m_gemm,
)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# Kernels on CPU tensors run only under the interpreter, which a CUDA machine does not set
# (conftest); their GPU counterpart is test_fp8_fused.py's
# test_gpu_fp8_layers_pick_the_skinny_gemm_and_agree_with_cpu.
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="CPU tensors through the Triton kernels "
                                      "need TRITON_INTERPRET (CPU machines)")
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FEW = settings(max_examples=8, deadline=None)


def _operands(m: int, k: int, n: int, seed: int, device: str = DEV):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    if m > 1:
        x[m // 2] *= 50.0  # an outlier token: its own scale, the others unaffected
    xq, xs = quantize_rowwise_ref(x, 1200.0)
    wq, ws = quantize_rowwise_ref(0.05 * torch.randn(n, k, generator=gen))
    return xq.to(device), xs.to(device), wq.to(device), ws.to(device)


def _assert_matches_emulation(y, xq, xs, wq, ws, out_dtype, cfg: SkinnyConfig | None = None
                              ) -> None:
    """|y - ref| within float32 rounding: sums in any order and the scales applied before or
    after (2·(K + 4)·u·Σ|x·w|), plus one rounding of the output dtype. On a GPU, a tensor-core
    config (``cfg``, else the default for the shape) sums block_k products per float32 partial
    in the fp8 MMA's own accumulator, which keeps ~14 bits (DeepSeek-V3, section 3.3.2): up to
    2^-13 of Σ|x·w| per 32-product MMA (measured on an H200: at most 1.1e-4 of Σ|x·w| at
    block_k 64–256; the interpreter's dot is exact)."""
    assert y.dtype == out_dtype and y.shape == (xq.shape[0], wq.shape[0])
    assert not bool(torch.isnan(y).any()), "an output element was never written"
    (m, k), n = xq.shape, wq.shape[0]
    if y.is_cuda:
        cfg = cfg or default_config(m, n, k, sm_count("cuda", y.device.index),
                                    gpu=gpu_model("cuda", y.device.index))
    xq, xs, wq, ws = (t.cpu() for t in (xq, xs, wq, ws))
    ref = fp8_matmul_emulated(xq, xs, wq, ws, torch.float32)
    mag = dequantize(xq, xs).abs() @ dequantize(wq, ws).abs().t()  # [M, N] Σ_k |x_k w_k|
    tol = 2 * (k + 4) * 2.0 ** -24 * mag + 1e-30
    if y.is_cuda and cfg.use_dot and cfg.block_k > 32:
        tol = tol + cfg.block_k / 32 * 2.0**-13 * mag
    if out_dtype != torch.float32:
        tol = tol + torch.finfo(out_dtype).eps * ref.abs() + torch.finfo(out_dtype).tiny
    err = (y.cpu().float() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors (split-K partials, outputs) while active."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    monkeypatch.setattr(torch, "empty", empty)


CONFIGS = [
    None,  # default_config: FMA for one row, tensor-core dot for more
    SkinnyConfig(block_n=16, block_k=32, split_k=3),  # FMA, split-K
    SkinnyConfig(block_n=8, block_k=16, split_k=1),
    SkinnyConfig(block_n=16, block_k=32, split_k=4, use_dot=True),  # dot, split-K
    SkinnyConfig(block_n=32, block_k=64, split_k=1, use_dot=True),
    SkinnyConfig(block_n=16, block_k=32, split_k=2, evict_first=True, broadcast_x=True),
    SkinnyConfig(block_n=16, block_k=64, split_k=1, use_dot=True, evict_first=True),
    SkinnyConfig(block_n=8, block_k=16, split_k=2, prefetch=True),  # FMA, tiles a step ahead
    SkinnyConfig(block_n=16, block_k=32, split_k=1, broadcast_x=True, prefetch=True),
]


@FEW
@given(m=st.integers(1, 18), k=st.integers(1, 200), n=st.integers(1, 80),
       cfg=st.sampled_from(CONFIGS), out_dtype=st.sampled_from(OUT_DTYPES),
       seed=st.integers(0, 2**31))
def test_skinny_gemm_matches_emulation(m, k, n, cfg, out_dtype, seed):
    if cfg is not None and not cfg.use_dot:
        m = min(m, 3)  # FMA programs own one row each: correct for any M, meant for M == 1
    xq, xs, wq, ws = _operands(m, k, n, seed)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
    y = fp8_gemm_small_m(xq, xs, wq, ws, out_dtype, config=cfg, out=out)
    assert y is out
    _assert_matches_emulation(y, xq, xs, wq, ws, out_dtype, cfg)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[5]])
def test_split_k_partials_are_all_written(poison_empty, cfg):
    m, k, n = (1, 150, 40) if not cfg.use_dot else (5, 150, 40)  # K not a multiple of block_k
    xq, xs, wq, ws = _operands(m, k, n, seed=7)
    y = fp8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16, config=cfg)
    _assert_matches_emulation(y, xq, xs, wq, ws, torch.bfloat16, cfg)


def test_scales_as_rows_or_columns_and_strided_x():
    xq, xs, wq, ws = _operands(4, 64, 24, seed=1)
    base = torch.zeros(4, 96, dtype=xq.dtype, device=DEV)
    base[:, 16:80] = xq
    y = fp8_gemm_small_m(base[:, 16:80], xs, wq, ws.view(1, -1), torch.float32)
    _assert_matches_emulation(y, xq, xs, wq, ws, torch.float32)


def test_empty_and_bad_operands():
    xq, xs, wq, ws = _operands(2, 32, 16, seed=2)
    assert fp8_gemm_small_m(xq[:0], xs[:0], wq, ws).shape == (0, 16)
    zero_k = fp8_gemm_small_m(xq[:, :0], xs, wq[:, :0], ws, torch.float32)
    assert torch.equal(zero_k, torch.zeros(2, 16, device=DEV))
    with pytest.raises(ValueError, match="must be"):
        fp8_gemm_small_m(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="do not multiply"):
        fp8_gemm_small_m(xq, xs, wq[:, :16], ws)
    with pytest.raises(ValueError, match="one per row"):
        fp8_gemm_small_m(xq, xs[:1], wq, ws)
    with pytest.raises(ValueError, match="power of two"):
        SkinnyConfig(block_n=12, block_k=32)
    with pytest.raises(ValueError, match="broadcast_x"):
        SkinnyConfig(block_n=16, block_k=32, use_dot=True, broadcast_x=True)


def test_default_config_splits_k_only_when_columns_are_few(monkeypatch):
    monkeypatch.setattr(skinny_config, "TUNED", {})  # the rule, under the tuned entries
    # Llama 3 8B FFN on an H100/H200 (132 SMs).
    gate_up, down = default_config(1, 28672, 4096, 132), default_config(1, 4096, 14336, 132)
    assert gate_up.split_k == 1 and down.split_k > 1 and not down.use_dot
    assert default_config(16, 4096, 14336, 132).use_dot
    assert default_config(1, 64, 48, 132).split_k == 1  # one K step: nothing to split


def test_default_config_takes_tuned_entries_by_gpu_row_bucket_and_shape(monkeypatch):
    tuned = SkinnyConfig(block_n=32, block_k=64, split_k=2, use_dot=True, evict_first=True)
    monkeypatch.setitem(skinny_config.TUNED, (1, 4, 40, 160), tuned)  # 1 SM: the interpreter
    assert default_config(3, 40, 160, 1) is tuned  # 3 rows fall in the bucket of 4
    assert default_config(3, 40, 160, 132) != tuned and default_config(5, 40, 160, 1) != tuned
    xq, xs, wq, ws = _operands(3, 160, 40, seed=3)
    _assert_matches_emulation(fp8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16), xq, xs, wq, ws,
                              torch.bfloat16)


def test_a_gpu_models_entry_wins_over_its_sm_counts(monkeypatch):
    """H100 and H200 both have 132 SMs; an entry keyed by the model applies to that model only."""
    by_sms = SkinnyConfig(block_n=32, block_k=64)
    by_model = SkinnyConfig(block_n=16, block_k=128, split_k=2)
    monkeypatch.setitem(skinny_config.TUNED, (132, 1, 40, 160), by_sms)
    monkeypatch.setitem(skinny_config.TUNED, ("H200", 1, 40, 160), by_model)
    assert default_config(1, 40, 160, 132, gpu="H200") is by_model
    assert default_config(1, 40, 160, 132, gpu="H100") is by_sms
    assert default_config(1, 40, 160, 132) is by_sms
    assert skinny_config.gpu_model("cpu", None) is None


def test_int8_takes_its_own_entries_before_fp8s(monkeypatch):
    fp8, int8 = SkinnyConfig(block_n=32, block_k=64), SkinnyConfig(block_n=4, block_k=128)
    monkeypatch.setitem(skinny_config.TUNED, (132, 1, 40, 160), fp8)
    monkeypatch.setitem(skinny_config.TUNED, (132, 1, 48, 160), fp8)
    monkeypatch.setitem(skinny_config.TUNED_INT8, ("H200", 1, 40, 160), int8)
    assert default_config(1, 40, 160, 132, gpu="H200", int8=True) is int8
    assert default_config(1, 40, 160, 132, gpu="H200") is fp8
    assert default_config(1, 40, 160, 132, gpu="H100", int8=True) is fp8
    assert default_config(1, 48, 160, 132, gpu="H200", int8=True) is fp8  # no int8 entry


# ----------------------------------------------------------------------------- dispatch


def test_fp8_matmul_picks_the_skinny_gemm_by_rows(monkeypatch):
    calls = []
    real = fp8_gemm.fp8_gemm_small_m
    monkeypatch.setattr(fp8_gemm, "fp8_gemm_small_m",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for m in (1, 4, 5):
        xq, xs, wq, ws = _operands(m, 48, 32, seed=m)
        y = fp8_matmul(xq, xs, wq, ws, torch.float32, use_scaled_mm=False, small_m_max=4)
        _assert_matches_emulation(y, xq, xs, wq, ws, torch.float32)
    assert calls == [1, 4]  # 5 rows: past the threshold


def test_small_m_gemm_only_on_fp8_capable_cuda(monkeypatch):
    assert select_small_m_gemm(torch.device("cpu"), torch.bfloat16) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert select_small_m_gemm(torch.device("cuda"), torch.bfloat16) == 0


class _DoublingTP(TPGroup):
    """A one-rank group whose all-reduce doubles: shows the reduction happens, before the bias."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _fp8_layer(cls, bias: bool, **kw):
    gen = torch.Generator().manual_seed(10)
    layer = cls(64, 48, bias=bias, quant_method=Fp8LinearMethod(prefix="t.proj"), **kw)
    layer.weight.weight_loader(layer.weight, 0.05 * torch.randn(48, 64, generator=gen))
    if bias:
        layer.bias.data.copy_(torch.randn(48, generator=gen))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_prequantized_input_keeps_the_layer_forward(cls):
    """layer(QuantInput(q, s)) == layer(x) when (q, s) is x's quantization: bias, all-reduce."""
    kw = {"tp": _DoublingTP()} if cls is RowParallelLinear else {}
    layer = _fp8_layer(cls, bias=True, **kw)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    q, s = quantize_rowwise_ref(x, layer.quant_method.activation_scale_ub)
    assert torch.equal(layer(QuantInput(q, s)), layer(x))
    if cls is RowParallelLinear:
        plain = fp8_matmul_emulated(q, s, layer.weight, layer.weight_scale, torch.float32)
        torch.testing.assert_close(layer(x), 2 * plain + layer.bias, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_layer_with_skinny_gemm_enabled_matches_emulation():
    layer = _fp8_layer(ColumnParallelLinear, bias=False)
    layer.fp8_small_m_max = 16  # what select_small_m_gemm gives on an FP8 GPU
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    q, s = quantize_rowwise_ref(x, layer.quant_method.activation_scale_ub)
    _assert_matches_emulation(layer(x), q, s, layer.weight, layer.weight_scale, torch.float32)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(28672, 4096), (4096, 14336)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_llama_ffn_shapes_on_gpu(m, n, k):
    xq, xs, wq, ws = _operands(m, k, n, seed=m)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    _assert_matches_emulation(fp8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16, out=out),
                              xq, xs, wq, ws, torch.bfloat16)


@pytest.mark.parametrize("cfg", [SkinnyConfig(8, 16), SkinnyConfig(8, 16, split_k=3),
                                 SkinnyConfig(16, 32, split_k=2, broadcast_x=True)])
def test_prefetched_tiles_give_the_same_bits(cfg):
    """SkinnyConfig.prefetch changes when tiles are loaded, not the products or their order:
    one K step, a partial last step, several steps per split."""
    for k in (16, 40, 130):
        assert _same_fp8_bits(cfg, dataclasses.replace(cfg, prefetch=True), k)


def _same_fp8_bits(cfg: SkinnyConfig, variant: SkinnyConfig, k: int) -> bool:
    """Does ``variant`` give ``cfg``'s bits on one fresh x row and 24 weight rows of K = k?"""
    xq, xs, wq, ws = _operands(1, k, 24, k)
    return torch.equal(fp8_gemm_small_m(xq, xs, wq, ws, torch.float32, config=cfg),
                       fp8_gemm_small_m(xq, xs, wq, ws, torch.float32, config=variant))


def _launched_aheads(monkeypatch) -> list[int]:
    """AHEAD of every skinny-kernel launch from now on (the launch may fall back to 1)."""
    seen, real = [], fp8_gemm._skinny_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["AHEAD"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(fp8_gemm, "_skinny_kernel", Recorder())
    return seen


@pytest.mark.parametrize("cfg", [SkinnyConfig(8, 16), SkinnyConfig(8, 16, split_k=2),
                                 SkinnyConfig(16, 32, split_k=2, broadcast_x=True)])
@pytest.mark.parametrize("ahead", [2, 4])
def test_look_ahead_groups_give_the_same_bits(cfg, ahead, monkeypatch):
    """SkinnyConfig.ahead loads K steps in groups, not other products or another order: bit
    for bit the one-step loop, fp8 and bf16 (with the SwiGLU fold); where the groups do not
    tile a split (K = 40 in steps of 16; 3 steps) the launch runs one step at a time."""
    aheads = _launched_aheads(monkeypatch)
    for k in (40, 128, 256):
        assert _same_fp8_bits(cfg, dataclasses.replace(cfg, ahead=ahead), k)
        x = torch.randn(1, 2 * k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(24, k, device=DEV, dtype=torch.bfloat16)
        plain = bf16_gemm_small_m(x, w, config=cfg, glu=True)
        grouped = bf16_gemm_small_m(x, w, config=dataclasses.replace(cfg, ahead=ahead), glu=True)
        assert torch.equal(plain, grouped)
    grouped_launches = aheads[1::2]  # each pair of calls: one step at a time, then grouped
    assert ahead in grouped_launches and 1 in grouped_launches  # groups ran, and fell back
    with pytest.raises(ValueError, match="ahead"):
        SkinnyConfig(8, 16, ahead=3)
    with pytest.raises(ValueError, match="ahead"):
        SkinnyConfig(8, 16, prefetch=True, ahead=2)


@pytest.mark.parametrize("ahead", [2, 4])
@pytest.mark.parametrize("n,k", [(28672, 4096), (4096, 14336), (6144, 4096), (4096, 4096)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_look_ahead_groups_on_gpu(n, k, ahead):
    """The tuned FFN and attention-projection configs with K steps in groups: the same bits
    as one step at a time."""
    xq, xs, wq, ws = _operands(1, k, n, seed=ahead)
    cfg = default_config(1, n, k, sm_count("cuda", 0), gpu=gpu_model("cuda", 0))
    plain = fp8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16,
                             config=dataclasses.replace(cfg, ahead=1))
    grouped = fp8_gemm_small_m(xq, xs, wq, ws, torch.bfloat16,
                               config=dataclasses.replace(cfg, ahead=ahead))
    assert torch.equal(plain, grouped)
