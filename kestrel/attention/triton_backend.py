"""Triton attention backend: the GPU fast path behind the ``AttentionBackend`` seam.

forward = reshape_and_cache (new K/V into the paged cache) + one attention kernel:
``paged_attention_decode`` when every sequence has exactly one new token, else the varlen
``prefill_attention`` (which also serves mixed prefill + decode batches: a decode row is a
prefill of length 1). Both read every key from the cache, so prefix-cached and chunked
prefills need nothing special.

Triton is imported lazily (on construction), so this module can be imported, and the name
"triton" registered, on machines without Triton; selecting it there fails with a clear error.
"""

from __future__ import annotations

import torch

from kestrel.attention.base import AttentionBackend, AttentionMetadata, register_backend


@register_backend
class TritonAttention(AttentionBackend):
    """Paged attention with Triton kernels; CUDA (or CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        num_splits: int | None = None,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        try:
            from kestrel.kernels import fused, paged_attention, prefill_attention
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(f"attention backend 'triton' needs the triton package: {e}") from e
        self._fused = fused
        self._decode = paged_attention
        self._prefill = prefill_attention
        # Fixed split-K factor for decode (e.g. when capturing CUDA graphs); None: heuristic.
        self.num_splits = num_splits

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        self._fused.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            # One token per sequence: token i belongs to sequence i (query_start_loc = arange).
            return self._decode.paged_attention_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                num_splits=self.num_splits, max_seq_len=meta.max_seq_len,
            )  # fmt: skip
        return self._prefill.prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, self.scale,
        )  # fmt: skip
