"""Verification of proposals (Leviathan et al., 2023; Chen et al., 2023) for a proposer whose
distribution is a point mass on its guess (prompt lookup): keeping guess d with probability
p(d) and, on its rejection, drawing from p with d removed, yields exactly p. Inputs are one
request's rows: row j scores the position that guess j claims, row k the one after the last."""

from __future__ import annotations

import itertools

import torch


def accept_greedy(best: list[int], drafts: list[int]) -> list[int]:
    """``best``: the target's argmax at the k + 1 positions. The guesses while they equal it,
    then its token (what plain greedy decoding produces, in one step for all of them)."""
    m = 0
    while m < len(drafts) and drafts[m] == best[m]:
        m += 1
    return drafts[:m] + [best[m]]


def accept_sampled_batch(probs: torch.Tensor, drafts: list[list[int]],
                         gens: list[torch.Generator | None]) -> list[list[int]]:
    """probs [R, V]: the target's sampling distributions (temperature and filters applied) of
    several requests end to end, k_i + 1 rows each for its guesses ``drafts[i]``. Per request,
    each guess is kept with probability p_j(d_j) until one is rejected; that position is drawn
    from p_j without d_j (renormalised by the exponential race), or the position after the last
    guess from p_k when all are kept. Decided on the device for all requests at once, one copy
    to the host; ``gens[i]``: the request's generator (requests may share one)."""
    dev = probs.device
    ks = [len(d) for d in drafts]
    width = max(ks) + 1  # a column past every request's last guess, never kept
    starts = itertools.accumulate([0] + [k + 1 for k in ks[:-1]])
    # per request: its guesses padded to width, its first row, its guess count; one upload
    host = torch.tensor([d + [0] * (width - len(d)) + [s, len(d)]
                         for d, s in zip(drafts, starts)], dtype=torch.long)
    tokens, starts, k_dev = host.to(dev).split([width, 1, 1], dim=1)
    starts, k_dev = starts[:, 0], k_dev[:, 0]
    cols = torch.arange(width, device=dev)
    rows = (starts[:, None] + cols[None]).clamp_max(probs.shape[0] - 1)
    p_guess = probs[rows, tokens]  # [n, width]; columns past a request's guesses are masked
    kept = (cols[None] < k_dev[:, None]) & (_draw(gens, width, dev, uniform=True) < p_guess)
    m = kept.long().cumprod(1).sum(1)  # guesses kept before the first rejection
    final = probs[starts + m]  # [n, V]: the rows the requests' own tokens are drawn from
    drop = tokens.gather(1, m[:, None])  # the rejected guess, drawn from p without it
    final = final.scatter(1, drop, torch.where((m < k_dev)[:, None], 0.0, final.gather(1, drop)))
    own = (final / _draw(gens, probs.shape[1], dev, uniform=False)).argmax(-1)
    m_host, own_host = torch.stack([m, own]).tolist()
    return [d[:mi] + [t] for d, mi, t in zip(drafts, m_host, own_host)]


def _draw(gens: list[torch.Generator | None], cols: int, dev: torch.device,
          uniform: bool) -> torch.Tensor:
    """[n, cols] uniforms (or unit exponentials), row i from ``gens[i]``: one draw per distinct
    generator (requests sharing one are drawn together)."""
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(gens):
        groups.setdefault(id(g), []).append(i)
    out = None
    for idx in groups.values():
        block = torch.empty(len(idx), cols, device=dev)
        block = (block.uniform_(generator=gens[idx[0]]) if uniform
                 else block.exponential_(generator=gens[idx[0]]))
        if len(idx) == len(gens):
            return block
        if out is None:
            out = torch.empty(len(gens), cols, device=dev)
        out[torch.tensor(idx, device=dev)] = block
    return out
