"""RMSNorm, with the residual add folded in (the shape a fused kernel takes over on GPU)."""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out, res = self.impl(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)
