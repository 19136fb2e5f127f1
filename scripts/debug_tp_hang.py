"""Diagnose a TP=2 hang on two GPUs: run a tiny TP=2 engine with and without overlapped steps;
if a run stalls, print every rank's Python stack (SIGUSR1) and stop it.

    python scripts/debug_tp_hang.py
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(overlap: bool) -> None:
    from kestrel import LLM, SamplingParams

    llm = LLM("tiny-llama", load_format="dummy", device="cuda", tensor_parallel_size=2,
              async_scheduling=overlap, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": list(range(1, 10 + i))} for i in range(3)], params)
    print(f"overlap={overlap}: ok in {time.perf_counter() - t:.2f}s, "
          f"{[len(o.outputs[0].token_ids) for o in outs]}", flush=True)
    llm.engine.executor.shutdown()


def main() -> None:
    for overlap in (False, True):
        p = mp.get_context("spawn").Process(target=_child, args=(overlap,))
        p.start()
        p.join(60)
        if p.is_alive():
            print(f"overlap={overlap}: STALLED, stacks:", flush=True)
            os.system(f"pkill -USR1 -P {p.pid}; kill -USR1 {p.pid}")
            time.sleep(3)
            os.system(f"pkill -9 -P {p.pid}; kill -9 {p.pid}")
            p.join(5)


def _child(overlap: bool) -> None:
    faulthandler.register(signal.SIGUSR1)
    run(overlap)


if __name__ == "__main__":
    main()
