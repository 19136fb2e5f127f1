"""Verification of proposals (Leviathan et al., 2023; Chen et al., 2023) for a proposer whose
distribution is a point mass on its guess (prompt lookup): keeping guess d with probability
p(d) and, on its rejection, drawing from p with d removed, yields exactly p. Inputs are one
request's rows: row j scores the position that guess j claims, row k the one after the last."""

from __future__ import annotations

import torch


def accept_greedy(best: list[int], drafts: list[int]) -> list[int]:
    """``best``: the target's argmax at the k + 1 positions. The guesses while they equal it,
    then its token (what plain greedy decoding produces, in one step for all of them)."""
    m = 0
    while m < len(drafts) and drafts[m] == best[m]:
        m += 1
    return drafts[:m] + [best[m]]


def accept_sampled(probs: torch.Tensor, drafts: list[int], gen: torch.Generator | None
                   ) -> list[int]:
    """probs [k + 1, V], the target's sampling distributions (temperature and filters applied):
    each guess kept with probability p_j(d_j) until one is rejected; that position is drawn from
    p_j without d_j (renormalised by the exponential race), or the position after the last
    guess from p_k when all are kept."""
    k = len(drafts)
    d = torch.tensor(drafts, device=probs.device)
    p_guess = probs[:k].gather(1, d[:, None])[:, 0]
    u = torch.rand(k, device=probs.device, generator=gen)
    kept = (u < p_guess).tolist()
    m = kept.index(False) if False in kept else k
    row = probs[m].clone()
    if m < k:
        row[drafts[m]] = 0.0
    noise = torch.empty_like(row).exponential_(generator=gen)
    return drafts[:m] + [int((row / noise).argmax())]
