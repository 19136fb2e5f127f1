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
  last of them to arrive (an atomic counter per (sequence, KV head)) merges the partials into
  the output, so a split decode is one launch (in CUDA-graph replays on an H200, 0.2-1.2 µs
  faster than with a separate reduce kernel). The merging program zeroes its counter again,
  so replays need no memset; the one assumption is that no two split decode launches run
  concurrently on one device (the engine runs one forward pass at a time per device). Short
  contexts, up to ``NO_SPLIT_MAX_LEN``, are not split. The chunk length is computed in the
  kernel from the sequence's own length, so a launch with a fixed ``num_splits`` (as
  captured in a CUDA graph) is right for any context length.

Softmax runs in base 2 (``exp2``) on float32 scores; the P·V product takes P in the cache
dtype, as flash attention does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kestrel.quant.fp8_ops import FP8_DTYPE

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # measured (H200, bf16, D=128): ~4 resident programs saturate HBM
# Contexts up to this many tokens decode unsplit: no partials to write and merge, which cost
# more than a short context takes to read. Measured (`bench_kernels.py --only splits`, H100,
# llama-3-8b heads, 2026-11-26) with the former two-kernel split path (a separate reduce
# launch; not re-measured since the merge moved into the decode kernel): at 128 tokens
# unsplit 5.1 µs vs 5.5 split 4 ways; at 256 unsplit 8.0 vs 5.5 (batch 1) and 8.4 vs 7.2
# (batch 8).
NO_SPLIT_MAX_LEN = 128
# Split-K arrival counters per device: one int32 per (sequence, KV head) of a split launch.
SPLIT_COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit
def mma(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST=True multiplies in float32 (Triton's CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """Constexpr arguments of ``mma``: exact fp32 dots for fp32; upcast off CUDA."""
    upcast = device.type != "cuda"
    prec = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return {"DOT_PREC": prec, "UPCAST": upcast}


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    k_scale_ptr,  # [Hkv] float32 (FP8_KV)
    v_scale_ptr,
    out_ptr,  # [B, Hq, D] final output (SPLIT: written by the last split to arrive)
    part_out_ptr,  # [B, Hq, num_splits, D] fp32 normalised partial outputs (SPLIT)
    part_lse_ptr,  # [B, Hq, num_splits] fp32 base-2 log-sum-exp of each split (SPLIT)
    counters_ptr,  # [>= B * Hkv] int32 arrival counters, zero at launch and at exit (SPLIT)
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    PAGE_SIZE: tl.constexpr,  # cache block size (tokens per page)
    BLOCK_N: tl.constexpr,  # tokens per tile
    SPLIT: tl.constexpr,  # write partials; the last split to arrive merges them into out
    BLOCK_S: tl.constexpr,  # SPLIT: num_splits padded to a power of two
    MERGE_G: tl.constexpr,  # SPLIT: GROUP padded to a power of two (the merge's head axis)
    MERGE_CHUNK: tl.constexpr,  # SPLIT: splits merged per step
    FP8_KV: tl.constexpr,  # FP8 cache: the per-head scales multiply q·k and the output
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no tf32 rounding), else the default
    UPCAST: tl.constexpr,  # interpreter only: dot in fp32 (see mma)
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # This split's token range [start, end): whole tiles, so only the last tile is ragged.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # FP8 cache: e4m3 codes are exact in q's dtype, and a per-head scale factors out of the
    # dots (q·(s·k) = s·(q·k), p·(s·v) = s·(p·v)): the tiles are only converted, and the
    # scales fold into qk_scale and the output (converting and scaling every element made
    # the kernel compute-bound at 40% of the copy rate, slower than a BF16 cache).
    v_scale = 1.0
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] token positions
        n_mask = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = pos % PAGE_SIZE
        k_off = page * stride_kb + in_page * stride_kt  # [BLOCK_N]
        v_off = page * stride_vb + in_page * stride_vt
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # K as [BLOCK_D, BLOCK_N] so that q @ k is [BLOCK_G, BLOCK_N]; each token's row is
        # HEAD_DIM contiguous elements, so the gather still loads full 16-byte vectors.
        k = tl.load(
            k_base + k_off[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if FP8_KV:
            k = k.to(q.dtype)
        qk = mma(q, k, DOT_PREC, UPCAST) * qk_scale  # [BLOCK_G, BLOCK_N]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Online softmax: the first tile always holds a valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8_KV:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    # An empty split (or a zero-length padding sequence) has l_i == 0: lse = -inf and, split,
    # no partial output (the merge skips it: graphs captured with many splits run short
    # contexts with most splits empty), unsplit a zero output.
    has = l_i > 0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        pair = seq * tl.num_programs(1) + kv_head  # (sequence, KV head): its counter's index
        row = (pair * GROUP + offs_g) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=out_mask & has[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        # Every split, empty ones too, arrives; the last merges. The barrier puts all warps'
        # stores before the atomic, whose release publishes them; the last program's acquire
        # makes every split's stores visible to it (read past L1 with .cg all the same).
        tl.debug_barrier()
        if tl.atomic_add(counters_ptr + pair, 1, sem="acq_rel") == num_splits - 1:
            _merge_splits(part_out_ptr, part_lse_ptr, pair * GROUP, num_splits,
                          out_ptr + seq * stride_ob + kv_head * GROUP * stride_oh, stride_oh,
                          GROUP, HEAD_DIM, BLOCK_D, BLOCK_S, MERGE_G, MERGE_CHUNK)  # fmt: skip
            tl.store(counters_ptr + pair, 0)  # zero again for the next launch or graph replay
    else:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits(
    part_out_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32, base 2
    first_row,  # sequence * Hq + the group's first query head
    num_splits,
    out_ptr,  # the output row of the group's first query head
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    MERGE_G: tl.constexpr,  # GROUP padded to a power of two
    MERGE_CHUNK: tl.constexpr,  # splits read per step (a [MERGE_G, MERGE_CHUNK, BLOCK_D] tile)
):  # fmt: skip
    """out = Σ_s w_s·o_s / Σ_s w_s, w_s = 2^(lse_s - max_s lse_s), for the GROUP heads at once.

    All heads in one tile so that their loads overlap: a loop over heads, one round trip to L2
    after another, made a split decode slower than with a separate reduce kernel (H200, batch
    1, 4k tokens, 64 splits: 17.2 µs vs 10.9).
    """
    offs_g = tl.arange(0, MERGE_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, MERGE_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    rows = (first_row + offs_g) * num_splits  # [MERGE_G]: each head's split 0
    lse = tl.load(part_lse_ptr + rows[:, None] + offs_s[None, :],
                  mask=g_mask[:, None] & (offs_s < num_splits)[None, :], other=float("-inf"),
                  cache_modifier=".cg")  # fmt: skip
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights 0, output 0
    denom = tl.sum(tl.exp2(lse - m[:, None]), axis=1)
    denom = tl.where(denom > 0, denom, 1.0)
    acc = tl.zeros([MERGE_G, BLOCK_D], dtype=tl.float32)
    for c in tl.static_range(0, BLOCK_S, MERGE_CHUNK):
        s = c + offs_c
        rows_c = rows[:, None] + s[None, :]  # [MERGE_G, MERGE_CHUNK]
        # The chunk's lse again (a register tile cannot be sliced): L2 hits.
        lse_c = tl.load(part_lse_ptr + rows_c, mask=g_mask[:, None] & (s < num_splits)[None, :],
                        other=float("-inf"), cache_modifier=".cg")  # fmt: skip
        filled = lse_c > float("-inf")  # empty splits wrote no partial output
        o = tl.load(part_out_ptr + rows_c[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=filled[:, :, None] & d_mask[None, None, :], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        acc += tl.sum(o * tl.exp2(lse_c - m[:, None])[:, :, None], axis=1)
    tl.store(out_ptr + offs_g[:, None] * stride_oh + offs_d[None, :],
             (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])  # fmt: skip


def check_kv_scales(name: str, k_cache: torch.Tensor, hkv: int, k_scale, v_scale) -> bool:
    """Is the cache FP8 (then with one float32 scale per KV head for K and for V)?"""
    if k_cache.dtype != FP8_DTYPE:
        return False
    for s in (k_scale, v_scale):
        if s is None or s.dtype != torch.float32 or s.numel() != hkv or not s.is_contiguous():
            raise ValueError(f"{name}: an FP8 cache needs contiguous float32 k_scale and "
                             f"v_scale of {hkv} values (one per KV head)")
    return True


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """The device's split-K arrival counters: zeroed once, then left zero by every launch (each
    merging program resets its own), and never freed, as CUDA graphs keep their address."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode: run a split decode before CUDA-graph capture, which "
                               "would record the counters' zeroing instead of doing it")
        counters = _counters[device] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32,
                                                   device=device)
    return counters


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
) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] (one token per sequence, the last of its context).

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] (q's dtype, or FP8 with float32
    ``k_scale``/``v_scale`` [Hkv]); block_tables: [B, max_blocks] int32 (padded); seq_lens: [B]
    int32, context length including the new token (whose K/V must already be in the cache).
    Returns out [B, Hq, D] in q's dtype.

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
        if b * hkv > SPLIT_COUNTERS:
            raise ValueError(f"decode: {b} sequences × {hkv} KV heads exceed the {SPLIT_COUNTERS} "
                             f"split-K arrival counters; pass num_splits=1")
        part_out = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
        counters = _arrival_counters(q.device)
    else:
        part_out = part_lse = out  # unused placeholders
        counters = seq_lens  # unused placeholder
    if not fp8:
        k_scale = v_scale = seq_lens  # unread placeholders
    # The merge reads [merge_g, merge_chunk, D] partials per step: up to 8192 fp32 elements,
    # 64 registers a thread at 4 warps (chunks of 4..16 splits timed alike on an H200).
    block_s, block_d, merge_g = (triton.next_power_of_2(n) for n in (num_splits, d, group))
    merge_chunk = min(block_s, max(1, 8192 // (merge_g * block_d)))
    _decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, out, part_out, part_lse,
        counters, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=block_d,
        PAGE_SIZE=page_size, BLOCK_N=block_n,
        SPLIT=split, BLOCK_S=block_s, MERGE_G=merge_g, MERGE_CHUNK=merge_chunk, FP8_KV=fp8,
        **dot_flags(q.dtype, q.device),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
