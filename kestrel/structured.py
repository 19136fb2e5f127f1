"""Structured outputs (OpenAI's ``response_format``, vLLM's guided decoding): a request's tokens
constrained to a JSON schema, any JSON object, a regular expression, one of given strings or an
EBNF grammar. Each step the grammar's matcher says which tokens may come next, as a bitmask over
the vocabulary (xgrammar, Dong et al., 2024: token masks precomputed per grammar state, so a
step costs microseconds); the sampler sets the others to -inf before temperature and filters,
and every token the request appends advances its matcher. A request whose grammar is complete
finishes with ``stop``; max_tokens can still cut it short (``length``), as in vLLM. A grammar
with no way forward (``root ::= root``) ends its request with ``stop`` and the stop reason
"grammar", at the token it could not take.

The mask needs the previous token on the host, so live structured requests turn overlapped
steps off and get no speculative proposals, like penalties (SamplingParams.needs_token_history).
xgrammar is imported on the first structured request only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where masks are made: `import kestrel` stays light
    import torch


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (EBNF, as
    xgrammar and llama.cpp's GBNF write it)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured choice must be a non-empty list of non-empty "
                                 "strings")
        given = [name for name, v in (("json", self.json), ("json_object", self.json_object),
                                      ("regex", self.regex), ("choice", self.choice),
                                      ("grammar", self.grammar)) if v]
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of json, json_object, regex, "
                             f"choice, grammar; got {given or 'none'}")

    def source(self) -> tuple[str, str]:
        """(kind, text) that xgrammar compiles: a JSON schema, a regex or an EBNF grammar."""
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.json:
            return "json", self.json if isinstance(self.json, str) else json.dumps(self.json)
        if self.regex:
            return "regex", self.regex
        if self.choice:  # EBNF string literals take JSON's escapes
            return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                      for c in self.choice)
        return "grammar", self.grammar


class GrammarCompiler:
    """One engine's compiler: its tokenizer's vocabulary, compiled grammars cached by source."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        try:
            import xgrammar
        except ImportError:  # a bare install elsewhere (e.g. a GPU machine without internet)
            raise ValueError("structured output needs the xgrammar package (pip install "
                             "xgrammar)") from None

        self.xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)

    def matcher(self, spec: StructuredOutput) -> Matcher:
        """A fresh matcher of ``spec``; ValueError naming the problem if it does not compile."""
        kind, text = spec.source()
        compile_fn = {"json": self.compiler.compile_json_schema,
                      "regex": self.compiler.compile_regex,
                      "grammar": self.compiler.compile_grammar}[kind]
        try:
            compiled = compile_fn(text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors
            raise ValueError(f"structured output: invalid {kind}: {e}") from None
        return Matcher(self.xgr.GrammarMatcher(compiled), self.vocab_size)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of an int32 bitmask [N, ceil(V / 32)]: bit t set where token t may
        come next."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar forbids it, which the mask prevents
        unless it forbade every token (a grammar with no way forward, e.g. root ::= root)."""
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token taken: nothing may follow."""
        return self._m.is_terminated()


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [N, ceil(V / 32)] → bool [N, V] (bit t % 32 of word t // 32)."""
    import torch

    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def constrain_logits(logits: torch.Tensor, matchers: list[Matcher | None]) -> torch.Tensor:
    """``logits`` [N, V] with the tokens their rows' grammars forbid at -inf (rows without a
    matcher untouched); the input itself is never written (it may be the runner's)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import torch

    v = logits.shape[1]
    bitmask = torch.zeros(len(rows), -(-v // 32), dtype=torch.int32)
    for j, i in enumerate(rows):
        matchers[i].fill(bitmask, j)
    allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    allowed[rows] = allowed_tokens(bitmask.to(logits.device), v)
    return logits.masked_fill(~allowed, float("-inf"))
