"""Programmatic dependent launch (PDL) between the Triton kernels of a step, on Hopper.

A batch-1 decode step of an 8B model is a CUDA graph of ~350 kernels, most of them a few µs;
between two plain launches the GPU drains one grid completely before it starts scheduling the
next. Launched with PDL (CUDA's programmatic stream serialization, which graphs capture as a
programmatic edge), a kernel's programs may be scheduled while its predecessor still runs.
Every kernel launched with ``pdl_args`` starts with ``pdl_enter``: it waits there
(``griddepcontrol.wait``) until the preceding grid has completed and its writes are visible,
before touching memory, so the order of effects is that of plain launches; then it lets its own
dependents be scheduled (``griddepcontrol.launch_dependents``) once all its programs have
started. Kernels launched without PDL (torch's, NCCL's) wait for their predecessor as usual.

``KESTREL_PDL=0`` turns it off (to measure it); it is off before Hopper, under Triton's
interpreter, and with a Triton that lacks grid dependency control.
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
    """A PDL kernel's first statement: wait for the grid before it, then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _enabled(index: int | None) -> bool:
    if gdc_wait is None or os.environ.get("KESTREL_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_args(device: torch.device) -> dict[str, bool]:
    """Launch arguments of a kernel whose first statement is ``pdl_enter(PDL)``."""
    if device.type == "cuda" and _enabled(device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
