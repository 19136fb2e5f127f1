"""Who this process is in the parallel layout, passed explicitly to the layers that need it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group: this rank's index, the group size and the process group handle."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup, None when size == 1
    one_shot: Any = None  # a SymmMemAllReduce for small tensors (CUDA), else None: NCCL only

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group (may be a new tensor: use the return value)."""
        if self.size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                            residual: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(all_reduce(x), weight, eps, residual)``: one fused kernel where the one-shot
        all-reduce offers it for these shapes (kernels/allreduce_norm.py), else the two steps.
        ``norm``: an RMSNorm implementation (rms_norm_ref or the fused kernel)."""
        if self.one_shot is not None and self.one_shot.fits_norm(x, residual):
            return self.one_shot.rms_norm(x, weight, eps, residual)
        return norm(self.all_reduce(x), weight, eps, residual)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank gets TP rank 0's ``x`` (in place; queued on the device, no host wait)."""
        if self.size > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TPGroup()


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d
