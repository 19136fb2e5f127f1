"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.layers.linear import dense_linear
from kestrel.loader.hf import materialize
from kestrel.parallel.state import SINGLE, TPGroup


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Token embedding split by vocabulary rows; ids outside a rank's slice contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = _pad(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"embedding: checkpoint has shape {tuple(loaded.shape)}, "
                f"expected ({self.vocab_size}, {param.shape[1]})"
            )
        start = min(self.vocab_start, self.vocab_size)
        n = min(self.shard_size, self.vocab_size - start)  # the last shard may be padding
        rows = materialize(loaded.narrow(0, start, n))  # a lazy slice reads these rows only
        param.data.zero_()
        param.data[:n].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection onto the vocabulary; logits gathered across ranks and unpadded."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dense_linear(hidden, self.weight)  # [N, V / tp]
        logits = self.tp.all_gather_last_dim(logits)
        return logits[:, : self.vocab_size]
