"""Registers and spills of the decode-attention kernel's variants for an H100/H200 (sm_90),
compiled offline: no GPU needed, so a kernel change can be checked for register pressure (which
sets how many programs an SM holds) before spending device time.

    python scripts/decode_registers.py [--triton-path DIR]

Launches at llama-3-8b heads (32/8, d 128, 16-token pages, 64 splits) are recorded under the
interpreter (tests/kernels/test_compile_sm90.py's recorder, with its CUDA settings), then each
is compiled in a fresh process as Triton would on the GPU: pointers and integers that are
multiples of 16 marked divisible by 16 (unless the kernel says not to specialize them).
``--triton-path``: a folder holding the device's Triton (e.g. ``pip install --no-deps --target
/tmp/t36 triton==3.6.0``), whose register counts match the GPU's (3.6's 96 / 232 here matched
the H200's 96 / 229–234; this machine's newer Triton gave 167 / 228).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from _pytest.monkeypatch import MonkeyPatch  # noqa: E402

from kestrel.attention.base import quantize_kv  # noqa: E402
from kestrel.kernels import paged_attention, rotary  # noqa: E402
from tests.kernels.test_compile_sm90 import _record, _spec  # noqa: E402

COMPILE = """
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kestrel.kernels.paged_attention import _decode_kernel
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
for job in json.loads(sys.stdin.read()):
    src = ASTSource(_decode_kernel, job["sig"], {tuple(k): v for k, v in job["consts"]},
                    {tuple(k): v for k, v in job["attrs"]})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["opts"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"]); f.flush()
        use = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    print(job["name"], triton.__version__, " ".join(
        w for line in use.splitlines() if "REG:" in line for w in line.split()[:3]))
"""


def launches() -> list[dict]:
    """One compile job per (cache dtype, new token fused or not) at llama-3-8b heads."""
    recorded = _record(MonkeyPatch())
    hq, hkv, d, page, ctx = 32, 8, 128, 16, 5000
    pages = -(-ctx // page)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, d, generator=g).to(torch.bfloat16)
    kc = torch.randn(pages, page, hkv, d, generator=g).to(torch.bfloat16)
    new = rotary.NewTokens(torch.randn(1, hkv, d, generator=g).to(torch.bfloat16),
                           torch.randn(1, hkv, d, generator=g).to(torch.bfloat16),
                           torch.tensor([ctx - 1]), torch.randn(ctx, d, generator=g),
                           torch.tensor([ctx - 1]))
    tables = torch.arange(pages, dtype=torch.int32)[None]
    lens = torch.tensor([ctx], dtype=torch.int32)
    names = []
    for cache in ("bf16", "fp8"):
        scale = torch.full((hkv,), 0.05)
        k, v = (kc, kc.clone()) if cache == "bf16" else (quantize_kv(kc, scale),) * 2
        sc = {} if cache == "bf16" else {"k_scale": scale, "v_scale": scale}
        for fused in (False, True):
            paged_attention.paged_attention_decode(q, k, v, tables, lens, 0.1, num_splits=64,
                                                   max_seq_len=ctx, new=new if fused else None,
                                                   **sc)
            names.append(f"{cache} cache, new token {'fused' if fused else 'apart'}:")
    jobs = []
    decode = [launch for launch in recorded if launch[0].__name__ == "_decode_kernel"]
    for name, (fn, args, kwargs) in zip(names, decode, strict=True):
        sig, consts, opts = _spec(fn, args, kwargs)
        params = triton.JITFunction(fn).params
        attrs = {(i,): [["tt.divisibility", 16]] for i, (p, a) in enumerate(zip(params, args))
                 if sig[p.name].startswith("*") or (
                     sig[p.name] in ("i32", "i64") and not p.do_not_specialize
                     and isinstance(a, int) and a and a % 16 == 0)}
        jobs.append({"name": name, "sig": sig, "opts": opts,
                     "consts": [[list(k), v] for k, v in consts.items()],
                     "attrs": [[list(k), v] for k, v in attrs.items()]})
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-path", default="", help="folder holding the Triton to compile with")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.triton_path, str(REPO)) if p)
    # cwd outside the repo: `python -c` puts the cwd first on sys.path
    subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches()), env=env,
                   text=True, check=True, cwd="/")


if __name__ == "__main__":
    main()
