"""Parity of the fused Triton kernels with their torch references, on fresh random inputs.

Small shapes run everywhere (CPU: Triton interpreter); the ``gpu`` cases use model-sized shapes.
"""

from __future__ import annotations

import pytest
import torch

from kestrel.attention.base import write_kv_cache
from kestrel.kernels.fused import rms_norm, rotary_and_cache, silu_and_mul
from kestrel.layers.activation import silu_and_mul_ref
from kestrel.layers.norm import rms_norm_ref
from kestrel.layers.rotary import RotaryEmbedding, apply_rotary_ref
from kestrel.quant.fp8_ops import FP8_DTYPE

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bf16: the references round twice (normalised value, then times the weight), so a kernel that
# computes rsqrt a hair differently can land up to 3 bf16 steps (3 x 2^-7 relative) away.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2.4e-2, 1e-2)}


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN elements in the output"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- RMSNorm


def _check_rms_norm(t: int, h: int, dtype: torch.dtype, with_res: bool, dev: str) -> None:
    x = torch.randn(t, h, dtype=dtype, device=dev)
    w = (1.0 + 0.1 * torch.randn(h, device=dev)).to(dtype)
    res = torch.randn(t, h, dtype=dtype, device=dev) if with_res else None
    x_copy = x.clone()
    res_copy = res.clone() if res is not None else None
    nan = float("nan")
    out, new_res = rms_norm(
        x, w, 1e-6, res,
        out=torch.full((t, h), nan, dtype=dtype, device=dev),
        residual_out=torch.full((t, h), nan, dtype=dtype, device=dev) if with_res else None,
    )  # fmt: skip
    ref_out, ref_res = rms_norm_ref(x_copy, w, 1e-6, res_copy)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    _close(out, ref_out, dtype)
    _close(new_res, ref_res, dtype)
    torch.testing.assert_close(x, x_copy, rtol=0, atol=0)  # inputs untouched
    if res is not None:
        torch.testing.assert_close(res, res_copy, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm(dtype: torch.dtype, with_res: bool) -> None:
    _check_rms_norm(5, 96, dtype, with_res, DEV)  # 96: hidden not a power of two (masked lanes)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm_gpu(dtype: torch.dtype, with_res: bool) -> None:
    _check_rms_norm(300, 4096, dtype, with_res, "cuda")
    _check_rms_norm(7, 5120, dtype, with_res, "cuda")


# ----------------------------------------------------------------------------- SwiGLU


def _check_silu_and_mul(t: int, inter: int, dtype: torch.dtype, dev: str) -> None:
    x = torch.randn(t, 2 * inter, dtype=dtype, device=dev) * 3
    out = silu_and_mul(x, out=torch.full((t, inter), float("nan"), dtype=dtype, device=dev))
    _close(out, silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    _check_silu_and_mul(4, 80, dtype, DEV)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_gpu(dtype: torch.dtype) -> None:
    _check_silu_and_mul(257, 14336, dtype, "cuda")


# ----------------------------------------------------------------------------- rotary + cache write


def _check_rotary_and_cache(
    t: int, hq: int, hk: int, d: int, num_blocks: int, bs: int, dtype: torch.dtype, dev: str,
    fp8: bool = False,
) -> None:
    rope = RotaryEmbedding(d, 4096, 500000.0, None).to(dev)
    positions = torch.randint(0, 4096, (t,), device=dev)
    # q, k, v as strided views into a fused qkv output, as the model produces them.
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=dtype, device=dev) * 4
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    slots = torch.randperm(num_blocks * bs, device=dev)[:t]
    slots[::3] = -1  # padding tokens: rotated, but must leave the cache alone
    cache_dtype = FP8_DTYPE if fp8 else dtype
    k_cache = torch.randn(num_blocks, bs, hk, d, device=dev).to(cache_dtype)
    v_cache = torch.randn(num_blocks, bs, hk, d, device=dev).to(cache_dtype)
    # FP8: per-head scales small enough that values past ~1.1σ saturate at ±448
    ks = vs = None
    if fp8:
        ks = 0.008 + 0.001 * torch.arange(hk, dtype=torch.float32, device=dev)
        vs = ks.flip(0).contiguous()
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q, ref_k = apply_rotary_ref(q.clone(), k.clone(), positions, rope.cos_sin)
    write_kv_cache(ref_k, v.clone(), ref_kc, ref_vc, slots, ks, vs)
    out_q, out_k = rotary_and_cache(q, k, v, positions, rope.cos_sin, k_cache, v_cache, slots,
                                    ks, vs)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    # Bit-exact, except bf16 under the interpreter, which truncates where torch rounds (its k,
    # then an FP8 code of that k, may sit one step off).
    exact = dev == "cuda" or dtype != torch.bfloat16
    rtol, atol = (0.0, 0.0) if exact else (2**-7, 1e-6)
    for out, ref in ((q, ref_q), (k, ref_k)):
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if fp8 and not exact:
        rtol = 2**-3  # one e4m3 step
    torch.testing.assert_close(k_cache.float(), ref_kc.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(v_cache.float(), ref_vc.float(), rtol=0, atol=0)  # a copy
    if fp8:
        assert (ref_kc.float().abs() == 448).any(), "no value saturated: the test lost its edge"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 64, 16), (6, 3, 96, 8)])
@pytest.mark.parametrize("fp8", [False, True])
def test_rotary_and_cache(dtype: torch.dtype, hq: int, hk: int, d: int, bs: int,
                          fp8: bool) -> None:
    _check_rotary_and_cache(7, hq, hk, d, 4, bs, dtype, DEV, fp8)


def test_rotary_and_cache_fp8_needs_its_scales() -> None:
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    rope = RotaryEmbedding(64, 128, 10000.0, None)
    cache = torch.zeros(2, 16, 2, 64, dtype=FP8_DTYPE)
    pos, slots = torch.arange(2), torch.arange(2)
    with pytest.raises(ValueError, match="one per KV head"):
        rotary_and_cache(q, k, v, pos, rope.cos_sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="one per KV head"):
        rotary_and_cache(q, k, v, pos, rope.cos_sin, cache, cache.clone(), slots,
                         torch.ones(3), torch.ones(3))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (12, 4, 64, 32)])
@pytest.mark.parametrize("fp8", [False, True])
def test_rotary_and_cache_gpu(dtype: torch.dtype, hq: int, hk: int, d: int, bs: int,
                              fp8: bool) -> None:
    _check_rotary_and_cache(1000, hq, hk, d, 512, bs, dtype, "cuda", fp8)
