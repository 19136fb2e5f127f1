"""Where a speculative (or plain) engine step's time goes: scheduling (with the proposer), the
forward (synchronised, so its GPU time), and landing the tokens (verification), per step; and
how many steps ran in a CUDA graph.

    python scripts/profile_spec.py [--requests 64] [--preset smollm2-135m] [--ngram]
        [--output-len 128]

Random weights: each prompt is a random 100-token block repeated five times, so prompt lookup
finds guesses (and a random model's greedy output often repeats, so many are kept). Timing
wraps the engine's own methods; the forward's synchronisation removes the overlap of plain
steps, so compare the parts, not the totals, with `kestrel bench throughput`.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from kestrel import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--ngram", action="store_true", help="prompt lookup, K = 4")
    ap.add_argument("--output-len", type=int, default=128)
    a = ap.parse_args()
    spec = {"speculative_method": "ngram", "num_speculative_tokens": 4} if a.ngram else {}
    llm = LLM(a.preset, load_format="dummy", dtype="bfloat16", max_num_seqs=a.requests, **spec)
    engine, runner = llm.engine, llm.engine.executor.runner
    seconds, counts = collections.defaultdict(float), collections.Counter()

    def timed(obj, name: str, sync: bool = False) -> None:
        inner = getattr(obj, name)

        def wrapper(*args, **kwargs):
            if sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            counts[name] += 1
            return out

        setattr(obj, name, wrapper)

    use_graph = runner.use_graph

    def counted_use_graph(batch):
        graph = use_graph(batch)
        counts["graph steps" if graph else "eager steps"] += 1
        return graph

    runner.use_graph = counted_use_graph
    timed(engine.scheduler, "schedule")
    timed(engine.executor, "execute", sync=True)
    timed(engine, "_update", sync=True)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.cfg.model_config.vocab_size
    blocks = torch.randint(min(100, vocab // 2), vocab, (a.requests, 100), generator=gen)
    prompts = [{"prompt_token_ids": b.repeat(5).tolist()} for b in blocks]
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up: kernels compiled, caches filled
    seconds.clear()
    counts.clear()
    drafted0, kept0 = engine.stats.num_draft_tokens, engine.stats.num_accepted_tokens
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    steps = counts["execute"]
    print(f"{a.requests} requests, {'ngram' if a.ngram else 'plain'}: {wall * 1e3:.1f} ms, "
          f"{steps} steps, {a.requests * a.output_len / wall:.0f} output tokens/s")
    for name, label in (("schedule", "schedule"), ("execute", "forward"), ("_update", "land")):
        print(f"  {label:9s} {seconds[name] * 1e3:8.1f} ms  "
              f"({seconds[name] / max(counts[name], 1) * 1e3:.3f} ms a step)")
    print(f"  graph steps {counts['graph steps']}, eager {counts['eager steps']}; guesses "
          f"{engine.stats.num_draft_tokens - drafted0}, kept "
          f"{engine.stats.num_accepted_tokens - kept0}")


if __name__ == "__main__":
    main()
