"""Prompt lookup (n-gram) proposals: where the last n tokens occurred before in the request,
guess that what followed them then follows now. No draft model; it pays where output repeats
its input (editing, summarising, code, retrieval answers).

The proposer runs for every decoding request at every step, so it keeps each request's tokens
as int32 bytes it extends with the new ones only, and searches them with ``bytes.rfind`` (a
C substring search from the end): ~1.3 µs a request at 600 tokens where numpy's vectorised
pass took ~11 and rebuilding the token list ~90 (at 64 requests the proposer's host time is
part of every step: 2.2 ms of scheduling against a 2.8 ms forward on an H200).
"""

from __future__ import annotations

import numpy as np

from kestrel.request import Request
from kestrel.spec.proposer import Proposer, register_proposer

_TOKEN = np.dtype(np.int32)  # token ids as 4-byte words (vocabularies are far below 2^31)


def ngram_lookup(data: bytes | bytearray, max_k: int, lo: int, hi: int) -> list[int]:
    """``data``: tokens as int32 bytes. The tokens after the latest earlier occurrence of the
    longest suffix (``hi`` down to ``lo`` tokens) that occurred before, at most ``max_k`` of
    them; [] for none."""
    size = _TOKEN.itemsize
    n_ids = len(data) // size
    if max_k < 1 or n_ids <= lo:
        return []
    before_last = (n_ids - 1) * size  # an occurrence ends before the last token
    for n in range(min(hi, n_ids - 1), lo - 1, -1):
        pattern = data[(n_ids - n) * size:]
        start = data.rfind(pattern, 0, before_last)
        while start > 0 and start % size:  # matched across token boundaries: look earlier
            start = data.rfind(pattern, 0, start + len(pattern) - 1)
        if start >= 0:
            after = start // size + n
            return np.frombuffer(data, _TOKEN, min(max_k, n_ids - after), after * size).tolist()
    return []


@register_proposer
class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._seen: dict[str, bytearray] = {}  # request id → its tokens so far, int32 bytes

    def propose(self, req: Request, max_k: int) -> list[int]:
        return ngram_lookup(self._tokens(req), max_k, self.cfg.prompt_lookup_min,
                            self.cfg.prompt_lookup_max)

    def release(self, request_id: str) -> None:
        self._seen.pop(request_id, None)

    def _tokens(self, req: Request) -> bytearray:
        """The request's tokens so far, its bytes extended by the ones added since."""
        data = self._seen.setdefault(req.request_id, bytearray())
        have, total = len(data) // _TOKEN.itemsize, req.num_tokens
        if total > have:
            data += np.asarray(req.token_ids_slice(have, total), _TOKEN).tobytes()
        return data
