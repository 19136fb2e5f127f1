"""Random weights in a preset's shape, saved as a Hugging Face folder (safetensors, bfloat16 by
default): start-up with a real checkpoint's read, which the presets skip (they draw weights on
the device). Time it with `kestrel bench latency --model DIR` (no tokenizer: token-id prompts).

    python scripts/save_random_checkpoint.py llama-3-8b /tmp/ckpt-8b [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kestrel.loader.dummy import PRESETS, save_random_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("folder", type=Path)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = p.parse_args()
    t0 = time.perf_counter()
    save_random_checkpoint(ns.preset, ns.folder, dtype=getattr(torch, ns.dtype),
                           device=ns.device)
    size = sum(f.stat().st_size for f in ns.folder.glob("*.safetensors"))
    print(f"{ns.preset}: {size / 1e9:.2f} GB of safetensors in {ns.folder} "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
