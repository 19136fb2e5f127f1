"""W8A8's Triton kernels (kestrel.kernels.int8_w8a8) against the torch reference of
kestrel.quant.w8a8, on fresh random inputs: the same int8 codes and scales bit for bit, the
same scaled outputs, and the GPU path of ``w8a8_matmul`` within rounding of the CPU's.

CPU runs the kernels under TRITON_INTERPRET=1 (conftest); on a CUDA machine the same tests run
on the GPU (marked ``gpu``).
"""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels.fp8_quant import rms_norm_quant_fp8, silu_and_mul_quant_fp8
from kestrel.kernels.int8_w8a8 import int8_gemm_small_m, per_token_quant_int8, scale_int32
from kestrel.kernels.skinny_config import SkinnyConfig
from kestrel.layers.activation import silu_and_mul_ref
from kestrel.layers.norm import rms_norm_ref
from kestrel.quant.w8a8 import (
    quantize_rows_int8,
    scaled_int8_product,
    w8a8_matmul,
    w8a8_matmul_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.gpu if DEV == "cuda" else []


def _rows(t: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.rand(t, 1, generator=g) * 8
    x[:, 3] *= 30  # an outlier channel sets each row's scale
    if t > 2:
        x[1] = 0  # an all-zero row: the scale floor
        x[2, :8] = torch.arange(8) + 0.5  # halfway values when the row's scale is 1 ...
        x[2, 8] = 127.0  # ... which this absmax makes it
        x[2, 9:] = x[2, 9:].clamp(-100, 100)
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_pass", [True, False])
def test_per_token_quant_is_the_reference_bit_for_bit(dtype, one_pass):
    x = _rows(5, 200, 1, dtype)
    q, s = per_token_quant_int8(x, max_one_pass=16384 if one_pass else 64)
    q, s = q.cpu(), s.cpu()
    q_ref, s_ref = quantize_rows_int8(x.cpu())  # CUDA's torch divides by 127 as · (1/127)
    assert q.dtype == torch.int8 and s.shape == (5, 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    assert q[2, :8].tolist() == [0, 2, 2, 4, 4, 6, 6, 8]  # ties to even, as torch.round


def test_split_rows_give_the_same_codes():
    """Decode rows split over programs (fp8_quant's two phases) quantize as whole rows do."""
    x = _rows(3, 300, 6, torch.bfloat16)
    q, s = per_token_quant_int8(x, chunk=64)
    q_ref, s_ref = quantize_rows_int8(x.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("chunk", [None, 32])
def test_fused_producers_emit_the_reference_codes(chunk):
    """RMSNorm (with the residual add) and SwiGLU quantize their output to int8 as W8A8's
    reference quantizes theirs: the same codes, scales and residual."""
    x = _rows(4, 128, 7, torch.bfloat16)
    res = _rows(4, 128, 8, torch.bfloat16)
    w = (torch.rand(128, generator=torch.Generator().manual_seed(9)) + 0.5).bfloat16().to(DEV)
    q, s, new_res = rms_norm_quant_fp8(x, w, 1e-5, res, int8=True)
    h, res_ref = rms_norm_ref(x.cpu(), w.cpu(), 1e-5, res.cpu())
    q_ref, s_ref = quantize_rows_int8(h)
    assert q.dtype == torch.int8 and torch.equal(new_res.cpu(), res_ref)
    # the kernel sums the squares in another order: a normed value may move by a bf16 step
    assert (q.cpu().int() - q_ref.int()).abs().max() <= 1
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-2, atol=0)
    gate_up = _rows(4, 256, 10, torch.bfloat16) / 16  # silu of -1000s overflows exp
    q, s = silu_and_mul_quant_fp8(gate_up, int8=True, chunk=chunk)
    q_ref, s_ref = quantize_rows_int8(silu_and_mul_ref(gate_up.cpu()))
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_int32_is_the_reference(out_dtype):
    g = torch.Generator().manual_seed(2)
    acc = torch.randint(-2**30, 2**30, (70, 150), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(70, 1, generator=g) * 1e-3, torch.rand(150, 1, generator=g) * 1e-3
    got = scale_int32(acc.to(DEV), xs.to(DEV), ws.to(DEV), out_dtype).cpu()
    assert torch.equal(got, (acc.float() * xs * ws.t()).to(out_dtype))


_FMA, _FMA_SPLIT = SkinnyConfig(4, 64), SkinnyConfig(4, 64, 2)
_DOT, _DOT_SPLIT = SkinnyConfig(16, 64, use_dot=True), SkinnyConfig(16, 64, 2, use_dot=True)


@pytest.mark.parametrize("rows, config", [(1, _FMA), (1, _FMA_SPLIT), (1, None), (5, _FMA),
                                          (5, _FMA_SPLIT), (5, _DOT), (5, _DOT_SPLIT),
                                          (5, None), (1, SkinnyConfig(4, 128))])
@pytest.mark.parametrize("words", [True, False])
def test_skinny_int8_gemm_is_the_exact_product(rows, config, words):
    """The int8 products summed exactly in int32, then scaled: the reference bit for bit in
    one pass over K; split-K scales each split's sum, so there the float64 reference within
    float32 rounding of the terms' magnitude. ``None``: the default config for the shape.
    One row per program reads whole 32-bit words (dp4a); ``words=False`` puts x at an odd
    address and stride, which takes the FMA loop's int32 products instead. K = 192 leaves a
    partial last step for 128-byte steps."""
    xq, xs = quantize_rows_int8(_rows(rows, 192, 3, torch.float32).cpu())
    x_dev = xq.to(DEV)
    if not words:
        x_dev = torch.zeros(rows, 193, dtype=torch.int8, device=DEV)[:, 1:].copy_(x_dev)
    g = torch.Generator().manual_seed(4)
    wq, ws = quantize_rows_int8(torch.randn(40, 192, generator=g))
    got = int8_gemm_small_m(x_dev, xs.to(DEV), wq.to(DEV), ws.to(DEV), torch.float32,
                            config=config).cpu()
    want = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t()
    size = (xq.double().abs() @ wq.double().abs().t()) * xs.double() * ws.double().t()
    assert ((got.double() - want).abs() <= 4 * 2**-24 * size).all()
    if config is not None and config.split_k == 1:
        assert torch.equal(got, scaled_int8_product(xq, xs, wq, ws, torch.float32))


@pytest.mark.skipif(DEV != "cuda", reason="the GPU path of w8a8_matmul runs on CUDA tensors")
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matmul_on_gpu_within_rounding_of_the_reference(rows, dtype):
    """Skinny GEMM (≤ 16 rows) or torch._int_mm + scale_int32: the reference's function, up
    to one rounding step of the output dtype plus float32 rounding of the terms' magnitude
    (the skinny kernel's split-K scales each split's sum before adding them)."""
    x = _rows(rows, 256, rows, dtype)
    wq, ws = quantize_rows_int8(torch.randn(512, 256, generator=torch.Generator().manual_seed(5)))
    got = w8a8_matmul(x, wq.to(DEV), ws.to(DEV)).cpu().float()
    want = w8a8_matmul_ref(x.cpu(), wq, ws).float()
    xq, xs = quantize_rows_int8(x.cpu())
    size = ((xq.double().abs() @ wq.double().abs().t()) * xs.double() * ws.double().t()).float()
    assert ((got - want).abs() <= torch.finfo(dtype).eps * want.abs() + 2**-21 * size).all()
    if rows > 16:  # exact int32 sums, then the reference's scaling
        assert torch.equal(got, want)


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="int8"):
        int8_gemm_small_m(torch.zeros(1, 8), torch.ones(1, 1), torch.zeros(8, 8, dtype=torch.int8),
                          torch.ones(8, 1))
    with pytest.raises(ValueError, match="int32"):
        scale_int32(torch.zeros(2, 2), torch.ones(2, 1), torch.ones(2, 1), torch.float32)
    with pytest.raises(ValueError, match="per_token_quant_int8: expected"):
        per_token_quant_int8(torch.zeros(2, 2, 2))


@pytest.mark.skipif(DEV == "cuda", reason="a CPU model through the interpreted kernels")
def test_w8a8_layers_take_codes_from_the_fused_norm_and_swiglu(h):
    """Installed by use_triton_kernels on GPUs: input_layernorm hands qkv_proj int8 codes, and
    post_attention_layernorm and SwiGLU hand them to gate_up and down (fp8_fused's hooks with
    int8 codes); outputs as the unfused path's (the codes may move by one where the norm sums
    in another order). LLM.int8() layers keep their float input."""
    from kestrel.config import QuantConfig
    from kestrel.models.llama import norm_input_ref, norm_mlp_ref
    from kestrel.quant.fp8_fused import fp8_norm_input, fp8_norm_mlp, row_quantized
    from kestrel.quant.fp8_ops import QuantInput

    cfg = h.tiny_config(2)
    model = h.build(cfg, QuantConfig(method="w8a8"), h.hf_weights(cfg, seed=0, std=0.05))
    layer = model.layers["1"]
    gen = torch.Generator().manual_seed(11)
    x, res = torch.randn(2, 6, cfg.hidden_size, generator=gen)
    want, want_res = norm_mlp_ref(layer.post_attention_layernorm, layer.mlp, x, res)
    got, got_res = fp8_norm_mlp(layer.post_attention_layernorm, layer.mlp, x, res)
    assert torch.equal(got_res, want_res)
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * float(want.abs().max()))
    qkv = layer.self_attn.qkv_proj
    got_in, _ = fp8_norm_input(layer.input_layernorm, qkv, x, res)
    want_in, _ = norm_input_ref(layer.input_layernorm, qkv, x, res)
    assert isinstance(got_in, QuantInput) and got_in.q.dtype == torch.int8
    want = qkv(want_in)
    torch.testing.assert_close(qkv(got_in), want, rtol=0, atol=0.02 * float(want.abs().max()))
    llm_int8 = h.build(cfg, QuantConfig(method="int8"), h.hf_weights(cfg, seed=0, std=0.05))
    assert row_quantized(llm_int8.layers["1"].self_attn.qkv_proj) is None
