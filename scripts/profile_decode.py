"""Where a decode (or prefill) step's time goes on the GPU: kernel time vs wall time per step.

    python scripts/profile_decode.py [--batch 1] [--input 128] [--steps 32] [--prefill]
        [--trace DIR] [--sequence FILE] [--cprofile]
        [any kestrel engine flags; default --preset llama-3-8b]

Runs one batch to steady decode, then profiles ``--steps`` engine steps with torch.profiler;
with ``--prefill``, profiles the prefill step of a fresh batch instead (after one warm-up batch
of the same shape; pass ``--max-num-batched-tokens`` >= batch × input for a single step).
Prints the wall time per step, the GPU kernel time per step (the sum of kernel durations: what
the step would take with no host gap), the idle share, and the top kernels. A wall time well
above the kernel time means the host is the limit, not the GPU. ``--sequence`` writes one
step's kernels in launch order, each with its mean duration and the idle time before it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli
from kestrel.engine.llm import LLM
from kestrel.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prefill", action="store_true",
                   help="profile the first step of a fresh batch (its prefill) instead")
    p.add_argument("--cprofile", action="store_true",
                   help="also time the same steps under cProfile: where the host's time goes")
    p.add_argument("--trace", default=None, help="write a chrome trace into this folder")
    p.add_argument("--phases", type=int, default=0, metavar="N",
                   help="with --prefill: also time N fresh prefill steps without the profiler, "
                        "split into host phases and the forward's GPU time (CUDA events)")
    p.add_argument("--head-start-ms", type=float, default=0.0, metavar="MS",
                   help="with --phases: hold the GPU this long (a sleep kernel) at each step's "
                        "start, so the host queues the forward ahead of it and 'forward (GPU)' "
                        "is the kernels' time without host gaps")
    p.add_argument("--rest", type=float, default=0.0, metavar="S",
                   help="with --phases: the device idles this long before each batch "
                        "(as `bench latency --rest`)")
    p.add_argument("--sequence", default=None,
                   help="write one step's kernels in launch order (mean duration and the GPU's "
                        "idle time before each, over the profiled steps) to this file")
    add_engine_cli_args(p)
    ns = p.parse_args()
    if ns.model is None and ns.preset is None:
        ns.preset = "llama-3-8b"
    llm = LLM(**vars(engine_args_from_cli(ns)))
    eng = llm.engine
    sync = torch.cuda.synchronize if eng.cfg.device.startswith("cuda") else (lambda: None)
    vocab = eng.cfg.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=ns.steps + 40, ignore_eos=True)

    def add_batch(tag: str) -> None:
        for i in range(ns.batch):
            seed = zlib.crc32(f"{tag}{i}".encode())  # a new tag: prompts the cache has not seen
            ids = torch.randint(1, vocab, (ns.input,), generator=torch.Generator().manual_seed(seed))
            eng.add_request(f"{tag}{i}", ids.tolist(), params)

    add_batch("warm")
    for _ in range(20):  # prefill, then decode until steady (graphs warm)
        eng.step()
    if ns.prefill:  # the warm batch has run one prefill of this shape; time a fresh one
        while eng.has_unfinished_requests():
            eng.step()
        add_batch("fresh")
        ns.steps = 1
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(ns.steps):
            with record_function("engine_step"):
                eng.step()
        sync()
        wall = (time.perf_counter() - t0) / ns.steps
    kernels: dict[str, float] = defaultdict(float)
    spans = []  # (start, end, name) of every GPU kernel or copy, µs
    for e in prof.events():
        # a kernel or copy on the GPU (not the GPU-side span of the step's record_function)
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "engine_step":
            kernels[e.name] += e.time_range.elapsed_us()
            spans.append((e.time_range.start, e.time_range.end, e.name))
    gpu = sum(kernels.values()) / ns.steps / 1e6  # µs → s
    phase = f"prefill of {ns.input} tokens" if ns.prefill else f"context ~{ns.input + 30}"
    print(f"batch {ns.batch}, {phase}, overlap {eng.overlap}: "
          f"wall {wall * 1e3:.3f} ms/step, GPU kernels {gpu * 1e3:.3f} ms/step, "
          f"GPU idle {100 * max(0.0, 1 - gpu / wall):.1f}%")
    print("top kernels (ms per step):")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:16 if ns.prefill else 12]:
        print(f"  {us / ns.steps / 1e3:8.3f}  {name[:100]}")
    print_gaps(prof, sorted(spans))
    if ns.sequence:
        write_sequence(Path(ns.sequence), sorted(spans), ns.steps)
    if ns.cprofile:
        host_profile(eng, add_batch if ns.prefill else None, ns.steps, sync)
    if ns.phases and ns.prefill:
        prefill_phases(eng, ns.batch, ns.input, ns.phases, sync, ns.head_start_ms,
                       ns.rest)
    if ns.trace:
        Path(ns.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(ns.trace) / f"{'prefill' if ns.prefill else 'decode'}"
                                                        "_trace.json"))
    while eng.has_unfinished_requests():
        eng.step()


def prefill_phases(eng, batch: int, input_len: int, n: int, sync,
                   head_start_ms: float = 0.0, rest_s: float = 0.0) -> None:
    """Where a prefill step's wall time goes, as ``bench latency`` counts it (from the first
    step() call to the landed token), over ``n`` fresh batches, median ms: the scheduler, input
    preparation, the forward's launch on the host, the GPU's idle time before the forward's
    first kernel and its own time (events), and the rest (sampling, the wait, landing).
    ``head_start_ms``: a sleep kernel first, about that long, so the GPU's forward
    time excludes the host's launch gaps (the wall time then includes the sleep); ``rest_s``:
    the host sleeps that long before each batch, so each starts with the GPU rested."""
    import statistics

    runner = eng.executor.runner
    t: dict[str, float] = defaultdict(float)
    ev: dict[str, torch.cuda.Event] = {}

    def wrap(obj, name: str, key: str, events: bool = False) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            if events:
                ev[key + "0"] = torch.cuda.Event(enable_timing=True)
                ev[key + "0"].record()
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            t[key] += time.perf_counter() - t0
            if events:
                ev[key + "1"] = torch.cuda.Event(enable_timing=True)
                ev[key + "1"].record()
            return r
        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(runner, "prepare", "prepare")
    wrap(runner.model, "forward", "forward", events=True)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rows: dict[str, list[float]] = defaultdict(list)
    vocab = eng.cfg.model_config.vocab_size
    for i in range(n):
        while eng.has_unfinished_requests():
            eng.step()
        for j in range(batch):
            ids = torch.randint(1, vocab, (input_len,), generator=torch.Generator().manual_seed(
                zlib.crc32(f"phase{i}.{j}".encode())))
            eng.add_request(f"phase{i}.{j}", ids.tolist(), params)
        sync()
        time.sleep(rest_s)
        t.clear()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if head_start_ms:  # cycles at ~2 GHz: only "longer than the host's launches" matters
            torch.cuda._sleep(int(head_start_ms * 2e6))
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        wall = time.perf_counter() - t0
        sync()
        gpu = ev["forward0"].elapsed_time(ev["forward1"]) / 1e3
        lead = start.elapsed_time(ev["forward0"]) / 1e3  # GPU idle (or busy) before the forward
        for k, v in [("wall", wall), ("schedule", t["schedule"]), ("prepare", t["prepare"]),
                     ("forward launch (host)", t["forward"]), ("GPU before forward", lead),
                     ("forward (GPU)", gpu), ("rest", wall - lead - gpu)]:
            rows[k].append(v * 1e3)
    print(f"prefill step phases, {n} fresh batches of {batch} x {input_len}, median ms"
          f"{f', GPU held {head_start_ms} ms first' if head_start_ms else ''}"
          f"{f', {rest_s} s of rest before each' if rest_s else ''}:")
    for k, v in rows.items():
        print(f"  {k:24} {statistics.median(v):9.3f}   (min {min(v):.3f}, max {max(v):.3f})")


def host_profile(eng, add_batch, steps: int, sync) -> None:
    """The same steps again (a fresh batch first when profiling a prefill) under cProfile."""
    import cProfile
    import pstats

    if add_batch is not None:
        while eng.has_unfinished_requests():
            eng.step()
        add_batch("host")
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        eng.step()
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def write_sequence(path: Path, spans: list[tuple[float, float, str]], steps: int) -> None:
    """Kernel i of every step (steps replay one graph, so position i is the same kernel each
    time): its mean duration and the mean idle time before it, in launch order."""
    per_step = len(spans) // steps
    if per_step * steps != len(spans):
        path.write_text(f"{len(spans)} kernels over {steps} steps: steps differ, no sequence\n")
        return
    lines = ["pos  dur_us  gap_us  kernel"]
    for i in range(per_step):
        runs = [spans[s * per_step + i] for s in range(steps)]
        dur = sum(b - a for a, b, _ in runs) / steps
        gaps = [a - spans[s * per_step + i - 1][1] for s, (a, _, _) in enumerate(runs)
                if s * per_step + i > 0 and i > 0]
        gap = sum(gaps) / len(gaps) if gaps else 0.0
        lines.append(f"{i:4d} {dur:7.2f} {gap:7.2f}  {runs[0][2][:90]}")
    path.write_text("\n".join(lines) + "\n")


def print_gaps(prof, spans: list[tuple[float, float, str]]) -> None:
    """Where the GPU waits: from the first step's start to its first kernel, and the widest
    gaps between consecutive kernels (a host sync or slow launches show up here)."""
    steps = [e for e in prof.events() if e.name == "engine_step"]
    if not spans or not steps:
        return
    lead = spans[0][0] - min(e.time_range.start for e in steps)
    gaps = sorted(((b[0] - a[1], a[2], b[2]) for a, b in itertools.pairwise(spans)),
                  reverse=True)
    total = sum(g for g, _, _ in gaps if g > 0)
    print(f"GPU waits: {lead / 1e3:.3f} ms from the step's start to its first kernel, "
          f"{total / 1e3:.3f} ms between kernels; widest gaps (µs, after → before):")
    for g, a, b in gaps[:6]:
        print(f"  {g:8.1f}  {a[:45]} → {b[:45]}")


if __name__ == "__main__":
    main()
