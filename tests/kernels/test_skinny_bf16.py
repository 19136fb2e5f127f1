"""bf16_gemm_small_m: the skinny FP8 GEMM's kernel without scales, against x.float() @ w.float().T.

CPU runs it under TRITON_INTERPRET=1 (set by this folder's conftest) on small shapes; outputs and
split-K partials start as NaN so an element the kernel forgets to write shows.
"""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels import fp8_gemm, skinny_config
from kestrel.kernels.fp8_gemm import bf16_gemm_small_m
from kestrel.kernels.skinny_config import SkinnyConfig, default_config

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

CONFIGS = {
    "default": None,  # default_config(elem_bytes=2): FMA for one row, dot for more
    "fma": SkinnyConfig(block_n=8, block_k=16),
    "fma_split": SkinnyConfig(block_n=16, block_k=32, split_k=3),
    "fma_bx_ef": SkinnyConfig(block_n=16, block_k=32, split_k=2, evict_first=True,
                              broadcast_x=True),
    "fma_prefetch_split": SkinnyConfig(block_n=8, block_k=16, split_k=3, prefetch=True),
    "dot": SkinnyConfig(block_n=32, block_k=64, use_dot=True),
    "dot_split": SkinnyConfig(block_n=16, block_k=32, split_k=4, use_dot=True),
}


def _operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    if m > 1:
        x[m // 2] *= 50.0  # a row of another magnitude: no shared scale to hide behind
    w = 0.05 * torch.randn(n, k, generator=gen)
    return x.to(dtype).to(DEV), w.to(dtype).to(DEV)


def _assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y ≈ the float32 product rounded to x's dtype: float32 sums in another order
    (2·K·u·Σ|x·w|) plus, for 16-bit outputs, one rounding of the output dtype."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    assert not bool(torch.isnan(y).any()), "an output element was never written"
    xf, wf = x.cpu().double(), w.cpu().double()
    ref = xf @ wf.T
    tol = 2 * (x.shape[1] + 2) * 2.0 ** -24 * (xf.abs() @ wf.abs().T) + 1e-30
    if x.dtype != torch.float32:
        tol = tol + torch.finfo(x.dtype).eps * ref.abs() + torch.finfo(x.dtype).tiny
    err = (y.cpu().double() - ref).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max())}"
    if x.dtype != torch.float32:  # and what the brief asks: the float32 product, rtol 1e-2
        want = (x.float() @ w.float().T).to(x.dtype)
        torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_float32_product(name, m, dtype):
    cfg = CONFIGS[name]
    x, w = _operands(m, 40, 150, dtype, seed=m)  # K not a multiple of block_k, N of block_n
    out = torch.full((m, 40), float("nan"), dtype=dtype, device=DEV)
    y = bf16_gemm_small_m(x, w, config=cfg, out=out)
    assert y is out
    _assert_close(y, x, w)


def test_split_k_partials_are_all_written(monkeypatch):
    real = torch.empty

    def empty(*args, **kw):  # NaN-filled float32 partials
        t = real(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    for cfg in (CONFIGS["fma_split"], CONFIGS["dot_split"]):
        x, w = _operands(3, 24, 200, torch.bfloat16, seed=4)
        _assert_close(bf16_gemm_small_m(x, w, config=cfg), x, w)


def test_default_config_keeps_bytes_per_step_and_has_its_own_table(monkeypatch):
    monkeypatch.setattr(skinny_config, "TUNED", {})
    monkeypatch.setattr(skinny_config, "TUNED_16BIT", {})
    for m in (1, 4):
        fp8, bf16 = (default_config(m, 28672, 4096, 132, elem_bytes=b) for b in (1, 2))
        assert bf16.block_k * 2 == fp8.block_k and bf16.use_dot == fp8.use_dot
    assert default_config(1, 64, 48, 132, elem_bytes=2).block_k == 64  # tiny K still clamps
    tuned = SkinnyConfig(block_n=16, block_k=32, split_k=2, use_dot=True)
    monkeypatch.setitem(skinny_config.TUNED_16BIT, (1, 4, 40, 160), tuned)
    assert default_config(3, 40, 160, 1, elem_bytes=2) is tuned
    assert default_config(3, 40, 160, 1) != tuned  # fp8 keeps its own table
    assert default_config(3, 40, 160, 1, elem_bytes=4) != tuned  # float32: the rule
    x, w = _operands(3, 40, 160, torch.bfloat16, seed=5)
    _assert_close(bf16_gemm_small_m(x, w), x, w)


def test_strided_x_empty_and_bad_operands():
    x, w = _operands(2, 16, 32, torch.bfloat16, seed=6)
    base = torch.zeros(2, 64, dtype=x.dtype, device=DEV)
    base[:, 8:40] = x
    _assert_close(bf16_gemm_small_m(base[:, 8:40], w), x, w)
    assert bf16_gemm_small_m(x[:0], w).shape == (0, 16)
    assert torch.equal(bf16_gemm_small_m(x[:, :0], w[:, :0]),
                       torch.zeros(2, 16, dtype=x.dtype, device=DEV))
    with pytest.raises(ValueError, match="one dtype"):
        bf16_gemm_small_m(x, w.float())
    with pytest.raises(ValueError, match="one dtype"):
        bf16_gemm_small_m(x.double(), w.double())
    with pytest.raises(ValueError, match="do not multiply"):
        bf16_gemm_small_m(x, w[:, :16])
    with pytest.raises(ValueError, match="out must be"):
        bf16_gemm_small_m(x, w, out=torch.empty(2, 16, device=DEV))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_llama_shapes_on_gpu(m, n, k):
    x, w = _operands(m, n, k, torch.bfloat16, seed=m)
    _assert_close(bf16_gemm_small_m(x, w), x, w)


def test_beats_cublas_only_for_listed_shapes(monkeypatch):
    """The layers run the kernel exactly where TUNED_16BIT lists the shape (rows rounded up to
    a power of two) on a GPU of this many SMs; fp8 and float32 weights never."""
    monkeypatch.setattr(skinny_config, "TUNED_16BIT", {})
    x, w = _operands(3, 40, 160, torch.bfloat16, seed=7)
    assert not skinny_config.beats_cublas(x, w)
    sms = skinny_config.sm_count(x.device.type, x.device.index)
    monkeypatch.setitem(skinny_config.TUNED_16BIT, (sms, 4, 40, 160), SkinnyConfig(8, 32))
    assert skinny_config.beats_cublas(x, w)
    assert skinny_config.beats_cublas(x[:1].expand(4, -1), w)
    assert not skinny_config.beats_cublas(x[:1], w)  # M=1 is another entry
    assert not skinny_config.beats_cublas(x, w[:, :80])
    assert not skinny_config.beats_cublas(x, w[:20])
    assert not skinny_config.beats_cublas(x.float(), w.float())
    assert not skinny_config.beats_cublas(x[None], w)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_dense_linear_runs_the_kernel_for_listed_shapes(monkeypatch):
    """Unquantized layers (and the LM head) call dense_linear: the kernel for a listed shape,
    F.linear otherwise or with a bias; both give the float32 product."""
    from kestrel.layers import linear as linear_mod

    calls = []
    real = fp8_gemm.bf16_gemm_small_m
    monkeypatch.setattr(fp8_gemm, "bf16_gemm_small_m",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x, w = _operands(1, 384, 1024, torch.bfloat16, seed=8)
    sms = skinny_config.sm_count("cuda", x.device.index)
    monkeypatch.setitem(skinny_config.TUNED_16BIT, (sms, 1, 384, 1024), SkinnyConfig(2, 512))
    _assert_close(linear_mod.dense_linear(x, w), x, w)
    assert calls == [(1, 1024)]
    x2, _ = _operands(2, 384, 1024, torch.bfloat16, seed=9)
    _assert_close(linear_mod.dense_linear(x2, w), x2, w)
    bias = torch.randn(384, dtype=x.dtype, device=DEV)
    y = linear_mod.dense_linear(x, w, bias)
    assert calls == [(1, 1024)]  # two rows and a bias: cuBLAS
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias))


@pytest.mark.parametrize("name", ["fma", "fma_split", "fma_bx_ef", "fma_prefetch_split",
                                  "dot_split"])
@pytest.mark.parametrize("m", [1, 3])
def test_swiglu_folded_into_the_two_products(name, m):
    """gate_up with ``silu_cols`` then down with ``glu`` is silu_and_mul_ref between the two
    plain products: the up half and down's output bit for bit, the silu'd gate half up to one
    bf16 rounding of exp's last float32 bit (the interpreter's exp is not torch's)."""
    cfg = CONFIGS[name]
    inter = 72  # K of down not a multiple of block_k; 2·inter not one of block_n
    x, w_gu = _operands(m, 2 * inter, 150, torch.bfloat16, seed=10 + m)
    _, w_down = _operands(m, 40, inter, torch.bfloat16, seed=20 + m)
    plain = bf16_gemm_small_m(x, w_gu, config=cfg)
    folded = bf16_gemm_small_m(x, w_gu, config=cfg, silu_cols=inter)
    assert torch.equal(folded[:, inter:], plain[:, inter:])
    gate = torch.nn.functional.silu(plain[:, :inter])
    torch.testing.assert_close(folded[:, :inter], gate, rtol=2.0 ** -7, atol=0.0)
    assert float((folded[:, :inter] != gate).float().mean()) < 0.05
    act = (folded[:, :inter].float() * folded[:, inter:].float()).to(torch.bfloat16)
    out = torch.full((m, 40), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = bf16_gemm_small_m(folded, w_down, config=cfg, out=out, glu=True)
    assert torch.equal(y, bf16_gemm_small_m(act, w_down, config=cfg))
    with pytest.raises(ValueError, match="do not multiply"):
        bf16_gemm_small_m(act, w_down, glu=True)
    with pytest.raises(ValueError, match="silu_cols"):
        bf16_gemm_small_m(x, w_gu, silu_cols=2 * inter + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("split", [1, 3])
def test_swiglu_skinny_gives_the_three_steps_bits(monkeypatch, split):
    """The MLP's folded path (linear.swiglu_skinny) against gate_up, the fused silu_and_mul
    kernel, down: the same bits; None (the caller's three steps) for shapes not listed."""
    from kestrel.kernels.fused import silu_and_mul
    from kestrel.layers.linear import MergedColumnParallelLinear, RowParallelLinear, swiglu_skinny

    hidden, inter = 1024, 2816
    gate_up = MergedColumnParallelLinear(hidden, [inter] * 2, dtype=torch.bfloat16).to(DEV)
    down = RowParallelLinear(inter, hidden, dtype=torch.bfloat16).to(DEV)
    gate_up.weight.data.normal_(0, 0.05)
    down.weight.data.normal_(0, 0.05)
    x, _ = _operands(1, 8, hidden, torch.bfloat16, seed=11)
    monkeypatch.setattr(skinny_config, "TUNED_16BIT", {})
    assert swiglu_skinny(gate_up, down, x) is None
    sms = skinny_config.sm_count("cuda", x.device.index)
    monkeypatch.setitem(skinny_config.TUNED_16BIT, (sms, 1, 2 * inter, hidden),
                        SkinnyConfig(16, 256, split, evict_first=True, broadcast_x=True))
    monkeypatch.setitem(skinny_config.TUNED_16BIT, (sms, 1, hidden, inter),
                        SkinnyConfig(16, 256, 3, broadcast_x=True))
    want = down(silu_and_mul(gate_up(x)))
    assert torch.equal(swiglu_skinny(gate_up, down, x), want)
