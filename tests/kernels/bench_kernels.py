"""Benchmark the Triton kernels on CUDA (a plain script; pytest does not collect bench_*.py).

    python tests/kernels/bench_kernels.py [--quick]
        [--only decode|splits|prefill|prefill-tiles|fused|new-token]

Decode: llama-3-8b attention shape (32 q heads, 8 KV heads, head_dim 128, bf16, 16-token
pages, blocks shuffled) at batch 1/64 × context 1k/4k/16k, timed in a CUDA graph (as the
engine runs decode) with triton.testing.do_bench_cudagraph; bandwidth = K+V bytes read / time,
against a device-to-device copy measured on the same card; each case again with an FP8 cache
(``--kv-cache-dtype fp8``: half the bytes, per-head scales) and its speedup.
Splits (not in the default run): the same decode at batch 1/8/64 × context 128..16k with the
split-K factor forced to 1, 2, 4, .., 64 and chosen by ``choose_num_splits``, in µs; the last
lines give, per batch, the longest context at which one split (no reduce kernel) is within 3%
of the best: the value for ``paged_attention.NO_SPLIT_MAX_LEN``.
Prefill: 4096 causal tokens, TFLOP/s (causal FLOPs = 2·T²·D·Hq) against torch SDPA (flash),
and the Triton kernel again over an FP8 cache.
Prefill tiles (not in the default run): the prefill kernel's TFLOP/s per ``PrefillTiles``
(query tokens × keys per step, warps, stages), BF16 and FP8 caches, fresh
prompts and prompts after a cached prefix: the values for ``default_tiles``.
Fused: RMSNorm+residual and silu_and_mul bandwidth against torch eager.
New token (not in the default run): decode with the new token's rotary and cache write inside
the attention launch against rotary_and_cache + attention, batch 1..256 × 512 / 4k tokens
(batch 1 also 1k, 2k, 8k to 64k): the values for ``triton_backend.FUSED_NEW_TOKEN_MAX_SEQS`` and
``FUSED_NEW_TOKEN_MAX_LEN``. Decode and new token end with the decode kernel's registers and
spills per compiled variant. The SDPA path's parts: tests/kernels/bench_sdpa.py.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, uninstalled
from kestrel.attention.base import quantize_kv
from kestrel.attention.triton_backend import TritonAttention
from kestrel.kernels.fused import rms_norm, rotary_and_cache, silu_and_mul
from kestrel.kernels.paged_attention import (
    MAX_SPLITS,
    _decode_kernel,
    choose_num_splits,
    paged_attention_decode,
)
from kestrel.kernels.prefill_attention import PrefillTiles, prefill_attention
from kestrel.kernels.rotary import NewTokens
from kestrel.layers.norm import rms_norm_ref

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16


def _graph_ms(fn) -> float:
    """Median time of fn replayed in a CUDA graph (no Python launch overhead)."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def print_resources(kernel) -> None:
    """Registers and spills of each compiled variant of a Triton kernel (offline, Triton 3.9 put
    the decode kernel at 255 registers with a stack: is it so on this device?)."""
    try:
        variants = [k for cache in kernel.device_caches.values() for k in cache[0].values()]
        print(f"# {kernel.__name__}: " + "; ".join(
            f"{k.n_regs} registers, {k.n_spills} spilled" for k in variants))
    except (AttributeError, IndexError, TypeError) as e:  # the cache's layout is Triton's own
        print(f"# {kernel.__name__}: registers unknown with this Triton ({e!r:.60})")


def header() -> float:
    """Print the device, versions, date and command line; return the measured copy rate (GB/s)
    that bandwidth fractions are taken of."""
    if not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name} needs a CUDA device")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# command: python {' '.join(sys.argv)}")
    peak = copy_bandwidth()
    print(f"# device-to-device copy: {peak:.0f} GB/s (read + write)")
    return peak


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def paged_cache(batch: int, ctx: int) -> tuple[torch.Tensor, ...]:
    """Random K/V caches holding batch × ctx tokens in shuffled pages, with block tables."""
    nblk = triton.cdiv(ctx, BS)
    k_cache = torch.randn(batch * nblk, BS, HKV, D, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * nblk, device="cuda").view(batch, nblk).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables, seq_lens


def _decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, seq_lens) for batch sequences of ctx tokens."""
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    return (q, *paged_cache(batch, ctx))


def _fp8_cache(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The same inputs with FP8 caches, and their per-head scales as keyword arguments."""
    q, k_cache, v_cache, *rest = inputs
    scale = torch.full((HKV,), 4.0 / 448, device="cuda")
    return ((q, quantize_kv(k_cache, scale), quantize_kv(v_cache, scale), *rest),
            {"k_scale": scale, "v_scale": scale})


def _decode_ms(inputs: tuple[torch.Tensor, ...], splits: int, **scales) -> float:
    """Graph-replay time of one decode with a fixed split-K factor."""
    out = torch.empty_like(inputs[0])

    def fn() -> None:
        paged_attention_decode(*inputs, D**-0.5, out=out, num_splits=splits, **scales)

    return _graph_ms(fn)


def _decode_case(batch: int, ctx: int, peak: float) -> None:
    splits = choose_num_splits(batch, HKV, ctx, torch.device("cuda"))
    inputs = _decode_inputs(batch, ctx)
    ms = _decode_ms(inputs, splits)
    inputs8, scales = _fp8_cache(inputs)
    ms8 = _decode_ms(inputs8, splits, **scales)
    kv = 2 * batch * ctx * HKV * D
    gbs, gbs8 = kv * DTYPE.itemsize / ms / 1e6, kv / ms8 / 1e6
    print(f"{batch:>5} {ctx:>6} {splits:>6} {ms * 1e3:>9.1f} {gbs:>8.0f} {100 * gbs / peak:>6.0f}%"
          f" {ms8 * 1e3:>9.1f} {100 * gbs8 / peak:>6.0f}% {ms / ms8:>6.2f}x")


def bench_decode(peak: float, quick: bool) -> None:
    print(f"\ndecode  Hq={HQ} Hkv={HKV} D={D} {DTYPE} block={BS}  (CUDA graph replay)")
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'us':>9} {'GB/s':>8} {'% copy':>7}"
          f" {'fp8 us':>9} {'% copy':>7} {'fp8 x':>7}")
    for batch in (1, 64):
        for ctx in (1024, 4096) if quick else (1024, 4096, 16384):
            _decode_case(batch, ctx, peak)
    print_resources(_decode_kernel)


def _graph_splits(batch: int, ctx: int, max_model_len: int = 131072) -> int:
    """The split-K factor the engine's decode graph runs at this context: graphs are captured
    per context range (``decode_len_breaks``) at the range's upper bound, so a 512-token batch-1
    step runs the splits chosen for 2,048 tokens (32), not for 512 (8)."""
    bounds = (*TritonAttention.decode_len_breaks(batch), max_model_len)
    bound = next(b for b in bounds if b >= ctx)
    return choose_num_splits(batch, HKV, bound, torch.device("cuda"))


def bench_new_token(quick: bool) -> None:
    """Decode attention with the new token's rotary and cache write in its launch (NewTokens)
    against rotary_and_cache + attention, µs per layer, at the split-K factor of the engine's
    graph for that context: sets FUSED_NEW_TOKEN_MAX_SEQS and FUSED_NEW_TOKEN_MAX_LEN (quick:
    batch 1 only)."""
    print("\ndecode new token  (µs, CUDA graph replay, llama-3-8b heads)")
    print(f"{'batch':>5} {'ctx':>6} {'in launch':>10} {'separate':>9}")
    for batch in (1,) if quick else (1, 8, 32, 64, 128, 256):
        for ctx in ((512, 1024, 2048, 4096, 8192, 16384, 32768, 65536) if batch == 1
                    else (512, 4096)):
            q, k_cache, v_cache, tables, lens = _decode_inputs(batch, ctx)
            k = torch.randn(batch, HKV, D, device="cuda", dtype=DTYPE)
            v = torch.randn_like(k)
            pos = (lens - 1).long()
            cos_sin = torch.randn(ctx, D, device="cuda", dtype=torch.float32)
            slots = tables[:, -1].long() * BS + (ctx - 1) % BS
            splits = _graph_splits(batch, ctx)
            out = torch.empty_like(q)
            new = NewTokens(k, v, pos, cos_sin, slots)

            def fused() -> None:
                paged_attention_decode(q, k_cache, v_cache, tables, lens, D**-0.5, out=out,
                                       num_splits=splits, new=new)

            def separate() -> None:
                rotary_and_cache(q, k, v, pos, cos_sin, k_cache, v_cache, slots)
                paged_attention_decode(q, k_cache, v_cache, tables, lens, D**-0.5, out=out,
                                       num_splits=splits)

            print(f"{batch:>5} {ctx:>6} {_graph_ms(fused) * 1e3:>10.1f} "
                  f"{_graph_ms(separate) * 1e3:>9.1f}")
    print_resources(_decode_kernel)


def bench_splits(quick: bool) -> None:
    """Decode time (µs) per forced split-K factor, to place choose_num_splits' thresholds."""
    splits = [1 << i for i in range(MAX_SPLITS.bit_length())]  # 1, 2, 4, .., MAX_SPLITS
    ctxs = [128, 256, 512, 1024, 4096] if quick else [128 << i for i in range(8)]  # ..16k
    print(f"\ndecode split-K  Hq={HQ} Hkv={HKV} D={D} {DTYPE} block={BS}  (µs, CUDA graph "
          "replay; 'heur' = choose_num_splits given the true context)")  # fmt: skip
    print(f"{'batch':>5} {'ctx':>6} " + " ".join(f"{'s=' + str(n):>7}" for n in splits)
          + f" {'heur':>11} {'best':>5}")  # fmt: skip
    no_split_upto = {}  # batch → longest ctx up to which one split is always within 3%
    for batch in (1, 8, 64):
        no_split_upto[batch], still_ok = 0, True
        for ctx in ctxs:
            inputs = _decode_inputs(batch, ctx)
            us = [_decode_ms(inputs, n) * 1e3 for n in splits]
            heur = choose_num_splits(batch, HKV, ctx, torch.device("cuda"))
            heur_us = _decode_ms(inputs, heur) * 1e3
            best = min(range(len(splits)), key=us.__getitem__)
            print(f"{batch:>5} {ctx:>6} " + " ".join(f"{u:>7.1f}" for u in us)
                  + f" {heur:>3}:{heur_us:>7.1f} {splits[best]:>5}")  # fmt: skip
            still_ok = still_ok and us[0] <= 1.03 * us[best]
            if still_ok:
                no_split_upto[batch] = ctx
    for batch, ctx in no_split_upto.items():
        print(f"# batch {batch}: one split within 3% of the best up to ctx {ctx}")


def _prefill_case(q_len: int, prefix: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = q_len + prefix
    k_cache, v_cache, tables, seq_lens = paged_cache(1, seq)
    q = torch.randn(q_len, HQ, D, device="cuda", dtype=DTYPE)
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def fn() -> None:
        prefill_attention(q, k_cache, v_cache, qsl, seq_lens, tables, q_len, D**-0.5, out=out)

    ms = triton.testing.do_bench(fn, rep=200, return_mode="median")
    (_, k8, v8, *_), scales = _fp8_cache((q, k_cache, v_cache))
    ms8 = triton.testing.do_bench(
        lambda: prefill_attention(q, k8, v8, qsl, seq_lens, tables, q_len, D**-0.5, out=out,
                                  **scales), rep=200, return_mode="median")
    # Causal FLOPs: 2 matmuls × 2 FLOP × (visible query-key pairs) × D × Hq.
    flops = 4 * (q_len * prefix + q_len * (q_len + 1) / 2) * D * HQ
    sdpa_ms, err = float("nan"), float("nan")
    if prefix == 0:  # flash's causal mask is top-left aligned: compare fresh prompts only
        # SDPA on contiguous K/V, expanded to Hq heads beforehand (not timed).
        k = k_cache[tables[0].long()].reshape(-1, HKV, D)[:seq]
        v = v_cache[tables[0].long()].reshape(-1, HKV, D)[:seq]
        qt = q.transpose(0, 1)[None]  # [1, Hq, T, D]
        kt = k.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)[None]
        vt = v.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)[None]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            sdpa_ms = triton.testing.do_bench(
                lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                rep=200, return_mode="median",
            )  # fmt: skip
        fn()
        ref = ref[0].transpose(0, 1).float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
    # The backend's SDPA path for one fresh prompt (cuDNN first, grouped KV heads).
    backend_ms = float("nan")
    if prefix == 0:
        be = TritonAttention(HQ, HKV, D, D**-0.5)
        k = k_cache[tables[0].long()].reshape(-1, HKV, D)[:seq]
        v = v_cache[tables[0].long()].reshape(-1, HKV, D)[:seq]
        backend_ms = triton.testing.do_bench(lambda: be._causal_sdpa(q, k, v), rep=200,
                                             return_mode="median")
    print(f"{q_len:>6} {prefix:>6} {ms:>9.3f} {flops / ms / 1e9:>8.0f} {ms8:>7.3f} "
          f"{flops / ms8 / 1e9:>8.0f} {sdpa_ms:>8.3f} {flops / sdpa_ms / 1e9:>8.0f} "
          f"{backend_ms:>8.3f} {flops / backend_ms / 1e9:>8.0f} {err:>9.1e}")  # fmt: skip


def bench_prefill(quick: bool) -> None:
    print(f"\nprefill causal Hq={HQ} Hkv={HKV} D={D} {DTYPE} block={BS}  (fp8: the Triton "
          "kernel over an FP8 cache)")
    print(f"{'tokens':>6} {'prefix':>6} {'triton ms':>9} {'TFLOP/s':>8} {'fp8 ms':>7} "
          f"{'TFLOP/s':>8} {'flash ms':>8} {'TFLOP/s':>8} {'sdpa-be ms':>8} {'TFLOP/s':>8} "
          f"{'rel err':>9}")  # fmt: skip
    cases = [(512, 0), (1024, 0), (2048, 0), (4096, 0), (8192, 0), (1024, 3072)]
    for q_len, prefix in [(1024, 0), (4096, 0)] if quick else cases:
        _prefill_case(q_len, prefix)


PREFILL_TILES = [  # (block_m, block_n, num_warps, num_stages)
    (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
    (64, 128, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2),
]


def bench_prefill_tiles() -> None:
    cases = [(512, 0), (4096, 0), (1024, 3072), (4096, 12288)]
    for fp8 in (False, True):
        print(f"\nprefill tiles, TFLOP/s, Hq={HQ} Hkv={HKV} D={D} {'FP8' if fp8 else 'BF16'} "
              f"cache, block={BS}")
        print(f"{'m,n,warps,stages':>24} "
              + " ".join(f"{f'{t}+{p}':>11}" for t, p in cases))
        best: dict[tuple[int, int], tuple[float, tuple]] = {}
        for t in PREFILL_TILES:
            rates = []
            for q_len, prefix in cases:
                seq = q_len + prefix
                k_cache, v_cache, tables, seq_lens = paged_cache(1, seq)
                q = torch.randn(q_len, HQ, D, device="cuda", dtype=DTYPE)
                qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
                kw = {}
                if fp8:
                    (_, k_cache, v_cache, *_), kw = _fp8_cache((q, k_cache, v_cache))
                tiles = PrefillTiles(*t)
                ms = triton.testing.do_bench(
                    lambda: prefill_attention(q, k_cache, v_cache, qsl, seq_lens, tables, q_len,
                                              D**-0.5, tiles=tiles, **kw),
                    rep=100, return_mode="median")
                rate = 4 * (q_len * prefix + q_len * (q_len + 1) / 2) * D * HQ / ms / 1e9
                rates.append(rate)
                if rate > best.get((q_len, prefix), (0.0,))[0]:
                    best[(q_len, prefix)] = (rate, t)
            print(f"{str(t)[1:-1]:>24} " + " ".join(f"{r:>11.0f}" for r in rates), flush=True)
        print("# best: " + ", ".join(f"{c[0]}+{c[1]}: {b[1]} {b[0]:.0f}" for c, b in best.items()))


def bench_fused(peak: float) -> None:
    print("\nfused (bf16)               triton GB/s   torch GB/s")
    t, h, inter = 4096, 4096, 14336
    x = torch.randn(t, h, device="cuda", dtype=DTYPE)
    r = torch.randn_like(x)
    w = torch.randn(h, device="cuda", dtype=DTYPE)
    nbytes = 4 * x.numel() * x.element_size()  # read x, r; write out, new residual
    a = triton.testing.do_bench(lambda: rms_norm(x, w, 1e-6, r), return_mode="median")
    b = triton.testing.do_bench(lambda: rms_norm_ref(x, w, 1e-6, r), return_mode="median")
    print(f"rms_norm+res [{t}x{h}]      {nbytes / a / 1e6:>8.0f}   {nbytes / b / 1e6:>10.0f}")
    g = torch.randn(t, 2 * inter, device="cuda", dtype=DTYPE)
    nbytes = 3 * t * inter * g.element_size()
    a = triton.testing.do_bench(lambda: silu_and_mul(g), return_mode="median")
    b = triton.testing.do_bench(lambda: F.silu(g[:, :inter]) * g[:, inter:], return_mode="median")
    print(f"silu_and_mul [{t}x{2 * inter}]  {nbytes / a / 1e6:>8.0f}   {nbytes / b / 1e6:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--only", choices=["decode", "splits", "prefill", "prefill-tiles",
                                           "fused", "new-token"], default=None)
    args = parser.parse_args()
    peak = header()
    if args.only in (None, "decode"):
        bench_decode(peak, args.quick)
    if args.only == "splits":
        bench_splits(args.quick)
    if args.only == "new-token":
        bench_new_token(args.quick)
    if args.only in (None, "prefill"):
        bench_prefill(args.quick)
    if args.only == "prefill-tiles":
        bench_prefill_tiles()
    if args.only in (None, "fused"):
        bench_fused(peak)


if __name__ == "__main__":
    main()
