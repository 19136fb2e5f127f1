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
  chunks handled by separate programs that write a partial output and its log-sum-exp; a
  second kernel merges them (short contexts, up to ``NO_SPLIT_MAX_LEN``, are not split).
  The chunk length is computed in the kernel from the sequence's own length, so a launch
  with a fixed ``num_splits`` (as captured in a CUDA graph) is right for any context length.

Softmax runs in base 2 (``exp2``) on float32 scores; the P·V product takes P in the cache
dtype, as flash attention does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kestrel.kernels.pdl import pdl_args, pdl_enter
from kestrel.quant.fp8_ops import FP8_DTYPE

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # measured (H200, bf16, D=128): ~4 resident programs saturate HBM
# Contexts up to this many tokens decode unsplit: one launch, no reduce kernel, whose launch
# costs more than a short context takes to read. Measured (`bench_kernels.py --only splits`,
# H100, llama-3-8b heads, 2026-11-26): at 128 tokens unsplit 5.1 µs vs 5.5 split 4 ways; at 256
# unsplit 8.0 vs 5.5 (batch 1) and 8.4 vs 7.2 (batch 8).
NO_SPLIT_MAX_LEN = 128


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
    out_ptr,  # [B, Hq, D] final output (written when not SPLIT)
    part_out_ptr,  # [B, Hq, num_splits, D] fp32 normalised partial outputs (SPLIT)
    part_lse_ptr,  # [B, Hq, num_splits] fp32 base-2 log-sum-exp of each split (SPLIT)
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
    SPLIT: tl.constexpr,  # write partials for the reduce kernel instead of the output
    FP8_KV: tl.constexpr,  # FP8 cache: the per-head scales multiply q·k and the output
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no tf32 rounding), else the default
    UPCAST: tl.constexpr,  # interpreter only: dot in fp32 (see mma)
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
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
    # no partial output (the reduce kernel skips it: graphs captured with many splits run short
    # contexts with most splits empty), unsplit a zero output.
    has = l_i > 0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        row = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=out_mask & has[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
    else:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _reduce_kernel(
    part_out_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32, base 2
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # One program per (sequence, query head): out = Σ_s w_s·o_s / Σ_s w_s, w_s = 2^(lse_s - max).
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights 0, output 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    denom = tl.sum(w, axis=0)
    denom = tl.where(denom > 0, denom, 1.0)
    p_ptrs = part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    filled = s_mask & (lse > float("-inf"))  # empty splits wrote no partial output
    o = tl.load(p_ptrs, mask=filled[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / denom  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)  # fmt: skip


def check_kv_scales(name: str, k_cache: torch.Tensor, hkv: int, k_scale, v_scale) -> bool:
    """Is the cache FP8 (then with one float32 scale per KV head for K and for V)?"""
    if k_cache.dtype != FP8_DTYPE:
        return False
    for s in (k_scale, v_scale):
        if s is None or s.dtype != torch.float32 or s.numel() != hkv or not s.is_contiguous():
            raise ValueError(f"{name}: an FP8 cache needs contiguous float32 k_scale and "
                             f"v_scale of {hkv} values (one per KV head)")
    return True


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
        part_out = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused placeholders
    if not fp8:
        k_scale = v_scale = seq_lens  # unread placeholders
    _decode_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, out, part_out, part_lse,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        PAGE_SIZE=page_size, BLOCK_N=block_n, SPLIT=split, FP8_KV=fp8,
        **dot_flags(q.dtype, q.device),
        num_warps=num_warps, num_stages=num_stages, **pdl_args(q.device),
    )  # fmt: skip
    if split:
        _reduce_kernel[(b, hq)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
            BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, **pdl_args(q.device),
        )  # fmt: skip
    return out
