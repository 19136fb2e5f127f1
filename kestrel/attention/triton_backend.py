"""Triton attention backend: the GPU fast path behind the ``AttentionBackend`` seam.

forward, when every sequence has exactly one new token: ``paged_attention_decode``, which for
up to ``FUSED_NEW_TOKEN_MAX_SEQS`` sequences also rotates q and the new K and writes the new
K/V into the paged cache (one launch per layer); larger batches run rotary_and_cache first.
Otherwise rotary_and_cache (rotary on q and k, then new K/V into the paged cache, in one
launch), then the decode kernel for the one-token rows that lead a mixed step (the running
requests) and the varlen ``prefill_attention`` for the rest (a later one-token row is a prefill
of length 1). Both read every key from the cache, so prefix-cached and chunked prefills need
nothing special. Long fresh prompts (no cached prefix: the new K/V are the whole context) go
to torch's SDPA instead, whose cuDNN/flash kernels beat ours there (measured by
tests/kernels/bench_kernels.py --only prefill; ``SDPA_MIN_TOKENS`` is the crossover), in any
step (the paged kernel skips them).

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
        return self._prefill_step(q, k, v, k_cache, v_cache, meta, ks, vs)

    def _prefill_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      ks: torch.Tensor | None, vs: torch.Tensor | None) -> torch.Tensor:
        """Attention of a step with prompt tokens, q and k rotated, the new K/V cached.

        The scheduler puts running requests first, so a mixed step's decode rows (one query
        each) usually lead the batch: they take the decode kernel (each KV head read once for
        its query group), the rest the prefill kernel through sliced metadata (its query
        offsets index the whole flat batch). Whole fresh prompts (no cached prefix) of at least
        SDPA_MIN_TOKENS attend through SDPA, and the prefill kernel skips them. An FP8 cache:
        every sequence attends to the cached (quantized) K/V."""
        lens = meta.query_lens_cpu
        fresh = self._fresh_long_prompts(meta) if ks is None else []
        if fresh == [0] and meta.num_seqs == 1:  # one prompt: SDPA's output needs no copy
            return self._causal_sdpa(q, k, v)
        n_dec = 0
        if lens is not None and meta.seq_lens_cpu is not None:
            while n_dec < len(lens) and lens[n_dec] == 1:
                n_dec += 1
        out = torch.empty_like(q)
        if n_dec:
            self._decode.paged_attention_decode(
                q[:n_dec], k_cache, v_cache, meta.block_tables[:n_dec], meta.seq_lens[:n_dec],
                self.scale, out=out[:n_dec], max_seq_len=max(meta.seq_lens_cpu[:n_dec]),
                k_scale=ks, v_scale=vs,
            )  # fmt: skip
        rest = [i for i in range(n_dec, meta.num_seqs) if i not in fresh]
        if rest:
            self._prefill.prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc[n_dec:], meta.seq_lens[n_dec:],
                meta.block_tables[n_dec:],
                max(lens[i] for i in rest) if lens is not None else meta.max_query_len,
                self.scale, out=out, k_scale=ks, v_scale=vs,
                skip_fresh_min=self.sdpa_min_tokens if fresh else 0,
            )  # fmt: skip
        if fresh:
            self._sdpa(q, k, v, lens, fresh, out)
        return out

    def _fresh_long_prompts(self, meta: AttentionMetadata) -> list[int]:
        """Sequences whose whole context is this step's queries, at least sdpa_min_tokens of
        them (the paged kernel's ``skip_fresh_min`` rule)."""
        ql, sl = meta.query_lens_cpu, meta.seq_lens_cpu
        if ql is None or sl is None or meta.max_query_len < self.sdpa_min_tokens:
            return []
        return [i for i, (n, s) in enumerate(zip(ql, sl)) if n == s >= self.sdpa_min_tokens]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
              seqs: list[int], out: torch.Tensor) -> None:
        """``_causal_sdpa`` of each prompt in ``seqs`` into its rows of ``out``."""
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        for i in seqs:
            sl = slice(starts[i], starts[i + 1])
            out[sl] = self._causal_sdpa(q[sl], k[sl], v[sl])

    def _causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one prompt over its own new K/V, [n, H, D]. ``enable_gqa``
        hands the grouped KV heads to cuDNN as they are (H200, 4k tokens: 294 µs against 378
        with the heads repeated and the output copied back, scripts/bench_prefill_parts.py);
        cuDNN writes [T, H, D] order, so the transposed result is contiguous."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                is_causal=True, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).contiguous()
