"""The proposer seam: guesses a running request's next tokens (one registry, like the other
seams). Proposals cost nothing to be wrong about beyond the verified step's extra rows."""

from __future__ import annotations

from abc import ABC, abstractmethod

from kestrel.config import SpeculativeConfig
from kestrel.request import Request

_PROPOSERS: dict[str, type[Proposer]] = {}


class Proposer(ABC):
    """Contract: ``propose(req, max_k)`` returns at most ``max_k`` token ids that may follow
    the request's tokens so far (prompt and output), [] for no guess. It runs on the host,
    between steps, for every request about to decode, so it must be cheap: a proposer may keep
    what it learnt of a request (its tokens only grow) until ``release(request_id)``, which the
    scheduler calls when the request leaves."""

    name: str

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def propose(self, req: Request, max_k: int) -> list[int]: ...

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was aborted (default: nothing kept)."""


def register_proposer(cls: type[Proposer]) -> type[Proposer]:
    _PROPOSERS[cls.name] = cls
    return cls


def make_proposer(cfg: SpeculativeConfig) -> Proposer | None:
    """The configured proposer, or None when speculative decoding is off."""
    if cfg.method is None:
        return None
    import kestrel.spec.ngram  # noqa: F401 - registers "ngram"

    return _PROPOSERS[cfg.method](cfg)
