"""The cuDNN SDPA path's Triton parts against their torch references: ``merge_attention``
(two attentions merged by their log-sum-exps) and ``gather_kv`` (K/V out of the paged cache,
padded, an FP8 cache's dequantized). Small shapes run everywhere (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

from kestrel.attention.base import dequantize_kv, quantize_kv
from kestrel.attention.torch_ref import gather_kv_ref, merge_attention_ref
from kestrel.kernels.prefill_attention import gather_kv, merge_attention
from tests.kernels.attention_cases import DEV, NAN, assert_close, gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_attention_is_attention_over_both_key_sets(dtype: torch.dtype) -> None:
    """Attention over keys A and B separately (with log-sum-exps), merged by the kernel and by
    merge_attention_ref, equals attention over A ∪ B; outputs [H, T, D] strided as SDPA's."""
    h, n, d = 4, 37, 64
    q = torch.randn(1, h, n, d)
    k, v = torch.randn(1, h, 50, d), torch.randn(1, h, 50, d)
    k[..., :20, :] *= 3  # set A's scores apart, so the two weights differ widely
    parts = []
    for sl in (slice(0, 20), slice(20, 50)):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k[:, :, sl], v[:, :, sl], 0.0, False, scale=0.125)
        o = o[0].transpose(0, 1).contiguous().transpose(0, 1)  # [H, T, D], T-major storage
        parts += [o.to(dtype).to(DEV), lse[0].to(DEV)]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125)[0]
    want = want.transpose(0, 1).to(DEV)  # [T, H, D] float32
    out = torch.full((n, h, d), NAN, dtype=dtype, device=DEV)
    assert merge_attention(*parts, out) is out
    assert_close(out, want, dtype)
    assert_close(merge_attention_ref(*parts), want, dtype)
    with pytest.raises(ValueError, match="merge"):
        merge_attention(parts[0], parts[1][:, 1:], *parts[2:], out)


def check_gather_kv(dtype: torch.dtype, fp8: bool, dev: str, hkv: int = 2, d: int = 64,
                    page: int = 16) -> None:
    """A sequence's K/V scattered into shuffled cache pages comes back as the slice asked for,
    zero-padded to ``rows`` (an FP8 cache's dequantized), as gather_kv_ref has it."""
    pages = 9
    seq = torch.randn(2, pages * page, hkv, d, device=dev) * 3  # K and V of the sequence
    table = torch.randperm(pages + 4, device=dev)[:pages].int()  # some blocks not its own
    scales = torch.rand(2, hkv, device=dev) / 40 + 1e-3 if fp8 else [None, None]
    caches = []
    for x, s in zip(seq, scales):
        cache = torch.full((pages + 4, page, hkv, d), NAN, device=dev)
        cache[table.long().repeat_interleave(page), torch.arange(pages * page, device=dev) % page] = x
        caches.append(quantize_kv(cache, s) if fp8 else cache.to(dtype))
    for start, end, rows in [(0, 37, 37), (5, 70, 96), (16, 16, 8), (0, pages * page, 150)]:
        got = gather_kv(*caches, table, start, end, rows, *scales, dtype)
        want = gather_kv_ref(*caches, table, start, end, rows, *scales, dtype)
        for g, w, x, s in zip(got, want, seq, scales):
            assert g.shape == (rows, hkv, d) and g.dtype == dtype
            assert not g[end - start:].any()
            direct = x[start:end].to(dtype) if s is None else dequantize_kv(
                quantize_kv(x[start:end], s), s, dtype)
            assert torch.equal(w[:end - start], direct)
            # bf16 under the interpreter truncates where torch rounds (one ulp)
            if fp8 and dtype == torch.bfloat16 and dev == "cpu":
                torch.testing.assert_close(g, w, rtol=2**-7, atol=0)
            else:
                assert torch.equal(g, w)
    with pytest.raises(ValueError, match="gather_kv"):
        gather_kv(*caches, table, 0, pages * page + 1, 200, *scales, dtype)  # past the table
    with pytest.raises(ValueError, match="gather_kv"):
        gather_kv(*caches, table, 0, 40, 39, *scales, dtype)  # fewer rows than positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_gather_kv(dtype: torch.dtype, fp8: bool) -> None:
    check_gather_kv(dtype, fp8, DEV)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_gather_kv_gpu(dtype: torch.dtype, fp8: bool) -> None:
    check_gather_kv(dtype, fp8, "cuda", hkv=8, d=128)
