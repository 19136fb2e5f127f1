"""Which Triton kernel variants compile while requests wait, not at start-up.

Triton compiles a kernel once per specialization (constexprs, 16-byte pointer alignment,
integer arguments equal to 1 or divisible by 16); a variant first met inside a run stalls the
step that meets it (fourteenth session: TTFT medians doubled). This builds the engine, notes
every compiled variant of every kernel in kestrel.kernels, runs a throughput workload, and
prints the variants the run added, with their specialization keys.

    python scripts/compile_variants.py --preset llama-3-8b [--workload llama3-paper]
        [--num-prompts 64] [engine arguments as for `kestrel bench throughput` ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kestrel.kernels  # noqa: E402
from kestrel.bench.throughput import bench_throughput, build_requests, warm_up  # noqa: E402
from kestrel.bench.workloads import get_workload  # noqa: E402
from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli  # noqa: E402
from kestrel.engine.llm import LLM  # noqa: E402


def kernels() -> dict[str, triton.runtime.JITFunction]:
    found = {}
    for info in pkgutil.iter_modules(kestrel.kernels.__path__):
        mod = importlib.import_module(f"kestrel.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.JITFunction):
                found[f"{info.name}.{name}"] = obj
    return found


def variants() -> dict[str, set]:
    """Compiled variants' keys per kernel (the cache layout is Triton's own: its first item
    maps keys to compiled kernels in 3.6 and 3.9)."""
    return {name: {str(key) for cache in fn.device_caches.values() for key in cache[0]}
            for name, fn in kernels().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="llama3-paper")
    ap.add_argument("--num-prompts", type=int, default=None)
    add_engine_cli_args(ap)
    ns = ap.parse_args()
    llm = LLM(**vars(engine_args_from_cli(ns)))
    wl = get_workload(ns.workload).with_overrides(ns.num_prompts)
    reqs = build_requests(llm, wl)
    warm_up(llm, reqs)  # as `bench throughput` does
    before = variants()
    res = bench_throughput(llm, reqs, warmup=False)
    after = variants()
    print(f"{ns.workload}: {res['output_throughput']:.0f} output tok/s, TTFT median "
          f"{res['ttft_ms']['median']:.0f} ms; compiled variants at start-up "
          f"{sum(map(len, before.values()))}, after the run {sum(map(len, after.values()))}")
    for name, keys in after.items():
        for key in sorted(keys - before[name]):
            print(f"compiled during the run: {name}: {key[:600]}")
            for old in sorted(before[name]):
                print(f"    at start-up: {old[:600]}")


if __name__ == "__main__":
    main()
