"""Prompt lookup (n-gram) proposals: where the last n tokens occurred before in the request,
guess that what followed them then follows now. No draft model; it pays where output repeats
its input (editing, summarising, code, retrieval answers).

The proposer runs for every decoding request at every step, so it keeps each request's tokens
in a numpy buffer it extends with the new ones only, and searches in one vectorised pass: the
positions holding the last token, narrowed by the tokens before it. Rebuilding the token list
per step cost ~90 µs a request (5.7 ms a step at 64 requests, against 2.8 ms for the step on
an H200).
"""

from __future__ import annotations

import numpy as np

from kestrel.request import Request
from kestrel.spec.proposer import Proposer, register_proposer


def ngram_lookup(ids: np.ndarray, max_k: int, lo: int, hi: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix of ``ids`` (``hi``
    down to ``lo`` tokens) that occurred before, at most ``max_k`` of them; [] for none."""
    n_ids = ids.size
    if max_k < 1 or n_ids <= lo:
        return []
    # ends[j]: positions e < n_ids - 1 where ids[e - j .. e] equals the suffix's last j + 1
    ends = np.flatnonzero(ids[:-1] == ids[-1])
    best = ends if lo == 1 else None
    for j in range(1, min(hi, n_ids - 1)):
        ends = ends[ends >= j]
        ends = ends[ids[ends - j] == ids[-1 - j]]
        if not ends.size:
            break
        if j + 1 >= lo:
            best = ends
    if best is None or not best.size:
        return []
    after = int(best[-1]) + 1
    return ids[after: after + max_k].tolist()


@register_proposer
class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._seen: dict[str, tuple[np.ndarray, int]] = {}  # request id → (buffer, tokens in it)

    def propose(self, req: Request, max_k: int) -> list[int]:
        return ngram_lookup(self._tokens(req), max_k, self.cfg.prompt_lookup_min,
                            self.cfg.prompt_lookup_max)

    def release(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def _tokens(self, req: Request) -> np.ndarray:
        """The request's tokens so far, from its buffer extended by the ones added since."""
        buf, have = self._seen.get(req.request_id, (np.empty(0, np.int64), 0))
        total = req.num_tokens
        if total > buf.size:  # doubling: appends cost amortised O(1)
            grown = np.empty(max(64, 2 * total), np.int64)
            grown[:have] = buf[:have]
            buf = grown
        if total > have:
            buf[have:total] = req.token_ids_slice(have, total)
        self._seen[req.request_id] = (buf, total)
        return buf[:total]
