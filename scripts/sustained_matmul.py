"""Does the GPU hold its matmul rate under sustained load? (`bench roofline` keeps the best
single call, a burst after a sync.)

    python scripts/sustained_matmul.py [--n 8192] [--seconds 2] [--window-ms 10] [--kind bfloat16]

After --idle seconds of rest, back-to-back n×n×n products (no sync between them) for
--seconds, an event every ~--window-ms: prints the rate of each window in the first 200 ms,
then one line per 200 ms, against the roofline's best-call rate measured first. Run
``nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv -lms 50`` beside it to see clocks.
"""

from __future__ import annotations

import argparse
import time

import torch

from kestrel.bench.roofline import matmul_call, matmul_rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--kind", default="bfloat16", choices=["bfloat16", "fp8_rowwise"])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--idle", type=float, default=1.0, help="seconds of rest before the run")
    ns = p.parse_args()
    dev = torch.device("cuda")
    flop = 2.0 * ns.n ** 3
    burst = matmul_rate(ns.kind, ns.n, dev, iters=3, min_seconds=0.25)
    print(f"{torch.cuda.get_device_name()}: {ns.kind} n={ns.n}, best single call (roofline) "
          f"{burst / 1e12:.1f} TFLOP/s")
    fn = matmul_call(ns.kind, ns.n, dev)
    fn()
    torch.cuda.synchronize()
    per_call = flop / burst
    calls = max(1, round(ns.window_ms / 1e3 / per_call))
    windows = max(1, round(ns.seconds / (calls * per_call)))
    events = [torch.cuda.Event(enable_timing=True) for _ in range(windows + 1)]
    time.sleep(ns.idle)
    events[0].record()
    for w in range(windows):
        for _ in range(calls):
            fn()
        events[w + 1].record()
    torch.cuda.synchronize()
    t, rows, group = 0.0, [], []
    for w in range(windows):
        ms = events[w].elapsed_time(events[w + 1])
        rate = calls * flop / (ms / 1e3)
        t += ms
        if t <= 200:
            rows.append((t, rate))
        else:
            group.append((t, rate))
            if group[-1][0] - group[0][0] >= 200 or w == windows - 1:
                rows.append((t, sum(r for _, r in group) / len(group)))
                group = []
    for t, rate in rows:
        print(f"  until {t:8.1f} ms  {rate / 1e12:7.1f} TFLOP/s  {rate / burst:6.1%} of the burst")
    total = events[0].elapsed_time(events[-1]) / 1e3
    print(f"whole run {total * 1e3:.0f} ms: {windows * calls * flop / total / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
