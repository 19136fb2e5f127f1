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
    t: int, hq: int, hk: int, d: int, num_blocks: int, bs: int, dtype: torch.dtype, dev: str
) -> None:
    rope = RotaryEmbedding(d, 4096, 500000.0, None).to(dev)
    positions = torch.randint(0, 4096, (t,), device=dev)
    # q, k, v as strided views into a fused qkv output, as the model produces them.
    qkv = torch.randn(t, hq + 2 * hk, d, dtype=dtype, device=dev) * 4
    q, k, v = qkv.split([hq, hk, hk], dim=1)
    slots = torch.randperm(num_blocks * bs, device=dev)[:t]
    slots[::3] = -1  # padding tokens: rotated, but must leave the cache alone
    k_cache = torch.randn(num_blocks, bs, hk, d, dtype=dtype, device=dev)
    v_cache = torch.randn(num_blocks, bs, hk, d, dtype=dtype, device=dev)
    ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
    ref_q, ref_k = apply_rotary_ref(q.clone(), k.clone(), positions, rope.cos_sin)
    write_kv_cache(ref_k, v.clone(), ref_kc, ref_vc, slots)
    out_q, out_k = rotary_and_cache(q, k, v, positions, rope.cos_sin, k_cache, v_cache, slots)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    # Bit-exact, except bf16 under the interpreter, which truncates where torch rounds.
    exact = dev == "cuda" or dtype != torch.bfloat16
    rtol, atol = (0.0, 0.0) if exact else (2**-7, 1e-6)
    for out, ref in ((q, ref_q), (k, ref_k), (k_cache, ref_kc)):
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(v_cache, ref_vc, rtol=0, atol=0)  # a copy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 64, 16), (6, 3, 96, 8)])
def test_rotary_and_cache(dtype: torch.dtype, hq: int, hk: int, d: int, bs: int) -> None:
    _check_rotary_and_cache(7, hq, hk, d, 4, bs, dtype, DEV)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (12, 4, 64, 32)])
def test_rotary_and_cache_gpu(dtype: torch.dtype, hq: int, hk: int, d: int, bs: int) -> None:
    _check_rotary_and_cache(1000, hq, hk, d, 512, bs, dtype, "cuda")
