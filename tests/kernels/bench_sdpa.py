"""Benchmark the SDPA path's parts on CUDA (a plain script; pytest does not collect bench_*.py).

    python tests/kernels/bench_sdpa.py [--quick] --only long-queries|gather

Long queries: a whole prompt or a chunk after a cached prefix, 512 to 16k queries after 0 to
64k cached tokens, through the paged kernel and through the backend's SDPA path (cuDNN): the
value for ``triton_backend.SDPA_MIN_TOKENS``.
Gather: ``gather_kv`` (the SDPA path's K/V out of the paged cache) per positions-per-program
against its torch reference, BF16 and FP8 caches, bandwidth against the copy.
Shapes and helpers are bench_kernels.py's (llama-3-8b attention, 16-token shuffled pages).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, uninstalled
from kestrel.attention.base import AttentionMetadata, quantize_kv
from kestrel.attention.torch_ref import gather_kv_ref
from kestrel.attention.triton_backend import TritonAttention
from kestrel.kernels.prefill_attention import gather_kv, prefill_attention
from tests.kernels.bench_kernels import BS, DTYPE, HKV, HQ, D, header, paged_cache


def bench_long_queries(quick: bool) -> None:
    """The backend's two ways for a sequence with many queries: the paged kernel, or SDPA
    (``TritonAttention._sdpa``: cuDNN over the gathered prefix and over the new keys, merged;
    one causal call for a fresh prompt). Gives ``SDPA_MIN_TOKENS``."""
    print(f"\nlong queries, Hq={HQ} Hkv={HKV} D={D} {DTYPE} block={BS}: paged kernel vs SDPA "
          "(cuDNN, prefix gathered, merged)")
    print(f"{'queries':>7} {'prefix':>7} {'kernel ms':>9} {'TFLOP/s':>7} {'sdpa ms':>8} "
          f"{'TFLOP/s':>7} {'speedup':>7} {'rel err':>8}")
    be = TritonAttention(HQ, HKV, D, D**-0.5)
    q_lens = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    prefixes = [0, 8192] if quick else [0, 1024, 4096, 16384, 65536]
    for q_len in q_lens:
        for prefix in prefixes:
            seq = q_len + prefix
            k_cache, v_cache, tables, seq_lens = paged_cache(1, seq)
            ctx_k = k_cache[tables[0].long()].flatten(0, 1)
            k = ctx_k[prefix:seq].contiguous()  # the new tokens' K/V, as cached
            v = v_cache[tables[0].long()].flatten(0, 1)[prefix:seq].contiguous()
            del ctx_k
            q = torch.randn(q_len, HQ, D, device="cuda", dtype=DTYPE)
            qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
            meta = AttentionMetadata(slot_mapping=qsl, query_start_loc=qsl, seq_lens=seq_lens,
                                     block_tables=tables, max_query_len=q_len, max_seq_len=seq,
                                     seq_lens_cpu=[seq], query_lens_cpu=[q_len])
            out, out_sdpa = torch.empty_like(q), torch.empty_like(q)
            ms = triton.testing.do_bench(
                lambda: prefill_attention(q, k_cache, v_cache, qsl, seq_lens, tables, q_len,
                                          D**-0.5, out=out), rep=100, return_mode="median")
            ms_sdpa = triton.testing.do_bench(
                lambda: be._sdpa(q, k, v, k_cache, v_cache, meta, [0], out_sdpa), rep=100,
                return_mode="median")
            err = ((out_sdpa.float() - out.float()).norm() / out.float().norm()).item()
            flops = 4 * (q_len * prefix + q_len * (q_len + 1) / 2) * D * HQ
            print(f"{q_len:>7} {prefix:>7} {ms:>9.3f} {flops / ms / 1e9:>7.0f} {ms_sdpa:>8.3f} "
                  f"{flops / ms_sdpa / 1e9:>7.0f} {ms / ms_sdpa:>7.2f} {err:>8.1e}", flush=True)
            del k_cache, v_cache, k, v
            torch.cuda.empty_cache()


def bench_gather(peak: float) -> None:
    """gather_kv's µs and fraction of the copy rate (bytes read + written) per block_t, against
    gather_kv_ref, for the cached prefix of a 16k chunk (16k and 48k positions, padded to the
    next multiple of 4,096 as SDPA's buckets are)."""
    print("\ngather_kv  (µs; % of copy; llama-3-8b KV heads, 16-token pages)")
    print(f"{'cache':>5} {'tokens':>6} "
          + " ".join(f"{'bt=' + str(b):>12}" for b in (16, 32, 64, 128)) + f" {'torch':>12}")
    for n in (16384, 49152):
        k_cache, v_cache, tables, _ = paged_cache(1, n)
        rows = triton.cdiv(n + 1, 4096) * 4096
        for fp8 in (False, True):
            scale = torch.full((HKV,), 4.0 / 448, device="cuda") if fp8 else None
            caches = ((quantize_kv(k_cache, scale), quantize_kv(v_cache, scale)) if fp8
                      else (k_cache, v_cache))
            nbytes = 2 * HKV * D * (n * caches[0].element_size() + rows * DTYPE.itemsize)
            args, cells = (*caches, tables[0], 0, n, rows, scale, scale, DTYPE), []
            for fn in [partial(gather_kv, *args, block_t=b) for b in (16, 32, 64, 128)] + [
                    partial(gather_kv_ref, *args)]:
                ms = triton.testing.do_bench(fn, rep=100, return_mode="median")
                cells.append(f"{ms * 1e3:>6.1f} {100 * nbytes / ms / 1e6 / peak:>4.0f}%")
            print(f"{'fp8' if fp8 else 'bf16':>5} {n:>6} " + " ".join(f"{c:>12}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--only", choices=["long-queries", "gather"], required=True)
    args = parser.parse_args()
    peak = header()
    if args.only == "long-queries":
        bench_long_queries(args.quick)
    else:
        bench_gather(peak)


if __name__ == "__main__":
    main()
