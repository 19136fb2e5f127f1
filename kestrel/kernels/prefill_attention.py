"""Varlen causal prefill/extend attention over the paged KV cache (flash-attention style).

A flat batch holds B sequences end to end: sequence i owns query tokens
``query_start_loc[i]:query_start_loc[i+1]`` (q_len of them) and has ``seq_lens[i]`` tokens of
context after this step, so its queries sit at positions ``seq_len - q_len .. seq_len - 1``.
All keys, the cached prefix and the new tokens alike, are read from the paged cache through
the block table (the new K/V must already be written there), so prefill, chunked prefill and
prefix-cache hits are one code path.

One program computes a [BLOCK_M, D] tile of queries of one sequence and one query head with
a tiled online softmax over key tiles of BLOCK_N tokens, in two loops:

1. key tiles entirely at or before the tile's first query position: every row sees every
   key, so no causal or length mask is evaluated (the bulk of the work for long contexts);
2. the remaining tiles up to the tile's last query position, with the causal mask.

The grid is (cdiv(max_query_len, BLOCK_M), B, Hq); programs whose tile starts beyond their
sequence's q_len exit at once, so ragged batches cost only those launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kestrel.kernels.attention_common import LOG2E, check_kv_scales, dot_flags, f16_query, mma


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # [BLOCK_M, BLOCK_D], [BLOCK_M, BLOCK_D], [BLOCK_M], [BLOCK_M]
    k_base, v_base, bt_row, n0, q_pos, seq_len, qk_scale,
    stride_kb, stride_kt, stride_vb, stride_vt,
    offs_n, offs_d, d_mask,
    PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, FP8_KV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of a query tile against the key tile at positions n0.."""
    pos = n0 + offs_n  # [BLOCK_N] key positions
    if MASKED:
        n_mask = pos < seq_len
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + pos // PAGE_SIZE).to(tl.int64)
    in_page = pos % PAGE_SIZE
    k_ptrs = k_base + (page * stride_kb + in_page * stride_kt)[None, :] + offs_d[:, None]
    v_ptrs = v_base + (page * stride_vb + in_page * stride_vt)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
    if FP8_KV:  # exact in q's dtype; the scales are in qk_scale and the caller's output
        k = k.to(q.dtype)
    qk = mma(q, k, DOT_PREC, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        causal = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        qk = tl.where(causal, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
    else:
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    if FP8_KV:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return acc, m_new, l_i


# The block table's width changes with every batch, and a mixed step passes its metadata from
# the first non-decode sequence on (any 4-byte offset; a bf16 cache's unread scale pointers are
# seq_lens too): one compiled kernel for all of them (scripts/compile_variants.py finds others).
@triton.jit(do_not_specialize=["stride_bt", "skip_min_query"],
            do_not_specialize_on_alignment=["query_start_loc_ptr", "seq_lens_ptr",
                                            "block_tables_ptr", "k_scale_ptr", "v_scale_ptr"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    out_ptr,  # [T, Hq, D]
    query_start_loc_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    k_scale_ptr,  # [Hkv] float32 (FP8_KV)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    skip_min_query,  # > 0: sequences with q_len >= it are left to the caller
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_KV: tl.constexpr,  # FP8 cache with per-KV-head scales
    F16_DOT: tl.constexpr,  # FP8 cache, bf16 q: dots in float16 (attention_common.f16_query)
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    if (skip_min_query > 0) & (q_len >= skip_min_query):
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # position of this sequence's first query token

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = first_pos + offs_m  # [BLOCK_M]
    tok = (q_start + offs_m).to(tl.int64)  # [BLOCK_M] flat token index
    q_ptrs = q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    kv_head = head // GROUP
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    bt_row = block_tables_ptr + seq * stride_bt
    v_scale = 1.0
    if FP8_KV:  # per-head scales factor out of the dots, as in the decode kernel
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    if F16_DOT:  # the tiles convert to q's dtype: float16 is one instruction per two codes
        q, qk_scale = f16_query(q, qk_scale)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Loop 1: keys before the tile's first query position are visible to every row.
    full_end = (first_pos + tile * BLOCK_M) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, n0, q_pos, seq_len, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, d_mask,
            PAGE_SIZE, False, FP8_KV, DOT_PREC, UPCAST,
        )  # fmt: skip
    # Loop 2: the diagonal, up to the tile's last valid query position (inclusive). Key 0 is
    # visible to every row, so the first masked tile leaves every m_i finite (no NaN rows).
    last_pos = first_pos + tl.minimum((tile + 1) * BLOCK_M, q_len)  # exclusive bound
    for n0 in range(full_end, last_pos, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, n0, q_pos, seq_len, qk_scale,
            stride_kb, stride_kt, stride_vb, stride_vt, offs_n, offs_d, d_mask,
            PAGE_SIZE, True, FP8_KV, DOT_PREC, UPCAST,
        )  # fmt: skip

    o = acc * (v_scale / l_i)[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class PrefillTiles:
    """Tiling and launch of the prefill kernel."""

    block_m: int  # query tokens per program (one query head)
    block_n: int  # keys per inner step
    num_warps: int = 4
    num_stages: int = 3


def default_tiles(dtype: torch.dtype, device: torch.device, fp8_cache: bool) -> PrefillTiles:
    """Swept on an H200 (``bench_kernels.py --only prefill-tiles``, D=128, 4k fresh, 1k after
    3k, 4k after 12k cached tokens; fifteenth session): over a bf16 cache 64×64 tiles, 4 warps,
    3 stages reach 295 / 287 / 352 TFLOP/s, ahead of 128×128 / 8 warps / 2 stages (267 / 255 /
    320) and 128×64 (253 / 239 / 302); over an FP8 cache 128×128 / 8 / 2 leads (262 / 251 /
    314 against 222 / 217 / 253 at 64×64: fewer, longer float16 dots per converted tile).
    Several query heads of one KV head per program (sharing its K/V tiles) gained nothing
    (``gpu-runs/2026-11-27h``). Small tiles also give short prompts more programs.
    """
    if device.type != "cuda":
        return PrefillTiles(32, 32, num_stages=1)  # interpreter: fewer, larger programs
    if dtype == torch.float32:
        return PrefillTiles(64, 32, num_stages=2)
    if fp8_cache:
        return PrefillTiles(128, 128, num_warps=8, num_stages=2)
    return PrefillTiles(64, 64)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    tiles: PrefillTiles | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    skip_min_query: int = 0,
) -> torch.Tensor:
    """Causal varlen attention of flat queries q [T, Hq, D] against the paged cache.

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] already holding the new tokens' K/V (q's
    dtype, or FP8 with float32 ``k_scale``/``v_scale`` [Hkv]);
    query_start_loc: [B+1] int32; seq_lens: [B] int32 (context after this step, >= q_len);
    block_tables: [B, max_blocks] int32; max_query_len: host int bounding the grid.
    Returns out [T, Hq, D] in q's dtype. ``tiles`` overrides ``default_tiles``.
    ``skip_min_query`` > 0: the rows of sequences with at least that many queries are not
    written (the caller attends them otherwise); max_query_len may leave them out.
    """
    t, hq, d = q.shape
    _, page_size, hkv, d_cache = k_cache.shape
    if d_cache != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"prefill: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("prefill: the head_dim axis of q and the caches must be contiguous")
    if page_size & (page_size - 1):
        raise ValueError(f"prefill: block_size must be a power of two, got {page_size}")
    fp8 = check_kv_scales("prefill", k_cache, hkv, k_scale, v_scale)
    if not fp8:
        k_scale = v_scale = seq_lens  # unread placeholders
    if out is None:
        out = torch.empty_like(q)
    b = seq_lens.shape[0]
    if t == 0 or b == 0 or max_query_len == 0:
        return out
    cfg = tiles or default_tiles(q.dtype, q.device, fp8)
    grid = (triton.cdiv(max_query_len, cfg.block_m), b, hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0), skip_min_query,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), PAGE_SIZE=page_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, FP8_KV=fp8, **dot_flags(q.dtype, q.device, fp8),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# One compiled variant whatever the row count and wherever a slice of the log-sum-exps starts
# (a chunk's rows begin r rows into the causal call's output).
@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["la_ptr", "lb_ptr"])
def _merge_kernel(
    oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, n,
    stride_oah, stride_oat, stride_lah, stride_lat,
    stride_obh, stride_obt, stride_lbh, stride_lbt,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    t_mask = t < n
    mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]
    la = tl.load(la_ptr + head * stride_lah + t * stride_lat, mask=t_mask, other=0.0)
    lb = tl.load(lb_ptr + head * stride_lbh + t * stride_lbt, mask=t_mask, other=0.0)
    m = tl.maximum(la, lb)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    oa = tl.load(oa_ptr + head * stride_oah + t[:, None] * stride_oat + d[None, :], mask=mask)
    ob = tl.load(ob_ptr + head * stride_obh + t[:, None] * stride_obt + d[None, :], mask=mask)
    o = (oa.to(tl.float32) * wa[:, None] + ob.to(tl.float32) * wb[:, None]) / (wa + wb)[:, None]
    tl.store(out_ptr + t[:, None] * stride_ot + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


def merge_attention(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                    lse_b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Attention over keys A ∪ B from attention over A and over B: out[t, h] = (w_a·o_a +
    w_b·o_b) / (w_a + w_b) with w = exp(lse − max), in float32, rounded once.

    o_a, o_b: [H, T, D] (any strides, D contiguous); lse_a, lse_b: [H, T] float32, natural-log
    sums of exp(scores); out: [T, H, D], written in place and returned."""
    h, n, d = o_a.shape
    if o_b.shape != o_a.shape or lse_a.shape != (h, n) or lse_b.shape != (h, n) \
            or out.shape != (n, h, d):
        raise ValueError(f"merge: o {tuple(o_a.shape)}/{tuple(o_b.shape)}, lse "
                         f"{tuple(lse_a.shape)}/{tuple(lse_b.shape)}, out {tuple(out.shape)}")
    if o_a.stride(-1) != 1 or o_b.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge: the head_dim axis of the outputs must be contiguous")
    if n == 0:
        return out
    block_t = 16 if o_a.device.type == "cuda" else 32
    _merge_kernel[(triton.cdiv(n, block_t), h)](
        o_a, lse_a, o_b, lse_b, out, n,
        o_a.stride(0), o_a.stride(1), lse_a.stride(0), lse_a.stride(1),
        o_b.stride(0), o_b.stride(1), lse_b.stride(0), lse_b.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_T=block_t,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["start", "n", "rows"])
def _gather_kv_kernel(
    k_cache_ptr, v_cache_ptr, table_ptr, k_scale_ptr, v_scale_ptr, k_out_ptr, v_out_ptr,
    start, n, rows,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8_KV: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    cached = (t < n)[:, None] & d_mask[None, :]
    pos = start + t
    page = tl.load(table_ptr + pos // PAGE_SIZE, mask=t < n, other=0).to(tl.int64)
    in_page = pos % PAGE_SIZE
    k = tl.load(k_cache_ptr + (page * stride_kb + in_page * stride_kt + head * stride_kh)[:, None]
                + d[None, :], mask=cached, other=0.0)
    v = tl.load(v_cache_ptr + (page * stride_vb + in_page * stride_vt + head * stride_vh)[:, None]
                + d[None, :], mask=cached, other=0.0)
    if FP8_KV:  # dequantize_kv: x · scale[head] in float32, rounded once
        k = k.to(tl.float32) * tl.load(k_scale_ptr + head)
        v = v.to(tl.float32) * tl.load(v_scale_ptr + head)
    out = t[:, None] * stride_ot + head * stride_oh + d[None, :]
    mask = (t < rows)[:, None] & d_mask[None, :]
    tl.store(k_out_ptr + out, k.to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_out_ptr + out, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, start: int,
              end: int, rows: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
              dtype: torch.dtype, block_t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions start..end-1 of one sequence's K and V out of the paged cache (``table``: its
    block-table row) as [rows, Hkv, D] in ``dtype``, zero after row end − start (the padding
    of SDPA's length buckets); an FP8 cache's dequantized with its per-head scales
    (``dequantize_kv``'s rounding). One pass, where index_select, slicing, float32
    dequantization and padding made a copy each (reference: ``gather_kv_ref``); ``block_t``
    positions a program (``tests/kernels/bench_sdpa.py --only gather``)."""
    n = end - start
    _, page_size, hkv, d = k_cache.shape
    fp8 = check_kv_scales("gather_kv", k_cache, hkv, k_scale, v_scale)
    if not 0 <= start <= end <= table.shape[0] * page_size or rows < n \
            or v_cache.shape != k_cache.shape or k_cache.stride(-1) != 1 \
            or v_cache.stride(-1) != 1:
        raise ValueError(f"gather_kv: positions {start}..{end} into {rows} rows, table of "
                         f"{table.shape[0]} pages of {page_size}, caches {tuple(k_cache.shape)}"
                         f"/{tuple(v_cache.shape)} (head_dim contiguous)")
    k = torch.empty(rows, hkv, d, dtype=dtype, device=k_cache.device)
    v = torch.empty_like(k)
    if rows == 0:
        return k, v
    _gather_kv_kernel[(triton.cdiv(rows, block_t), hkv)](
        k_cache, v_cache, table, k_scale, v_scale, k, v, start, n, rows,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k.stride(0), k.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_T=block_t, PAGE_SIZE=page_size,
        FP8_KV=fp8,
    )  # fmt: skip
    return k, v
