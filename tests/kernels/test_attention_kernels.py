"""Parity of the Triton attention kernels (decode, prefill) with ``paged_attention_ref``.

Each case poisons the output with NaN and compares with the float32 reference on the same
random paged batch (tests/kernels/attention_cases.py). Small shapes run everywhere (CPU:
Triton interpreter); the ``gpu`` cases use model shapes.
"""

from __future__ import annotations

import pytest
import torch

from kestrel.kernels.fused import rotary_and_cache
from kestrel.kernels.paged_attention import (
    MERGE_SPLITS,
    NO_SPLIT_MAX_LEN,
    choose_num_splits,
    paged_attention_decode,
)
from kestrel.kernels.prefill_attention import PrefillTiles, prefill_attention
from kestrel.kernels.rotary import NewTokens
from kestrel.layers.rotary import RotaryEmbedding
from tests.kernels.attention_cases import (
    DEV,
    DTYPES,
    NAN,
    assert_close,
    gpu,
    make_batch,
    reference,
)

# ----------------------------------------------------------------------------- decode


def check_decode(
    seq_lens: list[int], hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
    num_splits: int | None, dev: str, fp8: bool = False,
) -> None:  # fmt: skip
    b = make_batch([1] * len(seq_lens), [s - 1 for s in seq_lens], hq, hkv, d, bs, dtype, dev,
                   fp8=fp8)
    scale = d**-0.5
    out = torch.full_like(b.q, NAN)
    paged_attention_decode(
        b.q, b.k_cache, b.v_cache, b.meta.block_tables, b.meta.seq_lens, scale,
        out=out, num_splits=num_splits, max_seq_len=b.meta.max_seq_len, **b.scales,
    )  # fmt: skip
    assert_close(out, reference(b, scale), dtype)


# (Hq, Hkv, D, block_size): GQA ratios 1, 3, 4, 8; head_dim 64, 96, 128; pages 8, 16, 32.
DECODE_SHAPES = [(4, 4, 64, 16), (6, 2, 96, 8), (8, 2, 64, 32), (8, 1, 128, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", DECODE_SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int, num_splits: int) -> None:
    # Lengths: one token, one partial page, several tiles; with 3 splits some are empty.
    check_decode([1, 37, 150], hq, hkv, d, bs, dtype, num_splits, DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_fp8_cache(dtype: torch.dtype, num_splits: int) -> None:
    """An FP8 cache read as cached · per-head scale (the reference dequantizes in float32)."""
    check_decode([1, 37, 150], 8, 2, 64, 16, dtype, num_splits, DEV, fp8=True)


@pytest.mark.parametrize("power", [20, -20])
def test_decode_fp8_cache_with_q_outside_float16(power: int) -> None:
    """bf16 q beyond float16's range (×2^20; the kernel's float16 dots scale it by a power of
    two) or deep in its subnormals (×2^-20), K's scales compensating: the reference's output."""
    b = make_batch([1, 1, 1], [0, 36, 149], 8, 2, 64, 16, torch.bfloat16, DEV, fp8=True)
    b.q.mul_(2.0**power)
    b.k_scale.mul_(2.0**-power)
    out = paged_attention_decode(b.q, b.k_cache, b.v_cache, b.meta.block_tables,
                                 b.meta.seq_lens, 64**-0.5, num_splits=3, **b.scales)
    assert_close(out, reference(b, 64**-0.5), torch.bfloat16)


def test_decode_many_splits_merged_in_chunks() -> None:
    """More non-empty splits than the merge loads at once (MERGE_SPLITS = 16): 21 single-tile
    splits of 24, 11 of them, 1."""
    assert MERGE_SPLITS < 21
    check_decode([1300, 700, 3], 8, 2, 64, 16, torch.float32, 24, DEV)


def test_decode_heuristic_splits() -> None:
    check_decode([300, 5], 8, 2, 64, 16, torch.float32, None, DEV)


def test_short_contexts_decode_unsplit() -> None:
    """Up to NO_SPLIT_MAX_LEN tokens one launch does it all (no reduce kernel)."""
    dev = torch.device(DEV)
    assert choose_num_splits(1, 8, NO_SPLIT_MAX_LEN, dev) == 1
    assert choose_num_splits(1, 8, NO_SPLIT_MAX_LEN + 1, dev) > 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (28, 4, 128, 16), (12, 4, 64, 32)])
@pytest.mark.parametrize("num_splits", [1, 7, None])
def test_decode_gpu(dtype, hq, hkv, d, bs, num_splits) -> None:
    lens = torch.randint(1, 3000, (9,)).tolist() + [1, 4097]
    check_decode(lens, hq, hkv, d, bs, dtype, num_splits, "cuda")


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_zero_length_rows(num_splits: int) -> None:
    """Padding rows of a CUDA-graph batch (seq_len 0) give zeros, never NaN, and leave the
    other rows right."""
    b = make_batch([1, 1, 1], [20, 0, 40], 4, 2, 64, 16, torch.float32, DEV)
    seq_lens = b.meta.seq_lens.clone()
    seq_lens[1] = 0
    out = torch.full_like(b.q, NAN)
    paged_attention_decode(b.q, b.k_cache, b.v_cache, b.meta.block_tables, seq_lens, 0.125,
                           out=out, num_splits=num_splits)  # fmt: skip
    assert (out[1] == 0).all()
    ref = reference(b, 0.125)
    assert_close(out[[0, 2]], ref[[0, 2]], torch.float32)


def test_decode_empty_splits_leave_partials_unread(monkeypatch) -> None:
    """Far more splits than a short context has tiles (a graph captured at max_model_len):
    empty splits write no partial output and the reduce reads none, so NaN-filled partial
    buffers leave the output right."""
    real = torch.empty

    def empty(*args, **kw):
        t = real(*args, **kw)
        return t.fill_(NAN) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    check_decode([1, 37, 70], 8, 2, 64, 16, torch.float32, 16, DEV)


def check_decode_new_tokens(prefix_lens: list[int], dtype: torch.dtype, num_splits: int,
                            fp8: bool, dev: str, hq: int = 8, hkv: int = 2, d: int = 64) -> None:
    """``new=``: rotary, the cache write and attention in one launch, against rotary_and_cache
    then the kernel without it. A row with seq_len 0 and slot -1 (CUDA-graph padding) gets
    zeros and writes nothing."""
    b = make_batch([1] * len(prefix_lens), prefix_lens, hq, hkv, d, 16, dtype, dev, fp8=fp8)
    k = torch.randn(len(prefix_lens), hkv, d, dtype=dtype, device=dev) * 3
    v = torch.randn_like(k)
    rope = RotaryEmbedding(d, 4096, 10000.0, None).cos_sin.to(dev)
    positions = b.meta.seq_lens.long() - 1
    seq_lens, slots = b.meta.seq_lens.clone(), b.meta.slot_mapping.clone()
    seq_lens[-1], slots[-1] = 0, -1
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = torch.full_like(b.q, NAN)
    paged_attention_decode(b.q, kc, vc, b.meta.block_tables, seq_lens, d**-0.5, out=out,
                           num_splits=num_splits, **b.scales,
                           new=NewTokens(k, v, positions, rope, slots))  # fmt: skip
    ref_kc, ref_vc = b.k_cache.clone(), b.v_cache.clone()
    q, _ = rotary_and_cache(b.q.clone(), k.clone(), v, positions, rope, ref_kc, ref_vc,
                            slots, b.k_scale, b.v_scale)  # fmt: skip
    ref = torch.full_like(b.q, NAN)
    paged_attention_decode(q, ref_kc, ref_vc, b.meta.block_tables, seq_lens, d**-0.5, out=ref,
                           num_splits=num_splits, **b.scales)  # fmt: skip
    assert torch.equal(kc.view(torch.uint8), ref_kc.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), ref_vc.view(torch.uint8))
    assert (out[-1] == 0).all()
    assert_close(out, ref.float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
def test_decode_new_tokens(dtype: torch.dtype, num_splits: int, fp8: bool) -> None:
    # 333 tokens: splits of several tiles (the new token in the final one, tiles between)
    check_decode_new_tokens([0, 40, 332, 5], dtype, num_splits, fp8, DEV)


def test_decode_new_tokens_refuse_bad_shapes() -> None:
    b = make_batch([1, 1], [3, 9], 8, 2, 64, 16, torch.float32, DEV)
    k = torch.randn(2, 2, 64, device=DEV)
    rope = RotaryEmbedding(64, 64, 10000.0, None).cos_sin.to(DEV)
    pos, slots = b.meta.seq_lens.long() - 1, b.meta.slot_mapping
    bad = [NewTokens(k[:1], k[:1], pos, rope, slots),  # one sequence short
           NewTokens(k, k, pos[:1], rope, slots),  # positions short
           NewTokens(k, k, pos, rope[:, :32], slots),  # table of another head size
           NewTokens(k.transpose(1, 2).contiguous().transpose(1, 2), k, pos, rope, slots)]
    kc = b.k_cache.clone()
    for new in bad:
        with pytest.raises(ValueError, match="decode: "):
            paged_attention_decode(b.q, kc, b.v_cache, b.meta.block_tables, b.meta.seq_lens,
                                   0.125, new=new)
    assert torch.equal(kc, b.k_cache)  # refused before anything was written


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 7, 64])
@pytest.mark.parametrize("fp8", [False, True])
def test_decode_new_tokens_gpu(dtype: torch.dtype, num_splits: int, fp8: bool) -> None:
    check_decode_new_tokens([0, 1000, 3, 200, 4000, 63, 9], dtype, num_splits, fp8, "cuda",
                            32, 8, 128)


@pytest.mark.gpu
@gpu
def test_decode_cuda_graph_replay() -> None:
    """Captured once with a fixed num_splits, replayed with other lengths and block tables:
    the kernel must take every length from device memory (no host values baked in)."""
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    q = torch.randn(4, hq, d, dtype=dtype, device="cuda")
    kc = torch.randn(400, bs, hkv, d, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    tables = torch.zeros(4, 300, dtype=torch.int32, device="cuda")
    lens = torch.ones(4, dtype=torch.int32, device="cuda")  # capture-time values: arbitrary
    out = torch.full_like(q, NAN)

    def run() -> None:
        paged_attention_decode(q, kc, vc, tables, lens, d**-0.5, out=out, num_splits=16)

    run()  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for prefix_lens in ([100, 2000, 5, 700], [3000, 1, 64, 1500]):
        nb = make_batch([1] * 4, prefix_lens, hq, hkv, d, bs, dtype, "cuda", pad_cols=0)
        ncols = nb.meta.block_tables.shape[1]
        assert ncols <= tables.shape[1] and nb.k_cache.shape[0] <= kc.shape[0]
        q.copy_(nb.q)
        kc[: nb.k_cache.shape[0]].copy_(nb.k_cache)
        vc[: nb.v_cache.shape[0]].copy_(nb.v_cache)
        tables.zero_()
        tables[:, :ncols].copy_(nb.meta.block_tables)
        lens.copy_(nb.meta.seq_lens)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference(nb, d**-0.5), dtype)


# ----------------------------------------------------------------------------- prefill


def check_prefill(
    q_lens: list[int], prefix_lens: list[int], hq: int, hkv: int, d: int, bs: int,
    dtype: torch.dtype, dev: str, fp8: bool = False, tiles: PrefillTiles | None = None,
) -> None:  # fmt: skip
    b = make_batch(q_lens, prefix_lens, hq, hkv, d, bs, dtype, dev, fp8=fp8)
    scale = d**-0.5
    out = torch.full_like(b.q, NAN)
    m = b.meta
    prefill_attention(
        b.q, b.k_cache, b.v_cache, m.query_start_loc, m.seq_lens, m.block_tables,
        m.max_query_len, scale, out=out, tiles=tiles, **b.scales,
    )  # fmt: skip
    assert_close(out, reference(b, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", DECODE_SHAPES)
def test_prefill(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int) -> None:
    # Fresh prompt over several query tiles, cached prefix + extend, decode-like rows.
    check_prefill([37, 20, 1, 3], [0, 45, 13, 0], hq, hkv, d, bs, dtype, DEV,
                  tiles=PrefillTiles(16, 16))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_fp8_cache(dtype: torch.dtype) -> None:
    check_prefill([37, 20, 1, 3], [0, 45, 13, 0], 8, 2, 64, 16, dtype, DEV, fp8=True,
                  tiles=PrefillTiles(16, 16))  # fmt: skip


@pytest.mark.parametrize("power", [20, -20, None])
def test_prefill_fp8_cache_with_q_outside_float16(power: int | None) -> None:
    """As test_decode_fp8_cache_with_q_outside_float16, for the prefill kernel's float16 dots:
    one power of two for a whole query tile, here tiles of 16 rows over several sequences;
    None: q all zero (uniform attention, finite factors)."""
    b = make_batch([37, 20, 1, 3], [0, 45, 13, 0], 8, 2, 64, 16, torch.bfloat16, DEV, fp8=True)
    if power is None:
        b.q.zero_()
    else:
        b.q.mul_(2.0**power)
        b.k_scale.mul_(2.0**-power)
    m = b.meta
    out = prefill_attention(b.q, b.k_cache, b.v_cache, m.query_start_loc, m.seq_lens,
                            m.block_tables, m.max_query_len, 64**-0.5,
                            tiles=PrefillTiles(16, 16), **b.scales)
    assert_close(out, reference(b, 64**-0.5), torch.bfloat16)


def test_kernels_refuse_an_fp8_cache_without_scales() -> None:
    b = make_batch([1, 1], [4, 9], 4, 2, 64, 16, torch.float32, DEV, fp8=True)
    m = b.meta
    with pytest.raises(ValueError, match="one per KV head"):
        paged_attention_decode(b.q, b.k_cache, b.v_cache, m.block_tables, m.seq_lens, 0.125)
    with pytest.raises(ValueError, match="one per KV head"):
        prefill_attention(b.q, b.k_cache, b.v_cache, m.query_start_loc, m.seq_lens,
                          m.block_tables, 1, 0.125, k_scale=b.k_scale, v_scale=b.v_scale[:1])


def test_prefill_leaves_long_queries_to_the_caller() -> None:
    """skip_min_query: rows of sequences with at least that many queries (whole prompts and
    chunks after a prefix) stay as they were; every other row is the reference, with the grid
    bounded by the rest."""
    q_lens, prefix_lens = [37, 20, 1, 16, 15], [0, 45, 13, 0, 30]
    b = make_batch(q_lens, prefix_lens, 8, 2, 64, 16, torch.float32, DEV)
    out = torch.full_like(b.q, NAN)
    m = b.meta
    prefill_attention(b.q, b.k_cache, b.v_cache, m.query_start_loc, m.seq_lens, m.block_tables,
                      15, 0.125, out=out, tiles=PrefillTiles(16, 16), skip_min_query=16)
    skipped = torch.zeros(b.q.shape[0], dtype=torch.bool)
    starts = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    for i in (0, 1, 3):  # 37 fresh, 20 after 45, 16 fresh; 1 and 15 (after 30) are attended
        skipped[starts[i]:starts[i + 1]] = True
    assert out[skipped].isnan().all()
    assert_close(out[~skipped], reference(b, 0.125)[~skipped], torch.float32)


def test_prefill_default_tiles() -> None:
    check_prefill([70, 5], [0, 90], 4, 2, 64, 16, torch.bfloat16, DEV)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (28, 4, 128, 16), (12, 4, 64, 32)])
def test_prefill_gpu(dtype, hq, hkv, d, bs) -> None:
    check_prefill([1000, 333, 1, 129, 64], [0, 700, 2000, 0, 63], hq, hkv, d, bs, dtype, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [1, 7, None])
def test_fp8_cache_gpu(num_splits) -> None:
    lens = torch.randint(1, 3000, (9,)).tolist() + [1, 4097]
    check_decode(lens, 32, 8, 128, 16, torch.bfloat16, num_splits, "cuda", fp8=True)
    check_prefill([1000, 333, 1, 129], [0, 700, 2000, 63], 32, 8, 128, 16, torch.bfloat16,
                  "cuda", fp8=True)
