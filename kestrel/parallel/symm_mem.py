"""One-shot all-reduce through NVLink peer memory, for the small all-reduces of decode.

A tensor-parallel decode step does two all-reduces per layer of one hidden row per sequence
(8 KB at batch 1 for an 8B model). NCCL's ring/tree all-reduce costs ~10–15 µs each at that
size, 64 per step: a third of a TP=2 step. PyTorch's symmetric memory maps each rank's buffer
into its peers' address space; its one-shot kernel copies the input into the local buffer,
meets the peers at a device-side barrier, and sums every rank's buffer directly (vLLM's
"custom all-reduce" idea, on torch's kernel). It runs inside CUDA graphs and needs no NVLink
multicast (which the device machines keep off), so it is used for inputs up to ``MAX_BYTES``
of the model dtype; everything else goes to NCCL.

The same buffers serve ``rms_norm``: the all-reduce fused with the residual add and RMSNorm
that follow it (kernels/allreduce_norm.py; the model hands the sum to the norm, see
LlamaForCausalLM._sum_in_norms), on signal slots of its own at the top of torch's signal pads.

It is an optimisation, never a requirement: if symmetric memory is missing, fails to set up,
or gives a wrong sum in the start-up self-check, the job logs why and stays on NCCL (and the
fused kernel, checked likewise against the two-kernel path, falls back to it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # one-shot reads every peer's whole input: best for small tensors
NORM_BYTES = 8 << 20  # the fused all-reduce + RMSNorm's region, after torch's MAX_BYTES
NORM_PROGRAMS = 16  # programs of the fused all-reduce + RMSNorm, each one signal slot


class SymmMemAllReduce:
    """Sums small tensors of one dtype over a TP group through a rendezvoused peer buffer."""

    def __init__(self, group: Any, device: torch.device, dtype: torch.dtype) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.dtype = dtype
        self.buffer = symm_mem.empty((MAX_BYTES + NORM_BYTES) // dtype.itemsize, dtype=dtype,
                                     device=device)
        # the fused kernel's region starts zeroed: no word carries a call's flag before it
        self.buffer[MAX_BYTES // dtype.itemsize:].zero_()
        handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self._copy_in = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy")
        # For the fused all-reduce + RMSNorm kernel: every rank's buffer (its region starts
        # past torch's) and signal pad, and signal slots at the top of the pad (torch's
        # kernels use the bottom: block · W + rank).
        self.rank, self.world = handle.rank, handle.world_size
        self.buf_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.sig_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        self.slot_base = handle.signal_pad_size // 4 - NORM_PROGRAMS
        self.fused_norm = False  # set by try_symm_mem_all_reduce once its self-check passed

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()  # the kernel moves 4-byte words at least
        return x.dtype == self.dtype and nbytes <= MAX_BYTES and nbytes % 4 == 0 \
            and x.is_contiguous()

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Can ``rms_norm`` take this (rows, each rank's copy in every buffer, fit)?"""
        return (self.fused_norm and residual is not None and x.dim() == 2
                and x.dtype == self.dtype and residual.dtype == self.dtype
                and x.shape[1] * x.element_size() % 4 == 0
                and x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
                and x.shape[0] <= self._max_rows(x.shape[1]))

    def _max_rows(self, hidden: int) -> int:
        """Rows of the fused kernel: its region holds two halves of W slots of rows, 8-byte
        words of 4 bytes of payload each."""
        return NORM_BYTES // (2 * self.world * hidden * self.dtype.itemsize * 2)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(sum over ranks of x, residual) in one kernel (kernels/allreduce_norm.py)."""
        from kestrel.kernels.allreduce_norm import allreduce_rms_norm

        return allreduce_rms_norm(x, residual, weight, eps, self.buf_ptrs, self.sig_ptrs,
                                  self.rank, self.world, MAX_BYTES // 8,
                                  self._max_rows(x.shape[1]), self.slot_base, NORM_PROGRAMS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """sum over ranks of ``x`` (a new tensor; ``x`` is left as it was)."""
        n = x.numel()
        if self._copy_in:  # copy into the buffer inside the kernel: one launch
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(
                self.buffer[:n], x.view(-1), "sum", self.group_name)
        else:
            self.buffer[:n].copy_(x.view(-1))
            out = torch.ops.symm_mem.one_shot_all_reduce(self.buffer[:n], "sum", self.group_name)
        return out.view(x.shape)


def _self_check(ar: SymmMemAllReduce, rank: int, size: int, device: torch.device) -> str | None:
    """None when repeated sums of rank-dependent data match; else what went wrong."""
    for n in (4 // ar.dtype.itemsize or 1, 4096, MAX_BYTES // ar.dtype.itemsize):
        for rep in range(3):
            x = torch.full((n,), float(rank + 1 + rep), dtype=ar.dtype, device=device)
            want = float(sum(r + 1 + rep for r in range(size)))
            got = ar(x)
            if not bool((got == want).all()):
                return f"wrong sum for {n} elements (got {got.flatten()[0].item()}, want {want})"
    return None


def _norm_self_check(ar: SymmMemAllReduce, rank: int, device: torch.device) -> str | None:
    """None when the fused all-reduce + RMSNorm gives the bits of the one-shot all-reduce
    followed by the RMSNorm kernel (several row counts, back to back); else what differs."""
    from kestrel.kernels.fused import rms_norm

    gen = torch.Generator(device=device).manual_seed(17 + rank)
    hidden = 4096
    weight = torch.randn(hidden, generator=gen, device=device).to(ar.dtype)
    for rows in (1, 5, min(64, ar._max_rows(hidden))):
        for _ in range(3):
            x = torch.randn(rows, hidden, generator=gen, device=device).to(ar.dtype)
            res = torch.randn(rows, hidden, generator=gen, device=device).to(ar.dtype)
            want = rms_norm(ar(x), weight, 1e-5, res)
            got = ar.rms_norm(x, weight, 1e-5, res)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                return f"fused all-reduce + RMSNorm differs at {rows} rows"
    return None


def try_symm_mem_all_reduce(group: Any, rank: int, size: int, device: torch.device,
                            dtype: torch.dtype) -> SymmMemAllReduce | None:
    """The one-shot all-reduce for this TP group, or None (logged) where it cannot be used."""
    if device.type != "cuda" or size < 2:
        return None
    try:
        ar = SymmMemAllReduce(group, device, dtype)
        problem = _self_check(ar, rank, size, device)
    except Exception as e:  # noqa: BLE001 - a missing op, no P2P access, a failed rendezvous
        problem = f"{type(e).__name__}: {e}"
    # every rank must take the same decision, or the next all-reduce pairs NCCL with symm mem
    ok = torch.tensor([0 if problem else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if problem or not int(ok.item()):
        log.warning("TP all-reduce stays on NCCL: symmetric-memory one-shot unavailable (%s)",
                    problem or "another rank failed its check")
        return None
    log.info("TP all-reduce: symmetric-memory one-shot up to %d KiB, NCCL above",
             MAX_BYTES // 1024)
    try:
        ar.fused_norm = True
        problem = _norm_self_check(ar, rank, device)
    except Exception as e:  # noqa: BLE001 - a Triton without the needed ops, a compile error
        problem = f"{type(e).__name__}: {e}"
    ok = torch.tensor([0 if problem else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    ar.fused_norm = not problem and bool(ok.item())
    if not ar.fused_norm:
        log.warning("TP all-reduce + RMSNorm stay two kernels: %s",
                    problem or "another rank failed its check")
    return ar
