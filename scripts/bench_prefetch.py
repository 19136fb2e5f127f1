"""Does prefetching the next weight into L2 during a decode step's small kernels pay? (CUDA)

    python scripts/bench_prefetch.py [--tp 1] [--layers 32] [--mb 0 4 8 16 32]

A CUDA graph of ``--layers`` llama-3-8b layers' GEMVs at batch 1 (one rank's shapes at --tp,
every layer its own weights, as the engine runs them: ``dense_linear``), with a spin kernel
standing in for the small kernels between them (µs after qkv, o_proj, gate_up, down:
``--gaps``, defaults from the H200 decode profile; at TP=2 the all-reduces add to two of them).
Each variant of ``kestrel.kernels.prefetch`` at each size is timed as graph replays against
no prefetch, and its output checked bitwise against it. Prints µs per step and the saving.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.kernels.prefetch import VARIANTS, WeightPrefetcher  # noqa: E402
from kestrel.layers.linear import dense_linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mb", type=float, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--gaps", type=float, nargs=4, default=None,
                    help="µs of small kernels after qkv, o_proj, gate_up, down")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    tp, dev = args.tp, torch.device("cuda")
    gaps = args.gaps or ([7.0, 2.0, 1.5, 2.0] if tp == 1 else [6.0, 8.0, 1.5, 8.0])
    h, inter, q, kv = 4096, 14336, 4096, 1024
    shapes = [((q + 2 * kv) // tp, h), (h, q // tp), (2 * inter // tp, h), (h, inter // tp)]
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
                for n, k in shapes] for _ in range(args.layers)]
    xs = {k: torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=gen)
          for _, k in shapes}
    cycles = [int(g * 1980) for g in gaps]  # SM clock ~1.98 GHz on H100/H200

    def step(pf: WeightPrefetcher | None) -> torch.Tensor:
        flat = [w for layer in weights for w in layer]
        outs = []
        for i, w in enumerate(flat):
            outs.append(dense_linear(xs[w.shape[1]], w))
            if pf is not None and i + 1 < len(flat):
                pf.fetch(flat[i + 1], 1)
            torch.cuda._sleep(cycles[i % 4])
        if pf is not None:
            pf.join()
        return torch.cat(outs, dim=1)

    def timed(pf: WeightPrefetcher | None) -> tuple[float, torch.Tensor]:
        step(pf)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step(pf)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(args.reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / args.reps, out.clone()

    base_us, base_out = timed(None)
    wbytes = sum(w.numel() * 2 for w in weights[0]) * args.layers
    print(f"{torch.cuda.get_device_name()}, TP={tp} shapes, {args.layers} layers, gaps {gaps} "
          f"µs: no prefetch {base_us:.1f} µs per step ({wbytes / base_us / 1e3:.0f} GB/s)")
    print(f"{'variant':>10} {'MB':>5} {'µs/step':>9} {'saving':>8} same")
    for variant in VARIANTS:
        for mb in args.mb:
            us, out = timed(WeightPrefetcher(dev, int(mb * 2**20), variant))
            same = bool(torch.equal(out, base_out))
            print(f"{variant:>10} {mb:>5g} {us:>9.1f} {100 * (1 - us / base_us):>7.1f}% {same}")


if __name__ == "__main__":
    main()
