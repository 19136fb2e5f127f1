"""Triton attention backend: the GPU fast path behind the ``AttentionBackend`` seam.

forward, when every sequence has exactly one new token: ``paged_attention_decode``, which for
up to ``FUSED_NEW_TOKEN_MAX_SEQS`` sequences of up to ``FUSED_NEW_TOKEN_MAX_LEN`` tokens also
rotates q and the new K and writes the new K/V into the paged cache (one launch per layer);
other batches run rotary_and_cache first.
Otherwise rotary_and_cache (rotary on q and k, then new K/V into the paged cache, in one
launch), then the decode kernel for the one-token rows that lead a mixed step (the running
requests) and the varlen ``prefill_attention`` for the rest (a later one-token row is a prefill
of length 1). Both read every key from the cache, so prefix-cached and chunked prefills need
nothing special. Sequences with many queries (``SDPA_MIN_TOKENS``) go to cuDNN's SDPA instead,
1.3-1.8x faster there on Hopper (tests/kernels/bench_sdpa.py --only long-queries), in any
step (the paged kernel skips them): a whole prompt in one causal call over its new K/V, a chunk
after a cached prefix in two (over the prefix gathered out of the cache, unmasked, and over its
own K/V, causal) merged by their log-sum-exps (``merge_attention``), every length rounded up
to a bucket (cuDNN builds a plan per new shape); K/V out of the cache come through
``gather_kv`` (one pass: gathered, padded, an FP8 cache's dequantized). Where FlashAttention
4 is installed (the ``flash-attn-4`` package, ``flash_attn.cute``) on Hopper, it takes SDPA's
place for those sequences: one causal call per sequence over its own K/V or, after a prefix,
over all its K/V gathered out of the cache (``_fa4``).

Triton is imported lazily (on construction), so this module can be imported, and the name
"triton" registered, on machines without Triton; selecting it there fails with a clear error.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from kestrel.attention.base import AttentionBackend, AttentionMetadata, KeptRows, register_backend
from kestrel.kernels.cute import hopper_kernel

# Sequences with at least this many queries in a step (whole prompts, chunks after a cached
# prefix) attend through cuDNN's SDPA. H200, 32/8 heads, d 128, bf16, `bench_sdpa.py --only
# long-queries` (sixteenth session), speedup over the paged kernel by queries (rows) and cached
# prefix (columns 0 / 1k / 4k / 16k / 64k): 512: 1.16 / 0.34 / 0.90 / 1.62 / 1.60; 1k: 1.55 /
# 0.72 / 1.58 / 1.71 / 1.66; 2k: 1.68 / 1.53 / 1.70 / 1.72 / 1.74; 4k-16k: 1.29 to 1.79.
# KESTREL_SDPA_MIN_TOKENS overrides it for A/B runs (0: the kernels attend everything).
SDPA_MIN_TOKENS = int(os.environ.get("KESTREL_SDPA_MIN_TOKENS", "2048"))
# The smallest step of the lengths SDPA sees (``sdpa_bucket``).
SDPA_GRANULE = 256
# Decode batches up to this many sequences take the new token's rotary and cache write inside
# the attention launch: one launch less a layer (batch-1 BF16 decode 4.10 -> 3.96 ms, H200,
# eighth session). Larger batches lose: `bench_kernels.py --only new-token` (H200, µs, in the
# launch / separate) 4.7 / 5.6 at 1 × 512 tokens, 11.9 / 10.7 at 8 × 512, 404.7 / 256.3 at
# 64 × 4k, 224.8 / 139.8 at 256 × 512; mixed-100-1024 (256 sequences) ran 18.6 s fused and
# 15.8 s separate (fourteenth session).
FUSED_NEW_TOKEN_MAX_SEQS = 1
# ... and contexts up to this many tokens: beyond, the launch loses to the separate kernels
# (`bench_kernels.py --only new-token`, batch 1, µs in the launch / separate, H200, eighteenth
# session: 4.4 / 5.6 at 512 tokens, 5.1 / 6.6 at 1k, 6.4 / 8.9 at 2k, 13.9 / 13.1 at 4k,
# 19.6 / 16.9 at 8k, 94.2 / 75.4 at 64k). Decode graphs come one per side of it
# (``decode_len_breaks``).
FUSED_NEW_TOKEN_MAX_LEN = 2048


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
        self.sdpa_granule = SDPA_GRANULE

    @classmethod
    def decode_len_breaks(cls, num_seqs: int) -> tuple[int, ...]:
        return (FUSED_NEW_TOKEN_MAX_LEN,) if num_seqs <= FUSED_NEW_TOKEN_MAX_SEQS else ()

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
        if (decode and meta.num_seqs <= FUSED_NEW_TOKEN_MAX_SEQS
                and meta.max_seq_len <= FUSED_NEW_TOKEN_MAX_LEN):
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

    def forward_kept(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     keep: KeptRows, *, positions: torch.Tensor,
                     cos_sin: torch.Tensor) -> torch.Tensor:
        """Kept rows that end their sequences (``keep.seqs``) attend through the decode
        kernel once every row's K/V is cached: a 4k prompt sampling its last row reads the
        cache once for one query instead of running causal prefill attention over 4k rows;
        none kept (a prompt's middle chunk) caches K/V and attends nothing. Other kept rows
        (prompt logprobs): every row, then the kept ones."""
        if keep.seqs_cpu is None or meta.seq_lens_cpu is None:
            return super().forward_kept(q, k, v, k_cache, v_cache, meta, keep,
                                        positions=positions, cos_sin=cos_sin)
        ks, vs = self.kv_scales(k_cache)
        q, k = self._fused.rotary_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache,
                                            meta.slot_mapping, ks, vs)
        if not keep.seqs_cpu:
            return q.new_empty((0, *q.shape[1:]))
        tables, lens = meta.block_tables, meta.seq_lens
        if keep.seqs_cpu != list(range(meta.num_seqs)):
            tables, lens = tables.index_select(0, keep.seqs), lens.index_select(0, keep.seqs)
        return self._decode.paged_attention_decode(
            q.index_select(0, keep.rows), k_cache, v_cache, tables, lens, self.scale,
            max_seq_len=max(meta.seq_lens_cpu[i] for i in keep.seqs_cpu), k_scale=ks,
            v_scale=vs,
        )  # fmt: skip

    def _prefill_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      ks: torch.Tensor | None, vs: torch.Tensor | None) -> torch.Tensor:
        """Attention of a step with prompt tokens, q and k rotated, the new K/V cached.

        The scheduler puts running requests first, so a mixed step's decode rows (one query
        each) usually lead the batch: they take the decode kernel (each KV head read once for
        its query group), the rest the prefill kernel through sliced metadata (its query
        offsets index the whole flat batch). Sequences with at least ``sdpa_min_tokens``
        queries (whole prompts and chunks after a cached prefix alike) attend through cuDNN
        (``_sdpa``), and the prefill kernel skips them. An FP8 cache: every sequence attends
        to the cached (quantized) K/V, which SDPA gets dequantized as the reference does."""
        lens = meta.query_lens_cpu
        long = self._long_queries(meta, q)
        if (long == [0] and meta.num_seqs == 1 and meta.seq_lens_cpu[0] == lens[0]
                and ks is None):
            return self._causal_sdpa(q, k, v)  # one whole prompt: SDPA's output needs no copy
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
        rest = [i for i in range(n_dec, meta.num_seqs) if i not in long]
        if rest:
            self._prefill.prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc[n_dec:], meta.seq_lens[n_dec:],
                meta.block_tables[n_dec:],
                max(lens[i] for i in rest) if lens is not None else meta.max_query_len,
                self.scale, out=out, k_scale=ks, v_scale=vs,
                skip_min_query=self.sdpa_min_tokens if long else 0,
            )  # fmt: skip
        if long:
            self._sdpa(q, k, v, k_cache, v_cache, meta, long, out, ks, vs)
        return out

    def _long_queries(self, meta: AttentionMetadata, q: torch.Tensor) -> list[int]:
        """Sequences with at least sdpa_min_tokens queries (the paged kernel's
        ``skip_min_query`` rule), where cuDNN's SDPA is known to be faster (on CUDA: 16-bit
        q, head_dim a multiple of 8 up to 128, which cuDNN takes)."""
        ql = meta.query_lens_cpu
        d = q.shape[-1]
        if (ql is None or meta.seq_lens_cpu is None or not self.sdpa_min_tokens
                or meta.max_query_len < self.sdpa_min_tokens or not _sdpa_measured(q.device)
                or (q.is_cuda and (q.dtype not in (torch.float16, torch.bfloat16)
                                   or d % 8 or d > 128))):
            return []
        return [i for i, n in enumerate(ql) if n >= self.sdpa_min_tokens]

    def _fa4_attend(self, fa4, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    seqs: list[int], out: torch.Tensor, ks: torch.Tensor | None,
                    vs: torch.Tensor | None) -> None:
        """``_sdpa`` through FlashAttention 4: a whole prompt over its new K/V, a chunk after
        a prefix (or any sequence with an FP8 cache) over all its keys gathered out of the
        cache in one pass; FA4's causal mask is aligned to the last key, so one call covers
        the prefix and the chunk."""
        ql = meta.query_lens_cpu
        for i in seqs:
            start, total = sum(ql[:i]), meta.seq_lens_cpu[i]
            rows = slice(start, start + ql[i])
            if total == ql[i] and ks is None:
                kk, vv = k[rows], v[rows]
            else:
                kk, vv = self._prefill.gather_kv(k_cache, v_cache, meta.block_tables[i], 0,
                                                 total, total, ks, vs, q.dtype)
            out[rows] = fa4(q[rows][None], kk[None], vv[None], softmax_scale=self.scale,
                            causal=True)[0][0]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata, seqs: list[int],
              out: torch.Tensor, ks: torch.Tensor | None = None,
              vs: torch.Tensor | None = None) -> None:
        """Attention of each sequence in ``seqs`` into its rows of ``out``. A whole prompt:
        ``_causal_sdpa``. A chunk after a cached prefix of P tokens: its queries over the
        prefix's first P0 = bucket_down(P) keys, gathered from the cache (unmasked), and over
        the keys from P0 on with the r = P − P0 positions before it as leading zero queries,
        so a top-left causal mask is the chunk's own (causal); the two merged by their
        log-sum-exps. Every shape cuDNN sees is a bucket (``sdpa_bucket``); padded rows come
        after the real ones and are dropped. An FP8 cache (``ks``, ``vs``): every key and
        value comes from the cache, dequantized to q's dtype."""
        fa4 = _working_fa4(q.device)
        if fa4 is not None:
            try:
                return self._fa4_attend(fa4, q, k, v, k_cache, v_cache, meta, seqs, out, ks, vs)
            except Exception as e:  # noqa: BLE001 (see _fa4_failed)
                _fa4_failed(q.device, e)
        ql = meta.query_lens_cpu
        starts = [sum(ql[:i]) for i in seqs]
        for i, start in zip(seqs, starts):
            n = ql[i]
            rows = slice(start, start + n)
            prefix = meta.seq_lens_cpu[i] - n
            caches = (k_cache, v_cache, meta.block_tables[i])
            scales = (ks, vs, q.dtype)
            if not prefix:
                kv = ((k[rows], v[rows]) if ks is None else self._prefill.gather_kv(
                    *caches, 0, n, sdpa_bucket(n, self.sdpa_granule), *scales))
                out[rows] = self._causal_sdpa(q[rows], *kv)
                continue
            p0 = sdpa_bucket(prefix, self.sdpa_granule, down=True)
            r = prefix - p0
            m = sdpa_bucket(r + n, self.sdpa_granule)
            kc, vc = self._prefill.gather_kv(*caches, p0, prefix + n, m, *scales)
            o_c, lse_c = self._attend(_pad_rows(q[rows], r, m - r - n), kc, vc, causal=True)
            o_c, lse_c = o_c[:, r:r + n], lse_c[:, r:r + n]
            if not p0:
                out[rows] = o_c.transpose(0, 1)
                continue
            qp = _pad_rows(q[rows], 0, sdpa_bucket(n, self.sdpa_granule) - n)
            o_p, lse_p = self._attend(qp, *self._prefill.gather_kv(*caches, 0, p0, p0, *scales),
                                      causal=False)
            self._prefill.merge_attention(o_p[:, :n], lse_p[:, :n], o_c, lse_c, out[rows])

    def _causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one prompt over its own K/V, [n, H, D] (k and v may come padded
        already), padded at the end to its bucket; cuDNN writes [T, H, D] order, so the
        transposed rows are contiguous."""
        n = q.shape[0]
        fa4 = _working_fa4(q.device)
        if fa4 is not None:  # only forward's one-prompt step gets here (_sdpa routes first)
            try:
                return fa4(q[None], k[None], v[None], softmax_scale=self.scale, causal=True)[0][0]
            except Exception as e:  # noqa: BLE001 (see _fa4_failed)
                _fa4_failed(q.device, e)
        m = sdpa_bucket(n, self.sdpa_granule)
        q, k, v = (_pad_rows(x, 0, m - x.shape[0]) for x in (q, k, v))
        return self._attend(q, k, v, causal=True)[0][:, :n].transpose(0, 1).contiguous()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """SDPA of q [n, Hq, D] over k, v [m, Hkv, D] (grouped heads as they are; causal:
        m == n) → (out [Hq, n, D], natural-log log-sum-exp [Hq, n] float32). cuDNN on CUDA
        (H200, 4k tokens: 294 µs with the grouped heads against 378 with them repeated,
        scripts/bench_prefill_parts.py), torch's flash kernel on the CPU (tests)."""
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
        if q.is_cuda:
            o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q4, k4, v4, None, True, 0.0, causal, False, scale=self.scale)[:2]
        else:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q4, k4, v4, 0.0, causal, scale=self.scale)
        return o[0], lse.reshape(q.shape[1], q.shape[0])


def sdpa_bucket(n: int, granule: int, down: bool = False) -> int:
    """n rounded up (down) to eight steps an octave, multiples of ``granule`` at least: cuDNN
    builds an execution plan for every new shape (45-80 ms on an H200, sixteenth session), so
    the lengths it sees come from a short list, at most 1/8 padding (or 1/8 left over)."""
    step = max(granule, 1 << max(n.bit_length() - 4, 0))
    return n // step * step if down else -(-n // step) * step


def _pad_rows(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """x [n, H, D] with zero rows before and after it (x itself when there are none)."""
    return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x


# Devices where FlashAttention 4 raised: long prompts attend through cuDNN there from then on.
_FA4_FAILED: set[torch.device] = set()


def _working_fa4(device: torch.device):
    """``_fa4`` unless it has failed on this device."""
    return None if device in _FA4_FAILED else _fa4(device)


def _fa4_failed(device: torch.device, e: Exception) -> None:
    """An installed FlashAttention 4 that raises (its kernels compile on first use: a CuTe DSL
    that does not match it fails there) costs a warning, not the server: the step falls back
    to cuDNN and so does every later one. Running out of memory is not its fault: re-raised."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        raise e
    _FA4_FAILED.add(device)
    logging.getLogger(__name__).warning(
        "FlashAttention 4 failed (%s: %s); long prompts attend through cuDNN from now on "
        "(KESTREL_FA4=0 skips it)", type(e).__name__, str(e)[:200])


@functools.cache
def _fa4(device: torch.device):
    """FlashAttention 4's ``flash_attn_func`` where it was measured faster than cuDNN and is
    installed: Hopper, ``KESTREL_FA4`` not 0. H200, one prompt, 32/8 heads, d 128, bf16
    (``bench_cute_kernels.py --only fa4``, twenty-fourth session): 4k causal 230.6 µs against
    cuDNN's 260.3, 16k 3,124 against 3,352. Its kernels compile on first use (~4 s each;
    ``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1`` keeps them on disk). None elsewhere."""
    return hopper_kernel(device, "KESTREL_FA4", "flash_attn.cute", "flash_attn_func")


@functools.cache
def _sdpa_measured(device: torch.device) -> bool:
    """cuDNN's SDPA was measured against the Triton kernels on Hopper (H100/H200); elsewhere
    the kernels attend everything. The CPU (tests under the interpreter) takes torch's flash."""
    if device.type != "cuda":
        return True
    return (torch.cuda.get_device_capability(device) >= (9, 0)
            and (torch.backends.cudnn.version() or 0) >= 90000)
