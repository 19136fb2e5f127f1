"""RMSNorm, with the residual add folded in (the shape a fused kernel takes over on GPU)."""

from __future__ import annotations

import torch
from torch import nn

from kestrel.parallel.state import TPGroup


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) normalised in float32; returns (normed [T, H], new residual [T, H]).

    With no residual the returned residual is x itself. Matches transformers' LlamaRMSNorm:
    normalise in float32, cast back, then scale by the weight.
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), residual


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.impl = rms_norm_ref  # the kernel registry may swap in a fused kernel
        # Tensor parallelism: set when x arrives as this rank's partial sums (the row-parallel
        # layer before skipped its all-reduce, so the sum and the norm can be one kernel).
        self.reduce_input: TPGroup | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.reduce_input is not None:
            out, res = self.reduce_input.all_reduce_rms_norm(x, self.weight, self.eps, residual,
                                                             self.impl)
        else:
            out, res = self.impl(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)

    def reduced(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the TP group if it arrives as partial sums (for code that applies this
        norm's weight itself, as the FP8 fused norm → quant kernel does)."""
        return x if self.reduce_input is None else self.reduce_input.all_reduce(x)
