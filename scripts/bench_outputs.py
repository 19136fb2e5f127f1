"""Host time the engine spends building streamed outputs, per step, for many long streams.

    python scripts/bench_outputs.py [--streams 256] [--tokens 1000] [--kind delta|cumulative]

Adds ``--streams`` requests to the default model's engine on CPU (no forward pass runs), then
appends one token to every stream per step, as a decode step does, and times
``RequestGroup.output()`` for all of them: the work the engine thread does per step for the
server's streams (the step's outputs stay alive until the next, so the garbage collector sees
them as it does in the server). Prints the mean per step up to 100, 500 and ``--tokens`` tokens.
"""

from __future__ import annotations

import argparse
import gc
import random
import time

from kestrel.engine.llm import LLM
from kestrel.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--kind", choices=["delta", "cumulative"], default="delta")
    ns = p.parse_args()
    engine = LLM().engine
    params = SamplingParams(max_tokens=ns.tokens + 1, ignore_eos=True, output_kind=ns.kind)
    for i in range(ns.streams):
        engine.add_request(f"s{i}", [1, 2, 3, 4], params)
    groups = list(engine.groups.values())
    gc.collect()
    gc.freeze()  # as `kestrel serve` runs (engine.heap_frozen)
    rng, now, n = random.Random(0), time.monotonic(), 0
    for target in sorted({min(100, ns.tokens), min(500, ns.tokens), ns.tokens}):
        spent, steps = 0.0, 0
        while n < target:
            for g in groups:
                g.append_token(g.samples[0], rng.randrange(100, 20000), None, now)
            n += 1
            t0 = time.perf_counter()
            _held = [g.output() for g in groups]  # alive until the next step, as in the server
            spent += time.perf_counter() - t0
            steps += 1
        print(f"{ns.kind}, {ns.streams} streams, steps up to {target} tokens: "
              f"{spent / steps * 1e3:.2f} ms of output() per step")


if __name__ == "__main__":
    main()
