"""Skinny-GEMV configs compared inside the engine: batch-1 decode TPOT with the tuned tables
as they are ("base") and with each candidate entry swapped in, alternating, in fresh processes.

A sweep times a GEMV after another GEMV (or, with ``--after-norm``, after a norm kernel); in a
decode step each follows a small kernel under PDL, and the eleventh session's TP=1 qkv winner
(12.88 vs 13.78 µs alone) made the step slower, as did the twenty-second session's qkv and
o_proj winners. So a candidate enters skinny_config's tables only if this says so.

    python scripts/ab_skinny_configs.py --candidate 'qkv=16:6144x4096:8,256,1,8,1,ef,bx' \
        [--candidate ...] [--rounds 2] [--quantization fp8] [--engine-args '--fp8-attention']
        # one GPU, TP=1

A candidate is NAME=ENTRY[+ENTRY...] (entries swapped in together), each ENTRY
TABLE:NxK:block_n,block_k,split_k,num_warps,num_stages[,FLAG...] with TABLE 16 (TUNED_16BIT)
or 8 (TUNED, fp8 weights), keyed for this GPU's model, and FLAGs of SkinnyConfig: ef
(evict_first), bx (broadcast_x), pf (prefetch), dot (use_dot), a2 / a4 (ahead).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import sys
from kestrel.kernels import skinny_config as s
for table, n, k, v, flags in {entries!r}:
    key = (s.gpu_model("cuda", 0), 1, n, k)
    getattr(s, table)[key] = s.SkinnyConfig(
        *v[:3], num_warps=v[3], num_stages=v[4], evict_first="ef" in flags,
        broadcast_x="bx" in flags, prefetch="pf" in flags, use_dot="dot" in flags,
        ahead=next((int(f[1:]) for f in flags if f[0] == "a"), 1))
from kestrel.cli import main
sys.exit(main({argv!r}))
"""


def parse(spec: str) -> tuple[str, list[tuple]]:
    name, rest = spec.split("=", 1)
    entries = []
    for entry in rest.split("+"):
        table, shape, cfg = entry.split(":")
        n, k = map(int, shape.split("x"))
        parts = cfg.split(",")
        entries.append(({"16": "TUNED_16BIT", "8": "TUNED"}[table], n, k,
                        tuple(int(p) for p in parts[:5]), tuple(parts[5:])))
    return name, entries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidate", action="append", default=[], type=parse)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--engine-args", default="",
                    help="more engine flags, e.g. '--fp8-attention --no-fp8-skip-layers'")
    args = ap.parse_args()
    runs = [("base", [])] + args.candidate
    tpot: dict[str, list[float]] = {name: [] for name, _ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, entries in runs:
                out = f"{tmp}/{name}_{r}.json"
                argv = ["--log-level", "WARNING", "bench", "latency", "--preset", "llama-3-8b",
                        "--batch", "1", "--input", "128", "--output", "256", "--max-num-seqs",
                        "1", "--no-roofline", "--json", out]
                if args.quantization:
                    argv += ["--quantization", args.quantization]
                argv += shlex.split(args.engine_args)
                subprocess.run([sys.executable, "-c", RUN.format(entries=entries, argv=argv)],
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                tpot[name].append(json.loads(Path(out).read_text())["tpot_s"] * 1e3)
                print(f"round {r} {name:>12}: {tpot[name][-1]:.4f} ms", flush=True)
    base = min(tpot["base"])
    for name, ms in tpot.items():
        print(f"{name:>12}: best {min(ms):.4f} ms ({100 * (min(ms) / base - 1):+.2f}%), "
              f"all {', '.join(f'{m:.4f}' for m in ms)}")


if __name__ == "__main__":
    main()
