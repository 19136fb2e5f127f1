"""Tile and split sweep of the paged decode-attention kernel, BF16 vs FP8 cache: picks the
(BLOCK_N, num_warps, num_stages) of ``paged_attention._decode_config`` per cache element size,
and checks ``choose_num_splits`` against 2x and 4x its choice. Timed as CUDA-graph replays
(as decode runs): plain launches of a 5-40 µs kernel measure the host, not the kernel.

    python scripts/sweep_decode_config.py [--cache bf16|fp8]   # one GPU; µs and % of copy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.attention.base import FP8_DTYPE
from kestrel.kernels import paged_attention as pa

HQ, HKV, D, PAGE = 32, 8, 128, 16
# (batch, context): decode at batch 64 (issue 5), and the few-sequence long contexts where
# plain launches (2026-11-26 19:27 UTC, H200) had batch 1 at 16k 1.6x faster with (32, 8, 4)
CASES = [(64, 4096), (64, 1024), (8, 16384), (1, 16384), (1, 1024), (1, 4096), (4, 4096),
         (16, 4096)]
CONFIGS = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 4)]


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), rep=200)
    return 2 * x.numel() / ms / 1e6  # GB/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", choices=["bf16", "fp8"], default=None, help="one cache type only")
    ap.add_argument("--cases", default=None,
                    help="BATCHxCONTEXT,... instead of the default cases, e.g. 1x65536,8x16384")
    ap.add_argument("--splits", default=None,
                    help="split counts to try, e.g. 64,128,256 (default: the heuristic's "
                         "choice, 2x and 4x it)")
    ap.add_argument("--top", type=int, default=1, help="print the N fastest of each case")
    args = ap.parse_args()
    cases = CASES if args.cases is None else [
        tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    bw = copy_bandwidth()
    print(torch.cuda.get_device_name(), f"copy {bw:.0f} GB/s")
    real = pa._decode_config
    assert real(D, torch.bfloat16) in CONFIGS and real(D, FP8_DTYPE) in CONFIGS
    for batch, ctx in cases:
        pages = batch * ctx // PAGE
        q = torch.randn(batch, HQ, D, dtype=torch.bfloat16, device="cuda")
        tables = torch.randperm(pages, device="cuda", dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        for fp8 in (False, True) if batch >= 8 else (False,):  # FP8 cache: the batched cases
            if args.cache and fp8 != (args.cache == "fp8"):
                continue
            cache_dt = FP8_DTYPE if fp8 else torch.bfloat16
            kc = torch.randn(pages, PAGE, HKV, D, device="cuda").to(cache_dt)
            vc = torch.randn(pages, PAGE, HKV, D, device="cuda").to(cache_dt)
            sc = {"k_scale": torch.ones(HKV, device="cuda"),
                  "v_scale": torch.ones(HKV, device="cuda")} if fp8 else {}
            kv_bytes = 2 * kc.numel() * kc.element_size()
            auto = pa.choose_num_splits(batch, HKV, ctx, q.device)
            res = []
            for cfg in CONFIGS:
                pa._decode_config = lambda *_, c=cfg: c
                tries = ({auto, 2 * auto, 4 * auto} if args.splits is None
                         else {auto, *map(int, args.splits.split(","))})
                for splits in sorted(tries):
                    def run(q=q, kc=kc, vc=vc, tables=tables, lens=lens, sc=sc, splits=splits):
                        return pa.paged_attention_decode(q, kc, vc, tables, lens, 0.1,
                                                         num_splits=splits, **sc)
                    try:
                        ms = triton.testing.do_bench_cudagraph(run, rep=50)
                    except Exception as e:  # noqa: BLE001 - a config that does not fit
                        print(f"  {cfg} x{splits} failed: {str(e)[:60]}")
                        continue
                    res.append((ms, cfg, splits))
            pa._decode_config = real
            default = real(D, cache_dt)
            def_ms = next(ms for ms, c, sp in res if c == default and sp == auto)
            for best_ms, best, best_splits in sorted(res)[:args.top]:
                print(f"batch {batch:3} ctx {ctx:6} {'fp8 ' if fp8 else 'bf16'}: best {best} "
                      f"x{best_splits} {best_ms * 1e3:7.1f} us "
                      f"({kv_bytes / best_ms / 1e6 / bw:4.0%} of copy) | default {default} "
                      f"x{auto} {def_ms * 1e3:7.1f} us ({kv_bytes / def_ms / 1e6 / bw:4.0%})")


if __name__ == "__main__":
    main()
