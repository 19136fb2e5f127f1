"""Triton attention backend: the GPU fast path behind the ``AttentionBackend`` seam.

forward, when every sequence has exactly one new token: ``paged_attention_decode``, which for
up to ``FUSED_NEW_TOKEN_MAX_SEQS`` sequences also rotates q and the new K and writes the new
K/V into the paged cache (one launch per layer); larger batches run rotary_and_cache first.
Otherwise rotary_and_cache (rotary on q and k, then new K/V into the paged cache, in one
launch) + the varlen ``prefill_attention`` (which also serves mixed prefill + decode batches:
a decode row is a prefill of length 1). Both read every key from the cache, so prefix-cached and chunked
prefills need nothing special. Long fresh prompts (no cached prefix: the new K/V are the whole
context) go to torch's SDPA instead, whose cuDNN/flash kernels beat ours there (measured by
tests/kernels/bench_kernels.py --only prefill; ``SDPA_MIN_TOKENS`` is the crossover), also
when the step mixes them with decode rows and chunks (the paged kernel skips them).

Triton is imported lazily (on construction), so this module can be imported, and the name
"triton" registered, on machines without Triton; selecting it there fails with a clear error.
"""

from __future__ import annotations

import torch

from kestrel.attention.base import AttentionBackend, AttentionMetadata, register_backend

# Fresh prompts at least this long (each) use torch SDPA. H200, 32/8 heads, d 128, bf16,
# 2026-11-26 (`bench_kernels.py --only prefill`): ours 0.056 / 0.149 / 0.463 / 1.639 ms at
# 1k / 2k / 4k / 8k tokens, SDPA through _sdpa (cuDNN, grouped heads) 0.088 / 0.197 / 0.272 /
# 1.001 ms: it wins from 4k on.
SDPA_MIN_TOKENS = 4096
# Decode batches up to this many sequences take the new token's rotary and cache write inside
# the attention launch: one launch less a layer (batch-1 BF16 decode 4.10 -> 3.96 ms, H200,
# eighth session). Larger batches lose: `bench_kernels.py --only new-token` (H200, µs, in the
# launch / separate) 4.7 / 5.6 at 1 × 512 tokens, 11.9 / 10.7 at 8 × 512, 404.7 / 256.3 at
# 64 × 4k, 224.8 / 139.8 at 256 × 512; mixed-100-1024 (256 sequences) ran 18.6 s fused and
# 15.8 s separate (fourteenth session).
FUSED_NEW_TOKEN_MAX_SEQS = 1


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
            from kestrel.kernels import fused, paged_attention, prefill_attention, rotary
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError(f"attention backend 'triton' needs the triton package: {e}") from e
        self._fused = fused
        self._decode = paged_attention
        self._rotary = rotary
        self._prefill = prefill_attention
        # Fixed split-K factor for decode (e.g. when capturing CUDA graphs); None: heuristic.
        self.num_splits = num_splits
        self.sdpa_min_tokens = SDPA_MIN_TOKENS

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        positions: torch.Tensor,  # [T]
        cos_sin: torch.Tensor,  # [max_pos, D]
    ) -> torch.Tensor:
        ks, vs = self.kv_scales(k_cache)
        decode = meta.is_decode_only and q.shape[0] == meta.num_seqs
        new = None
        if decode and meta.num_seqs <= FUSED_NEW_TOKEN_MAX_SEQS:
            # One token per sequence: token i belongs to sequence i (query_start_loc = arange).
            # Rotary and the cache write happen inside the attention launch.
            new = self._rotary.NewTokens(k, v, positions, cos_sin, meta.slot_mapping)
        else:
            # q and k are rotated in place: SDPA below reads the new k directly, not the cache.
            q, k = self._fused.rotary_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache,
                                                meta.slot_mapping, ks, vs)
        if decode:
            return self._decode.paged_attention_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                num_splits=self.num_splits, max_seq_len=meta.max_seq_len, k_scale=ks,
                v_scale=vs, new=new,
            )  # fmt: skip
        # Whole fresh prompts (no cached prefix) of at least SDPA_MIN_TOKENS attend through
        # SDPA, the rest of the batch through the paged kernel, which skips those prompts. An
        # FP8 cache: every sequence attends to the cached (quantized) K/V.
        fresh = self._fresh_long_prompts(meta) if ks is None else []
        out = None
        if len(fresh) < meta.num_seqs:
            lens = meta.query_lens_cpu
            max_len = (max(n for i, n in enumerate(lens) if i not in fresh) if fresh
                       else meta.max_query_len)
            out = self._prefill.prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                max_len, self.scale, k_scale=ks, v_scale=vs,
                skip_fresh_min=self.sdpa_min_tokens if fresh else 0,
            )  # fmt: skip
        if fresh:
            out = self._sdpa(q, k, v, meta.query_lens_cpu, fresh, out)
        return out

    def _fresh_long_prompts(self, meta: AttentionMetadata) -> list[int]:
        """Sequences whose whole context is this step's queries, at least sdpa_min_tokens of
        them (the paged kernel's ``skip_fresh_min`` rule)."""
        ql, sl = meta.query_lens_cpu, meta.seq_lens_cpu
        if ql is None or sl is None or meta.max_query_len < self.sdpa_min_tokens:
            return []
        return [i for i, (n, s) in enumerate(zip(ql, sl)) if n == s >= self.sdpa_min_tokens]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
              seqs: list[int], out: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of each prompt in ``seqs`` over its own new K/V, into ``out``'s
        rows (None: a new tensor; one prompt that is the whole batch needs no copy).
        ``enable_gqa`` hands the grouped KV heads to cuDNN as they are (H200, 4k tokens: 294
        µs against 378 with the heads repeated and the output copied back,
        scripts/bench_prefill_parts.py); cuDNN writes [T, H, D] order."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            for i in seqs:
                sl = slice(starts[i], starts[i + 1])
                o = torch.nn.functional.scaled_dot_product_attention(
                    q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                    v[sl].transpose(0, 1)[None], is_causal=True, scale=self.scale,
                    enable_gqa=True)[0].transpose(0, 1)  # [n, H, D]
                if out is None and len(lens) == 1:
                    return o.contiguous()
                if out is None:
                    out = torch.empty_like(q)
                out[sl] = o
        return out
