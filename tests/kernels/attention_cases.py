"""The random paged batches and the reference of the attention tests (test_attention_kernels,
test_attention_backend): every case draws a fresh random paged cache (blocks assigned in
shuffled order, block tables padded with extra columns), and the reference runs in float32 on
the same (rounded) inputs, so the tolerance measures the kernel's own error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kestrel.attention.base import AttentionMetadata, quantize_kv
from kestrel.attention.torch_ref import paged_attention_ref

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) on outputs of magnitude ~0.1..1: fp32 near exact; 16-bit from rounding P and V.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
NAN = float("nan")


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, bs, Hkv, D], every block random
    v_cache: torch.Tensor
    meta: AttentionMetadata
    k_scale: torch.Tensor | None = None  # [Hkv] float32: the caches are FP8
    v_scale: torch.Tensor | None = None

    @property
    def scales(self) -> dict[str, torch.Tensor | None]:
        return {"k_scale": self.k_scale, "v_scale": self.v_scale}


def make_batch(
    q_lens: list[int], prefix_lens: list[int], hq: int, hkv: int, d: int, bs: int,
    dtype: torch.dtype, dev: str, pad_cols: int = 2, fp8: bool = False,
) -> Batch:  # fmt: skip
    """Random queries and paged cache for sequences of q_lens new tokens after prefix_lens
    (``fp8``: the cache quantized with random per-KV-head scales)."""
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens)]
    nblk = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(nblk) + 3  # spare blocks hold random garbage that must not be read
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(q_lens), max(nblk) + pad_cols, dtype=torch.int32)
    slots, used = [], 0
    for i, (n, s, ql) in enumerate(zip(nblk, seq_lens, q_lens)):
        tables[i, :n] = torch.tensor(perm[used : used + n], dtype=torch.int32)
        used += n
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(s - ql, s)]
    t = sum(q_lens)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        query_start_loc=qsl.to(dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        seq_lens_cpu=seq_lens,
        query_lens_cpu=list(q_lens),
    )
    q = torch.randn(t, hq, d, dtype=dtype, device=dev)
    k_cache = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.randn(num_blocks, bs, hkv, d, dtype=dtype, device=dev)
    if not fp8:
        return Batch(q, k_cache, v_cache, meta)
    ks, vs = (0.004 + 0.01 * torch.rand(hkv, device=dev) for _ in range(2))
    return Batch(q, quantize_kv(k_cache, ks), quantize_kv(v_cache, vs), meta, ks, vs)


def reference(b: Batch, scale: float) -> torch.Tensor:
    if b.k_scale is not None:  # dequantized in float32 by the reference
        return paged_attention_ref(b.q.float(), b.k_cache, b.v_cache, b.meta, scale, **b.scales)
    return paged_attention_ref(b.q.float(), b.k_cache.float(), b.v_cache.float(), b.meta, scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN elements in the output"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)
