"""The Triton attention backend (rotary + cache write + attention) against the torch one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kestrel.attention import triton_backend
from kestrel.attention.base import KeptRows
from kestrel.attention.torch_ref import TorchAttention
from kestrel.attention.triton_backend import TritonAttention, sdpa_bucket
from kestrel.executor.cuda_graph import DecodeGraphs
from kestrel.kernels import fused as fused_kernels
from kestrel.kernels import paged_attention, prefill_attention
from kestrel.layers.rotary import RotaryEmbedding
from tests.kernels.attention_cases import (
    DEV,
    assert_close,
    gpu,
    make_batch,
)


def check_backend(q_lens: list[int], prefix_lens: list[int], dtype: torch.dtype, dev: str) -> None:
    """Triton backend (rotary + cache write + attention) against the torch one: attention in
    float32 on the same inputs; the cache written by the reference at the same dtype."""
    hq, hkv, d, bs = 8, 2, 64, 16
    b = make_batch(q_lens, prefix_lens, hq, hkv, d, bs, dtype, dev)
    t = b.q.shape[0]
    k = torch.randn(t, hkv, d, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    positions = [torch.arange(s - n, s) for n, s in zip(q_lens, b.meta.seq_lens_cpu)]
    rope = {"positions": torch.cat(positions).to(dev),
            "cos_sin": RotaryEmbedding(d, 4096, 10000.0, None).cos_sin.to(dev)}  # fmt: skip
    ref_backend = TorchAttention(hq, hkv, d, d**-0.5)
    backend = TritonAttention(hq, hkv, d, d**-0.5)
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    out = backend.forward(b.q.clone(), k.clone(), v, kc, vc, b.meta, **rope)  # rotates in place
    ref = ref_backend.forward(b.q.float(), k.float(), v.float(), b.k_cache.float(),
                              b.v_cache.float(), b.meta, **rope)  # fmt: skip
    ref_kc, ref_vc = b.k_cache.clone(), b.v_cache.clone()
    ref_backend.forward(b.q, k, v, ref_kc, ref_vc, b.meta, **rope)
    # Rotated K is bit-exact, except bf16 under the interpreter (it truncates, torch rounds).
    exact = dev == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(kc, ref_kc, rtol=0 if exact else 2**-7, atol=0 if exact else 1e-6)
    torch.testing.assert_close(vc, ref_vc, rtol=0, atol=0)  # a copy
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_mixed(dtype: torch.dtype) -> None:
    check_backend([20, 1, 6], [0, 30, 17], dtype, DEV)


def _spy(monkeypatch, obj, name: str, record) -> list:
    """Calls of obj.name, each recorded as record(args, kwargs)."""
    calls, real = [], getattr(obj, name)

    def spy(*a, **kw):
        calls.append(record(a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_long_queries_through_sdpa(dtype: torch.dtype, monkeypatch) -> None:
    """Sequences with many queries take SDPA (threshold and granule lowered so small shapes
    reach it), every length a bucket: whole prompts one causal call; chunks after a cached
    prefix P one causal call from bucket_down(P) on (the rest of the prefix as leading zero
    queries) and one over the prefix before it, merged; decode rows and short chunks beside
    them take the kernels. Outputs against the torch backend throughout."""
    attend = _spy(monkeypatch, TritonAttention, "_attend",
                  lambda a, kw: (a[1].shape[0], a[2].shape[0], kw["causal"]))
    merge = _spy(monkeypatch, prefill_attention, "merge_attention", lambda a, kw: a[0].shape[1])
    kernel = _spy(monkeypatch, prefill_attention, "prefill_attention", lambda a, kw: a[6])
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 8)
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_GRANULE", 4)
    check_backend([40], [0], dtype, DEV)  # one prompt: SDPA's own output
    check_backend([40, 9, 23], [0, 0, 0], dtype, DEV)  # 9 and 23 padded to 12 and 24
    assert attend == [(40, 40, True), (40, 40, True), (12, 12, True), (24, 24, True)]
    assert not kernel and not merge
    del attend[:]
    # 9 after 37: keys 36.. causal (1 leading zero query, 2 padded rows), 12 queries over 36
    check_backend([40, 9], [0, 37], dtype, DEV)
    assert attend == [(40, 40, True), (12, 12, True), (12, 36, False)] and merge == [9]
    del attend[:], merge[:]
    check_backend([9], [3], dtype, DEV)  # a prefix shorter than a step: one causal call
    assert attend == [(12, 12, True)] and not merge
    del attend[:]
    # a decode row, a long fresh prompt, a short chunk, a long chunk, a long fresh prompt
    check_backend([1, 30, 5, 12, 17], [20, 0, 9, 50, 0], dtype, DEV)
    assert attend == [(32, 32, True), (16, 16, True), (12, 48, False), (20, 20, True)]
    assert merge == [12] and kernel == [5]  # the paged kernel's grid spans the rest only
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 0)  # off
    check_backend([30, 12], [0, 50], dtype, DEV)
    assert len(attend) == 4 and kernel[1:] == [30]


def test_sdpa_buckets() -> None:
    """Lengths round to eight steps an octave (granule at least): never below (above, down)
    n, at most 1/8 of n away beyond the granule, and few: 25 shapes for 2k-16k queries."""
    for n in range(1, 20000, 7):
        up, down = sdpa_bucket(n, 256), sdpa_bucket(n, 256, down=True)
        assert n <= up <= max(n * 9 / 8, n + 255) and min(n * 7 / 8, n - 255) <= down <= n
        assert up % 256 == 0 and down % 256 == 0
    assert len({sdpa_bucket(n, 256) for n in range(2048, 16385)}) == 25


@pytest.mark.parametrize("fp8", [False, True])
def test_backend_mixed_step_decode_rows_take_the_decode_kernel(fp8: bool, monkeypatch) -> None:
    """The leading one-token rows of a mixed step (running requests come first) go to the
    decode kernel; the rest, a later one-token row included, to the prefill kernel."""
    decode = _spy(monkeypatch, paged_attention, "paged_attention_decode",
                  lambda a, kw: a[0].shape[0])
    kernel = _spy(monkeypatch, prefill_attention, "prefill_attention",
                  lambda a, kw: a[4].shape[0])
    if fp8:
        check_backend_fp8([1, 1, 1, 20, 1, 6], [30, 4, 70, 0, 12, 17])
    else:
        check_backend([1, 1, 1, 20, 1, 6], [30, 4, 70, 0, 12, 17], torch.bfloat16, DEV)
    assert decode == [3] and kernel == [3]


@pytest.mark.parametrize("q_lens,prefix_lens", [([20, 1, 6], [0, 30, 17]), ([1, 1], [0, 40])])
def test_backend_fp8_cache(q_lens, prefix_lens) -> None:
    """FP8 cache: the Triton backend writes the torch backend's codes and attends as it does."""
    check_backend_fp8(q_lens, prefix_lens)


def check_backend_fp8(q_lens: list[int], prefix_lens: list[int],
                      dtype: torch.dtype = torch.float32) -> None:
    hq, hkv, d = 8, 2, 64
    b = make_batch(q_lens, prefix_lens, hq, hkv, d, 16, dtype, DEV, fp8=True)
    k = torch.randn(b.q.shape[0], hkv, d, device=DEV, dtype=dtype) * 3
    v = torch.randn_like(k)
    positions = [torch.arange(s - n, s) for n, s in zip(q_lens, b.meta.seq_lens_cpu)]
    rope = {"positions": torch.cat(positions).to(DEV),
            "cos_sin": RotaryEmbedding(d, 4096, 10000.0, None).cos_sin.to(DEV)}  # fmt: skip
    outs, caches = [], []
    for cls in (TorchAttention, TritonAttention):
        backend = cls(hq, hkv, d, d**-0.5)
        backend.k_scale, backend.v_scale = b.k_scale, b.v_scale
        kc, vc = b.k_cache.clone(), b.v_cache.clone()
        outs.append(backend.forward(b.q.clone(), k.clone(), v, kc, vc, b.meta, **rope))
        caches.append((kc, vc))
    for got, want in zip(caches[1], caches[0]):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert_close(outs[1], outs[0].float(), dtype)
    with pytest.raises(RuntimeError, match="calibrated scales"):
        TorchAttention(hq, hkv, d, 0.125).forward(b.q, k, v, b.k_cache, b.v_cache, b.meta,
                                                  **rope)


def test_backend_fp8_cache_long_queries_through_sdpa(monkeypatch) -> None:
    """FP8 cache: long prompts and chunks take SDPA over the cached K/V, dequantized as the
    torch backend does (its outputs to float32 precision)."""
    attend = _spy(monkeypatch, TritonAttention, "_attend", lambda a, kw: a[2].shape[0])
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 8)
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_GRANULE", 4)
    check_backend_fp8([20], [0])
    check_backend_fp8([1, 20, 5, 12], [30, 0, 9, 50])
    assert attend == [20, 20, 16, 48]  # keys: 20, 20, then 12 after 50 (48.. causal, ..48)


def _fa4_reference(calls: list):
    """FlashAttention 4's ``flash_attn_func`` contract in plain torch (q [1, n, Hq, D] over
    k, v [1, m, Hkv, D], grouped heads, causal mask aligned to the last key), recording each
    call's (n, m); the real kernel meets the same tests on a GPU where it is installed."""
    def fa4(q, k, v, softmax_scale, causal):
        assert causal and q.shape[0] == k.shape[0] == 1
        n, m = q.shape[1], k.shape[1]
        calls.append((n, m))
        g = q.shape[2] // k.shape[2]
        qh, kh, vh = (x[0].transpose(0, 1).float() for x in
                      (q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)))
        s = (qh @ kh.transpose(1, 2)) * softmax_scale
        s.masked_fill_(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n),
                       float("-inf"))
        return (s.softmax(-1) @ vh).transpose(0, 1)[None].to(q.dtype), None
    return fa4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_long_queries_through_fa4(dtype: torch.dtype, monkeypatch) -> None:
    """With FlashAttention 4 present, the sequences that would take SDPA take one call each:
    a whole prompt over its own K/V, a chunk after a prefix over the prefix and itself (out
    of the cache); no SDPA call, no merge, the paged kernel for the short rest. An FP8 cache:
    every such sequence over its cached keys, dequantized. Outputs against the torch backend."""
    calls: list = []
    monkeypatch.setattr(triton_backend, "_fa4", lambda device: _fa4_reference(calls))
    attend = _spy(monkeypatch, TritonAttention, "_attend", lambda a, kw: None)
    merge = _spy(monkeypatch, prefill_attention, "merge_attention", lambda a, kw: None)
    kernel = _spy(monkeypatch, prefill_attention, "prefill_attention", lambda a, kw: a[6])
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 8)
    check_backend([40], [0], dtype, DEV)  # one prompt: FA4's output as it is
    check_backend([40, 9, 23], [0, 37, 0], dtype, DEV)
    assert calls == [(40, 40), (40, 40), (9, 46), (23, 23)]
    del calls[:]
    check_backend([1, 30, 5, 12, 17], [20, 0, 9, 50, 0], dtype, DEV)
    assert calls == [(30, 30), (12, 62), (17, 17)] and kernel == [5]
    del calls[:]
    check_backend_fp8([1, 20, 5, 12], [30, 0, 9, 50])
    assert calls == [(20, 20), (12, 62)]
    assert not attend and not merge


def test_backend_falls_back_when_fa4_fails(monkeypatch, caplog) -> None:
    """An installed FlashAttention 4 that raises (as a kernel that does not compile does) costs
    one warning: that step and every later one attend through SDPA, outputs as the torch
    backend's; running out of memory is raised, not taken for a broken FA4."""
    calls: list = []

    def broken(q, k, v, softmax_scale, causal):
        calls.append(q.shape[1])
        raise RuntimeError("DSLRuntimeError: cannot compile")

    monkeypatch.setattr(triton_backend, "_fa4", lambda device: broken)
    monkeypatch.setattr(triton_backend, "_FA4_FAILED", set())
    attend = _spy(monkeypatch, TritonAttention, "_attend", lambda a, kw: a[2].shape[0])
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 8)
    with caplog.at_level("WARNING", logger="kestrel.attention.triton_backend"):
        check_backend([40, 9, 23], [0, 37, 0], torch.float32, DEV)
        check_backend([30], [0], torch.float32, DEV)
    assert calls == [40] and attend  # FA4 tried once, SDPA attended everything
    assert [r.message.count("FlashAttention 4 failed") for r in caplog.records] == [1]

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(triton_backend, "_fa4", lambda device: oom)
    monkeypatch.setattr(triton_backend, "_FA4_FAILED", set())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        check_backend([40], [0], torch.float32, DEV)
    assert not triton_backend._FA4_FAILED


def check_kept(q_lens: list[int], prefix_lens: list[int], seqs: list[int] | None,
               dtype: torch.dtype, dev: str, fp8: bool = False) -> None:
    """forward_kept against the torch backend's forward at the kept rows: the last row of each
    sequence in ``seqs`` (None: every row of the last sequence, as prompt logprobs keep), and
    the cache written as the torch backend writes it."""
    hq, hkv, d = 8, 2, 64
    b = make_batch(q_lens, prefix_lens, hq, hkv, d, 16, dtype, dev, fp8=fp8)
    k = torch.randn(b.q.shape[0], hkv, d, dtype=dtype, device=dev) * (3 if fp8 else 1)
    v = torch.randn_like(k)
    positions = [torch.arange(s - n, s) for n, s in zip(q_lens, b.meta.seq_lens_cpu)]
    rope = {"positions": torch.cat(positions).to(dev),
            "cos_sin": RotaryEmbedding(d, 4096, 10000.0, None).cos_sin.to(dev)}  # fmt: skip
    ends = torch.tensor(q_lens).cumsum(0) - 1
    if seqs is None:
        keep = KeptRows(torch.arange(ends[-1] - q_lens[-1] + 1, ends[-1] + 1, device=dev))
    else:
        keep = KeptRows(ends[seqs].to(dev), torch.tensor(seqs, dtype=torch.int64, device=dev),
                        seqs)
    for cls in (TorchAttention, TritonAttention):
        backend = cls(hq, hkv, d, d**-0.5)
        backend.k_scale, backend.v_scale = b.k_scale, b.v_scale
        kc, vc = b.k_cache.clone(), b.v_cache.clone()
        if cls is TorchAttention:  # an FP8 cache: as check_backend_fp8, in q's dtype
            ref_caches = (kc, vc)
            ref = backend.forward(b.q.clone(), k.clone(), v, kc, vc, b.meta, **rope).float()
            if not fp8:  # as check_backend: float32 attention on the same inputs
                ref = backend.forward(b.q.float(), k.float(), v.float(), b.k_cache.float(),
                                      b.v_cache.float(), b.meta, **rope)
        else:
            out = backend.forward_kept(b.q.clone(), k.clone(), v, kc, vc, b.meta, keep, **rope)
            caches = (kc, vc)
    assert out.shape == (keep.rows.numel(), hq, d)
    assert_close(out, ref[keep.rows], dtype)
    for got, want in zip(caches, ref_caches):
        if fp8 or dtype != torch.bfloat16 or dev == "cuda":
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        else:  # rotated bf16 K: the interpreter truncates where torch rounds
            torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize(("dtype", "fp8"), [(torch.float32, False), (torch.bfloat16, False),
                                           (torch.float32, True)])  # bf16 + FP8: on the GPU
def test_backend_kept_rows(dtype: torch.dtype, fp8: bool, monkeypatch) -> None:
    """The last layer's attention for the rows it keeps: sequences' last rows take the decode
    kernel alone (all of them, a subset, none: a middle chunk caches its K/V and attends
    nothing); other kept rows (prompt logprobs) take the whole step's attention."""
    decode = _spy(monkeypatch, paged_attention, "paged_attention_decode",
                  lambda a, kw: a[0].shape[0])
    prefill = _spy(monkeypatch, prefill_attention, "prefill_attention", lambda a, kw: 1)
    for seqs in ([0, 1, 2, 3], [0, 1, 3], [2], []):
        check_kept([1, 20, 5, 12], [30, 0, 9, 50], seqs, dtype, DEV, fp8)
    assert decode == [4, 3, 1] and prefill == []
    check_kept([1, 20, 5, 12], [30, 0, 9, 50], None, dtype, DEV, fp8)
    assert prefill == [1]


@pytest.mark.parametrize(("fused_max", "fused_len", "fused"),
                         [(3, 4096, True), (1, 4096, False), (3, 77, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_decode(dtype: torch.dtype, fused_max: int, fused_len: int, fused: bool,
                        monkeypatch) -> None:
    """Three sequences, the longest 78 tokens: the new token's rotary and cache write in the
    attention launch (up to FUSED_NEW_TOKEN_MAX_SEQS sequences of up to FUSED_NEW_TOKEN_MAX_LEN
    tokens), or rotary_and_cache first (more sequences, a longer context)."""
    monkeypatch.setattr(triton_backend, "FUSED_NEW_TOKEN_MAX_SEQS", fused_max)
    monkeypatch.setattr(triton_backend, "FUSED_NEW_TOKEN_MAX_LEN", fused_len)
    separate = _spy(monkeypatch, fused_kernels, "rotary_and_cache", lambda a, kw: 1)
    check_backend([1, 1, 1], [0, 40, 77], dtype, DEV)
    assert separate == ([] if fused else [1])
    assert TritonAttention.decode_len_breaks(3) == ((fused_len,) if fused_max >= 3 else ())


def test_decode_graphs_one_per_context_range() -> None:
    """Batch sizes whose decode path changes with the context get a graph per range, a range
    only below max_model_len (buffers only: capturing needs CUDA, tests/test_gpu.py)."""
    stub = SimpleNamespace(is_first=True, is_last=True)
    kw = {"block_size": 16, "device": torch.device("cpu"), "hidden_size": 8,
          "dtype": torch.float32, "len_breaks": TritonAttention.decode_len_breaks}
    cut = triton_backend.FUSED_NEW_TOKEN_MAX_LEN
    graphs = DecodeGraphs(stub, [], 4, 2 * cut, **kw)
    assert graphs.bounds == {1: [cut, 2 * cut], 2: [2 * cut], 4: [2 * cut]}
    assert DecodeGraphs(stub, [], 2, cut, **kw).bounds == {1: [cut], 2: [cut]}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_gpu(dtype: torch.dtype) -> None:
    check_backend([500, 1, 1, 77], [0, 1000, 3, 200], dtype, "cuda")
    check_backend([1, 1, 500, 1, 77], [1000, 3, 0, 200, 0], dtype, "cuda")  # decode rows first
    check_backend([1] * 33, list(range(0, 3300, 100)), dtype, "cuda")


@pytest.mark.gpu
@gpu
def test_backend_long_queries_gpu(monkeypatch) -> None:
    """cuDNN's SDPA for long whole prompts and long chunks after a prefix (merged by their
    log-sum-exps) beside decode rows and short chunks, threshold lowered to 256 queries."""
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 256)
    check_backend([1, 700, 300, 100, 1000], [900, 0, 1500, 40, 2000], torch.bfloat16, "cuda")
    check_backend([2500], [1500], torch.bfloat16, "cuda")  # positions < check_backend's 4096
    check_backend_fp8([1, 700, 300, 1000], [900, 0, 1500, 2000], torch.bfloat16)
    check_backend([700, 300], [0, 1500], torch.float32, "cuda")  # float32: the kernels


@pytest.mark.gpu
@gpu
def test_backend_fa4_gpu(monkeypatch) -> None:
    """FlashAttention 4 where installed (flash-attn-4 wheels carried to the GPU machine),
    against the torch backend: long prompts, chunks after a prefix (its causal mask aligned to
    the last key), an FP8 cache, beside decode rows and short chunks; and the contract the
    CPU tests stand in for it, on the same shapes."""
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 not installed")
    assert triton_backend._fa4(torch.device("cuda")) is not None
    used = _spy(monkeypatch, TritonAttention, "_fa4_attend", lambda a, kw: a[8])
    monkeypatch.setattr("kestrel.attention.triton_backend.SDPA_MIN_TOKENS", 256)
    check_backend([4096], [0], torch.bfloat16, "cuda")
    check_backend([1, 700, 300, 100, 1000], [900, 0, 1500, 40, 2000], torch.bfloat16, "cuda")
    check_backend_fp8([1, 700, 300, 1000], [900, 0, 1500, 2000], torch.bfloat16)
    assert used == [[1, 2, 4], [1, 2, 3]]
    fa4 = triton_backend._fa4(torch.device("cuda"))
    q = torch.randn(1, 300, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(1, 1800, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    got = fa4(q, k, v, softmax_scale=0.088, causal=True)[0]
    want = _fa4_reference([])(q, k, v, softmax_scale=0.088, causal=True)[0]
    assert_close(got, want.float(), torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_backend_kept_rows_gpu() -> None:
    """forward_kept at prompt lengths that go through cuDNN in forward: a 4k prompt, a chunk
    after a prefix, decode rows; every sequence's last row, a subset, none."""
    for seqs in ([0, 1, 2], [1], []):
        check_kept([1, 4096, 700], [900, 0, 1500], seqs, torch.bfloat16, "cuda")
    check_kept([4096], [0], [0], torch.bfloat16, "cuda", fp8=True)
