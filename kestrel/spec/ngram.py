"""Prompt lookup (n-gram) proposals: where the last n tokens occurred before in the request,
guess that what followed them then follows now. No draft model; it pays where output repeats
its input (editing, summarising, code, retrieval answers)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kestrel.spec.proposer import Proposer, register_proposer


@register_proposer
class NgramProposer(Proposer):
    name = "ngram"

    def propose(self, token_ids: list[int], max_k: int) -> list[int]:
        """The tokens after the latest earlier occurrence of the longest suffix of
        ``token_ids`` (``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens) that
        occurred before, at most ``max_k`` of them."""
        ids = np.asarray(token_ids, dtype=np.int64)
        for n in range(self.cfg.prompt_lookup_max, self.cfg.prompt_lookup_min - 1, -1):
            if max_k < 1 or ids.size <= n:
                continue
            # windows that end before the suffix itself: [0, L - n) starts
            windows = sliding_window_view(ids[:-1], n)  # [L - n, n]
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                after = int(hits[-1]) + n
                return ids[after: after + max_k].tolist()
        return []
