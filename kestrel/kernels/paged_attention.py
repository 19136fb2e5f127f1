"""Decode attention over the paged KV cache: one query token per sequence.

Decode is memory-bound: every step reads each sequence's whole K/V context once and does ~2
FLOP per byte. The kernel is shaped so that those bytes are read exactly once and by enough
programs to keep every SM's loads in flight:

* GQA packing. A program owns one (sequence, KV head) and ALL ``G = Hq // Hkv`` query heads
  that read it: the [G, D] query tile is padded to ``BLOCK_G >= 16`` rows (the smallest
  ``tl.dot`` tile), so each K/V tile feeds G heads from registers instead of being re-read
  G times from memory. The padding costs tensor-core FLOPs, which decode has to spare.
* Paged gather. A tile of ``BLOCK_N`` tokens may span several cache pages (or a fraction of
  one): each token's page comes from the block table, so any power-of-two page size works.
* Flash-decoding (split-K). With few sequences (batch 1..16 × 8 KV heads: too few programs
  to keep 132 SMs loading) the context of each (sequence, KV head) is cut into ``num_splits``
  chunks handled by separate programs that write a partial output and its log-sum-exp; the
  last of them to finish merges them (``split_merge``: an atomic arrival count per sequence
  and KV head), so no second kernel is launched (short contexts, up to ``NO_SPLIT_MAX_LEN``, are not split).
  The chunk length is computed in the kernel from the sequence's own length, so a launch
  with a fixed ``num_splits`` (as captured in a CUDA graph) is right for any context length.
* The step's new token (``rotary.NewTokens``): the kernel applies rotary to q and to the new
  K and writes the new K/V into the cache itself (``rotary.new_token``); the split holding the
  last position attends to them from registers. At batch 1 each launch costs ~2 µs, a layer's
  attention was three (rotary + cache write, attention, split merge) and is now one; from 8
  sequences on the fused kernel is slower than rotary_and_cache + attention, so the backend
  passes the new token only at batch 1 (``triton_backend.FUSED_NEW_TOKEN_MAX_SEQS``).

Softmax runs in base 2 (``exp2``) on float32 scores; the P·V product takes P in the cache
dtype, as flash attention does. An FP8 cache with bf16 queries runs its dots in float16
(``_f16_operands``): e4m3 → float16 is one instruction per two codes, → bfloat16 several, and
the kernel was bound by those conversions (45% of the copy rate at batch 64, slower than a
BF16 cache; 65% and 1.3× faster than BF16 with float16 dots, H200).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kestrel.kernels.attention_common import LOG2E, check_kv_scales, dot_flags, f16_query, mma
from kestrel.kernels.pdl import pdl_args, pdl_release, pdl_wait
from kestrel.kernels.rotary import NewTokens, check_new_tokens, new_token
from kestrel.kernels.rounding import hw_fp8_cast
from kestrel.kernels.split_merge import arrival_counters, merge_splits

MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # measured (H200, bf16, D=128): ~4 resident programs saturate HBM
# Contexts up to this many tokens decode unsplit: one launch, no reduce kernel, whose launch
# costs more than a short context takes to read. Measured (`bench_kernels.py --only splits`,
# H100, llama-3-8b heads, 2026-11-26): at 128 tokens unsplit 5.1 µs vs 5.5 split 4 ways; at 256
# unsplit 8.0 vs 5.5 (batch 1) and 8.4 vs 7.2 (batch 8).
NO_SPLIT_MAX_LEN = 128
# Partials the merging program loads at once (its loop's round trips: 64 splits in 4). H200,
# batch 1 at 4k context (64 splits), engine TPOT over three alternating runs: 8 → 16 took
# 4.236 → 4.228 ms; 32 made the kernel alone slower (more registers).
MERGE_SPLITS = 16


@triton.jit
def _load_tile(k_base, v_base, bt_row, n0, end, last, offs_n, offs_d, d_mask,
               stride_kb, stride_kt, stride_vb, stride_vt, PAGE_SIZE: tl.constexpr):
    """K [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of the cached tokens n0.. (< end, and not
    ``last``, the new token, which the caller supplies). Each token's page comes from the block
    table; a token's row is HEAD_DIM contiguous elements, so the gather loads 16-byte vectors."""
    pos_n = n0 + offs_n
    cached = (pos_n < end) & (pos_n != last)
    page = tl.load(bt_row + pos_n // PAGE_SIZE, mask=cached, other=0).to(tl.int64)
    in_page = pos_n % PAGE_SIZE
    k = tl.load(k_base + (page * stride_kb + in_page * stride_kt)[None, :] + offs_d[:, None],
                mask=cached[None, :] & d_mask[:, None], other=0.0)
    v = tl.load(v_base + (page * stride_vb + in_page * stride_vt)[:, None] + offs_d[None, :],
                mask=cached[:, None] & d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _attend(q, k, v, k_last, v_last, n0, end, last, offs_n, qk_scale, m_i, l_i, acc,
            ROPE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of the online softmax (base 2, float32 scores; P·V takes P in q's dtype, as
    flash attention does); ROPE: the new token's K/V come from registers."""
    pos_n = n0 + offs_n
    k = k.to(q.dtype)  # FP8 cache: e4m3 codes are exact in q's dtype
    v = v.to(q.dtype)
    if ROPE:
        k = tl.where((pos_n == last)[None, :], k_last[:, None], k)
        v = tl.where((pos_n == last)[:, None], v_last[None, :], v)
    qk = mma(q, k, DOT_PREC, UPCAST) * qk_scale  # [BLOCK_G, BLOCK_N]
    qk = tl.where((pos_n < end)[None, :], qk, float("-inf"))
    # The first tile always holds a valid token, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _f16_operands(q, k_last, v_last, qk_scale, ROPE: tl.constexpr):
    """q (and the new token's K/V, attended from registers) in float16 (f16_query)."""
    q, qk_scale = f16_query(q, qk_scale)
    if ROPE:
        k_last = k_last.to(tl.float16)
        v_last = v_last.to(tl.float16)
    return q, k_last, v_last, qk_scale


# The block table's width and the split count change with the batch: one compiled kernel
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    q_ptr,  # [B, Hq, D] (ROPE: not yet rotated)
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    k_scale_ptr,  # [Hkv] float32 (FP8_KV)
    v_scale_ptr,
    out_ptr,  # [B, Hq, D]
    part_out_ptr,  # [B, Hq, num_splits, D] fp32 normalised partial outputs (SPLIT)
    part_lse_ptr,  # [B, Hq, num_splits] fp32 base-2 log-sum-exp of each split (SPLIT)
    arrivals_ptr,  # [B * Hkv] int32, zero between launches (SPLIT)
    new_k_ptr,  # [B, Hkv, D] the new token's K, not yet rotated (ROPE)
    new_v_ptr,  # [B, Hkv, D] (ROPE)
    pos_ptr,  # [B] the new token's position (ROPE)
    cs_ptr,  # [max_pos, D] cos | sin halves (ROPE)
    slot_ptr,  # [B] int64 cache slot of the new token, < 0: not written (ROPE)
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    stride_nkb, stride_nkh,
    stride_nvb, stride_nvh,
    stride_cs,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    PAGE_SIZE: tl.constexpr,  # cache block size (tokens per page)
    BLOCK_N: tl.constexpr,  # tokens per tile
    MERGE_G: tl.constexpr,  # GROUP padded to a power of two (the merge's tiles)
    MERGE_S: tl.constexpr,  # splits per load of the merge
    SPLIT: tl.constexpr,  # num_splits > 1: partials merged by the last split to finish
    FP8_KV: tl.constexpr,  # FP8 cache: the per-head scales multiply q·k and the output
    F16_DOT: tl.constexpr,  # FP8 cache, bf16 q: dots in float16 (see _f16_operands)
    ROPE: tl.constexpr,  # rotate q and the new K, write the new K/V into the cache
    HW_CAST: tl.constexpr,  # FP8_KV and ROPE: the hardware e4m3 conversion
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no tf32 rounding), else the default
    UPCAST: tl.constexpr,  # interpreter only: dot in fp32 (see mma)
    PDL: tl.constexpr,
):  # fmt: skip
    # Before the PDL wait: what the step's earlier kernels do not write (lengths, positions,
    # block tables, the cached K/V of past tokens), so the first tile streams while the qkv
    # GEMV finishes; q and the new token's K/V only after it.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv = tl.num_programs(1)

    seq_len = tl.load(seq_lens_ptr + seq)
    # This split's token range [start, end): whole tiles, so only the last tile is ragged.
    # `used` splits hold tokens (0 for an empty padding row); the others do nothing.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    used = tl.cdiv(num_tiles, tiles_per_split)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    last = seq_len - 1 if ROPE else -1  # the new token: attended from registers (ROPE)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    out_mask = g_mask[:, None] & d_mask[None, :]
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if split < used:
        bt_row = block_tables_ptr + seq * stride_bt
        k_base = k_cache_ptr + kv_head * stride_kh
        v_base = v_cache_ptr + kv_head * stride_vh
        k0, v0 = _load_tile(k_base, v_base, bt_row, start, end, last, offs_n, offs_d, d_mask,
                            stride_kb, stride_kt, stride_vb, stride_vt, PAGE_SIZE)  # fmt: skip
        # FP8 cache: a per-head scale factors out of the dots (q·(s·k) = s·(q·k), p·(s·v) =
        # s·(p·v)): tiles are only converted, the scales fold into qk_scale and the output
        # (converting and scaling every element made the kernel compute-bound at 40% of the
        # copy rate, slower than a BF16 cache).
        v_scale = 1.0
        if FP8_KV:
            qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
            v_scale = tl.load(v_scale_ptr + kv_head)
        if ROPE:
            half: tl.constexpr = HEAD_DIM // 2
            d_low = offs_d < half
            partner = tl.where(d_low, offs_d + half, offs_d - half)
            pos = tl.load(pos_ptr + seq).to(tl.int64)
            cs_row = cs_ptr + pos * stride_cs + tl.where(d_low, offs_d, offs_d - half)
            cos = tl.load(cs_row, mask=d_mask, other=0.0).to(tl.float32)
            sin = tl.load(cs_row + half, mask=d_mask, other=0.0).to(tl.float32)
            slot = tl.load(slot_ptr + seq).to(tl.int64)
        pdl_wait(PDL)
        pdl_release(PDL)

        q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_ptrs + offs_d[None, :], mask=out_mask, other=0.0)  # [BLOCK_G, BLOCK_D]
        k_last = 0.0
        v_last = 0.0
        if ROPE:
            page = slot // PAGE_SIZE
            in_page = slot % PAGE_SIZE
            q, k_last, v_last = new_token(
                q, q_ptrs, out_mask, partner, cos, sin, d_low,
                new_k_ptr + seq * stride_nkb + kv_head * stride_nkh,
                new_v_ptr + seq * stride_nvb + kv_head * stride_nvh, offs_d, d_mask,
                k_cache_ptr + page * stride_kb + in_page * stride_kt + kv_head * stride_kh,
                v_cache_ptr + page * stride_vb + in_page * stride_vt + kv_head * stride_vh,
                (split == used - 1) & (slot >= 0), k_scale_ptr + kv_head, v_scale_ptr + kv_head,
                FP8_KV, HW_CAST)  # fmt: skip

        if F16_DOT:  # q in float16, scaled by a power of two that keeps it finite
            q, k_last, v_last, qk_scale = _f16_operands(q, k_last, v_last, qk_scale, ROPE)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        m_i, l_i, acc = _attend(q, k0, v0, k_last, v_last, start, end, last, offs_n, qk_scale,
                                m_i, l_i, acc, ROPE, DOT_PREC, UPCAST)  # fmt: skip
        # ROPE: the new token is in the first or the final tile of its split, so the tiles
        # between skip its select (same arithmetic): batch-1 decode at 64k context 7.59 ->
        # 6.97 ms a token (H200, seventeenth session).
        stop = end
        if ROPE:
            stop = start + (end - 1 - start) // BLOCK_N * BLOCK_N  # the final tile's start
        for n0 in range(start + BLOCK_N, stop, BLOCK_N):
            k, v = _load_tile(k_base, v_base, bt_row, n0, end, -1, offs_n, offs_d, d_mask,
                              stride_kb, stride_kt, stride_vb, stride_vt, PAGE_SIZE)
            m_i, l_i, acc = _attend(q, k, v, k_last, v_last, n0, end, -1, offs_n, qk_scale,
                                    m_i, l_i, acc, False, DOT_PREC, UPCAST)  # fmt: skip
        if ROPE:
            if stop > start:
                k, v = _load_tile(k_base, v_base, bt_row, stop, end, last, offs_n, offs_d,
                                  d_mask, stride_kb, stride_kt, stride_vb, stride_vt, PAGE_SIZE)
                m_i, l_i, acc = _attend(q, k, v, k_last, v_last, stop, end, last, offs_n,
                                        qk_scale, m_i, l_i, acc, ROPE, DOT_PREC, UPCAST)

        o = acc * (v_scale / l_i)[:, None]  # l_i > 0: the split holds a token
        if SPLIT:
            if used == 1:
                tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
            else:
                merge_splits(o, m_i + tl.log2(l_i), part_out_ptr, part_lse_ptr, arrivals_ptr,
                              out_ptr + seq * stride_ob + kv_head * GROUP * stride_oh,
                              stride_oh, seq * num_kv + kv_head,
                              (seq * num_kv + kv_head) * GROUP, split, used, num_splits,
                              offs_g, offs_d, g_mask, out_mask, GROUP, MERGE_G, MERGE_S,
                              HEAD_DIM)  # fmt: skip
        else:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif split == 0:  # an empty (padding) row: zeros, never NaN
        pdl_wait(PDL)  # the output may have been read by an earlier kernel
        pdl_release(PDL)
        tl.store(o_ptrs, tl.zeros([BLOCK_G, BLOCK_D], dtype=out_ptr.dtype.element_ty),
                 mask=out_mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device, block_n: int = 64
) -> int:
    """Split-K heuristic: split only when (batch × KV heads) programs leave SMs short of work
    and the longest context exceeds NO_SPLIT_MAX_LEN.

    Target about PROGRAMS_PER_SM programs per SM in total, rounded down to a power of two,
    and at least one tile (block_n tokens) of the longest sequence per split. On an H200 with
    the llama-3-8b shape this picks 64/16/4/1 splits at batch 1/4/16/64, each within ~10% of
    the best fixed choice. Off CUDA (the interpreter) pretend to have 4 SMs.
    """
    if max_seq_len <= NO_SPLIT_MAX_LEN:
        return 1
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    want = PROGRAMS_PER_SM * sms // max(1, batch * num_kv_heads)
    if want <= 1:
        return 1
    want = 1 << (want.bit_length() - 1)  # power of two: fewer distinct graph shapes
    return max(1, min(want, triton.cdiv(max_seq_len, block_n), MAX_SPLITS))


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): a 16 KB K tile + 16 KB V tile per stage.

    Swept on an H200 (D=128, ``sweep_decode_config.py``, CUDA-graph replays, 2026-11-26):
    for a bf16 cache BLOCK_N 64, 4 warps, 2 stages was best or within 4% at batch 1..64. An FP8
    cache (128-token tiles) has no single best: 64-token tiles were 11-12% faster at batch 8
    and 16, but the engine's batch-64 decode at 4k ran 12% slower with them (15.5 vs 13.8 ms
    per step, on another H200 host than the 13.8), so the byte rule stays until a choice by
    batch is measured.
    After the FP8 cache's float16 dots (thirteenth session, ``sweep_decode_config.py --cache
    fp8``, H200) the FP8 default (128, 4, 2) is within 3% of the best tile at batch 8-64.
    """
    elem = torch.finfo(dtype).bits // 8
    block_n = max(16, min(128, 16384 // (triton.next_power_of_2(head_dim) * elem)))
    return block_n, 4, 2


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    new: NewTokens | None = None,
) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] (one token per sequence, the last of its context).

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] (q's dtype, or FP8 with float32
    ``k_scale``/``v_scale`` [Hkv]); block_tables: [B, max_blocks] int32 (padded); seq_lens: [B]
    int32, context length including the new token. Returns out [B, Hq, D] in q's dtype.

    ``new``: q and ``new.k`` are not yet rotated; the kernel rotates them as
    ``fused.rotary_and_cache`` does (q is left as it is) and writes the new K/V into the
    cache. Without it the new token's K/V must already be in the cache.

    ``num_splits``: split-K factor; None picks one with ``choose_num_splits`` from
    ``max_seq_len`` (a host int; default: the block table's capacity, which never syncs).
    For CUDA-graph capture pass it explicitly: any value is correct for any lengths.
    """
    b, hq, d = q.shape
    _, page_size, hkv, d_cache = k_cache.shape
    if d_cache != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"decode: q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode: the head_dim axis of q and the caches must be contiguous")
    if page_size & (page_size - 1):
        raise ValueError(f"decode: block_size must be a power of two, got {page_size}")
    fp8 = check_kv_scales("decode", k_cache, hkv, k_scale, v_scale)
    if new is not None:
        check_new_tokens(new, q, hkv)
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    group = hq // hkv
    block_n, num_warps, num_stages = _decode_config(d, k_cache.dtype)
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * page_size
        num_splits = choose_num_splits(b, hkv, max_seq_len, q.device, block_n)
    split = num_splits > 1
    if split:
        part_out = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
        arrivals = arrival_counters(q.device, b * hkv)
    else:
        part_out = part_lse = arrivals = out  # unused placeholders
    if not fp8:
        k_scale = v_scale = seq_lens  # unread placeholders
    if new is None:
        nk = nv = q
        pos = cos_sin = slots = seq_lens  # unread placeholders
    else:
        nk, nv, pos, cos_sin, slots = new
    _decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, out, part_out, part_lse,
        arrivals, nk, nv, pos, cos_sin, slots,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1), cos_sin.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        PAGE_SIZE=page_size, BLOCK_N=block_n, MERGE_G=triton.next_power_of_2(group),
        MERGE_S=min(MERGE_SPLITS, triton.next_power_of_2(num_splits)),
        SPLIT=split, FP8_KV=fp8, ROPE=new is not None,
        HW_CAST=fp8 and new is not None and hw_fp8_cast(q.device),
        **dot_flags(q.dtype, q.device, fp8),
        num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=new is None,
        **pdl_args(q.device),
    )  # fmt: skip
    return out
