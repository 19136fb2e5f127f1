"""Programmatic dependent launch (PDL) in the decode step, so a GEMV's weights start streaming
while the small kernel before it still runs.

At batch 1 a decode step is a CUDA graph of ~350 kernels: GEMVs that stream weights at the copy
rate once they are going, and between them kernels of 1–5 µs (norms, rotary + cache write,
attention, SwiGLU) during which HBM idles, plus each GEMV's own ramp-up before its first bytes
arrive. Under PDL (CUDA's programmatic stream serialization, captured by graphs as a
programmatic edge) a kernel's programs may be scheduled before its predecessor finishes.

The protocol, in every kernel launched with ``pdl_args``:
  small kernels (``pdl_enter``): ``griddepcontrol.wait`` first (the preceding grid has completed
      and its writes are visible), then ``launch_dependents``: the next kernel may be scheduled.
  the skinny GEMV: ``launch_dependents``, then loads its first weight tile, then waits, then
      reads x. Weights are never written during a step, so loading them early cannot race; x
      and every store come after the wait. gate_up with the SwiGLU folded in, whose next
      kernel is down's GEMV, releases after its loop instead: released at the start, down's
      programs were scheduled at once and streamed their first tiles under gate_up's (decode
      4.05 ms against 3.98 with the SwiGLU kernel between them); released late, they come
      in during gate_up's tail (3.949 against 3.963, eleventh session).
  decode attention: loads its first K/V tile (with the lengths and block tables, written
      before the step's graph starts; the cache of past tokens, written by earlier steps),
      then waits, then releases, then reads q. The TP all-reduce + RMSNorm likewise reads
      its own call count before it waits.
A kernel past its wait knows its predecessor completed, which had passed its own wait, so all
earlier kernels are complete too: effects happen in launch order, as without PDL. At most the
one GEMV after a running small kernel (or after a GEMV's loop) is prefetching: small kernels
release their dependents only after their wait. Kernels launched without PDL (torch's, NCCL's) wait as usual.

``KESTREL_PDL=0`` turns it off (to measure it); it is off before Hopper, under Triton's
interpreter, and with a Triton without grid dependency control.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A small kernel's first statement: wait for its predecessor, then release the next one."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel be scheduled now (a GEMV's first statement)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the preceding kernel has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@functools.cache
def _enabled(index: int | None) -> bool:
    if gdc_wait is None or os.environ.get("KESTREL_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device: torch.device) -> dict[str, bool]:
    """Launch arguments of a kernel that follows the protocol above through its PDL constexpr."""
    if device.type == "cuda" and _enabled(device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
