"""Plain torch attention over the paged cache: the oracle every fast kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kestrel.attention.base import (AttentionBackend, AttentionMetadata, dequantize_kv,
                                    register_backend, write_kv_cache)
from kestrel.layers.rotary import apply_rotary_ref


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """[num_blocks, bs, H, D] paged cache → [B, max_len, H, D] contiguous per-sequence context."""
    b, nblk = block_tables.shape
    bs = cache.shape[1]
    # index_select, not cache[idx]: advanced indexing is ~1000x slower on CPU for a big pool.
    ctx = cache.index_select(0, block_tables.reshape(-1).long())  # [B*nblk, bs, H, D]
    return ctx.reshape(b, nblk * bs, *cache.shape[2:])[:, :max_len]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of flat queries [T, Hq, D] against each sequence's paged context
    (an FP8 cache dequantized with its per-head scales)."""
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    b = meta.num_seqs
    qsl = meta.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    seq_lens = meta.seq_lens.long()
    max_q, max_l = meta.max_query_len, meta.max_seq_len
    # Scatter flat queries into a padded [B, max_q] grid.
    seq_idx = torch.repeat_interleave(torch.arange(b, device=q.device), q_lens, output_size=t)
    tok_idx = torch.arange(t, device=q.device) - qsl[seq_idx]
    qp = q.new_zeros(b, max_q, hq, d)
    qp[seq_idx, tok_idx] = q
    k = gather_paged(k_cache, meta.block_tables, max_l)  # [B, L, Hkv, D]
    v = gather_paged(v_cache, meta.block_tables, max_l)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
    # Query t of sequence i sits at position seq_len - q_len + t and sees keys at positions <= it.
    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=q.device)[None]  # [B, max_q]
    k_pos = torch.arange(max_l, device=q.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, L]
    mask &= k_pos[None, None, :] < seq_lens[:, None, None]
    mask[:, :, 0] = True  # padded query rows: keep softmax finite; they are dropped below
    # Grouped heads in SDPA itself: no repeated K/V copies (bit-identical results; decode on
    # CPU 2.2x faster per call than repeat_interleave, SmolLM2's 9/3 heads)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None],
        scale=scale, enable_gqa=hkv != hq,
    )  # [B, Hq, max_q, D]
    return out.transpose(1, 2)[seq_idx, tok_idx]


def gather_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, start: int,
                  end: int, rows: int, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions start..end-1 of one sequence's K and V out of the paged cache (``table``: its
    block-table row), [rows, Hkv, D] each in ``dtype``, zero rows after them; an FP8 cache's
    dequantized with its per-head scales."""
    page = k_cache.shape[1]
    pos = torch.arange(start, end, device=table.device)
    out = []
    for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        x = cache[table[pos // page].long(), pos % page]  # [n, Hkv, D]
        x = x.to(dtype) if scale is None else dequantize_kv(x, scale, dtype)
        out.append(torch.cat([x, x.new_zeros(rows - (end - start), *x.shape[1:])]))
    return out[0], out[1]


def merge_attention_ref(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                        lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A ∪ B from its parts over A and B (o [H, T, D], lse [H, T] natural
    log): the softmax-weighted mean of the two, in float32. Returns [T, H, D] in o_a's dtype."""
    w = torch.softmax(torch.stack([lse_a, lse_b]).float(), dim=0)[..., None]  # [2, H, T, 1]
    o = w[0] * o_a.float() + w[1] * o_b.float()
    return o.transpose(0, 1).to(o_a.dtype)


@register_backend
class TorchAttention(AttentionBackend):
    """Reference backend: works on any device and dtype; slow but obviously right."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, *,
                positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        q, k = apply_rotary_ref(q, k, positions, cos_sin)
        ks, vs = self.kv_scales(k_cache)
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, ks, vs)
        return paged_attention_ref(q, k_cache, v_cache, meta, self.scale, ks, vs)
