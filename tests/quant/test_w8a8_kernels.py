"""W8A8's Triton kernels (kestrel.kernels.int8_w8a8) against the torch reference of
kestrel.quant.w8a8, on fresh random inputs: the same int8 codes and scales bit for bit, the
same scaled outputs, and the GPU path of ``w8a8_matmul`` within rounding of the CPU's.

CPU runs the kernels under TRITON_INTERPRET=1 (conftest); on a CUDA machine the same tests run
on the GPU (marked ``gpu``).
"""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels.int8_w8a8 import int8_gemm_small_m, per_token_quant_int8, scale_int32
from kestrel.kernels.skinny_config import SkinnyConfig
from kestrel.quant.w8a8 import quantize_rows_int8, w8a8_matmul, w8a8_matmul_ref

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


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_int32_is_the_reference(out_dtype):
    g = torch.Generator().manual_seed(2)
    acc = torch.randint(-2**30, 2**30, (70, 150), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(70, 1, generator=g) * 1e-3, torch.rand(150, 1, generator=g) * 1e-3
    got = scale_int32(acc.to(DEV), xs.to(DEV), ws.to(DEV), out_dtype).cpu()
    assert torch.equal(got, (acc.float() * xs * ws.t()).to(out_dtype))


@pytest.mark.parametrize("config", [SkinnyConfig(4, 64), SkinnyConfig(4, 64, 2),
                                    SkinnyConfig(16, 64, 2, use_dot=True), None],
                         ids=["fma", "fma-split", "dot-split", "default"])
@pytest.mark.parametrize("rows", [1, 5])
def test_skinny_int8_gemm_is_the_exact_product(config, rows):
    """The int8 products summed in float32 (exact below 2²⁴: K 192 here) or int32, scaled
    (split-K scales each split's sum): the float64 reference within float32 rounding of the
    terms' magnitude."""
    if config is not None and config.use_dot and rows == 1:
        pytest.skip("the dot config is for several rows")
    xq, xs = quantize_rows_int8(_rows(rows, 192, 3, torch.float32).cpu())
    g = torch.Generator().manual_seed(4)
    wq, ws = quantize_rows_int8(torch.randn(40, 192, generator=g))
    got = int8_gemm_small_m(xq.to(DEV), xs.to(DEV), wq.to(DEV), ws.to(DEV), torch.float32,
                            config=config).cpu()
    want = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t()
    size = (xq.double().abs() @ wq.double().abs().t()) * xs.double() * ws.double().t()
    assert ((got.double() - want).abs() <= 4 * 2**-24 * size).all()


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
    with pytest.raises(ValueError, match="T, K"):
        per_token_quant_int8(torch.zeros(2, 2, 2))
