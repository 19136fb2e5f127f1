"""Perplexity over non-overlapping windows of real text.

The text is tokenized once without special tokens and cut into windows of ``window`` tokens
(the last partial window is dropped). Inside a window, token t is predicted from tokens < t,
so a window scores ``window − 1`` tokens; no state carries across windows. Perplexity =
exp(total negative log-likelihood / scored tokens).

The offline default corpus is CPython's bundled ``pydoc_data.topics`` (the help texts of the
language reference): real English and code, on every machine, with no download.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kestrel.core.scheduler import ScheduledRequest, SchedulerOutput

PYDOC = "pydoc"


def load_corpus(spec: str | None = None) -> str:
    """"pydoc" (or None) → the pydoc topics text; otherwise the UTF-8 file at that path."""
    if spec is None or spec == PYDOC:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read text file {spec!r}: {e}") from None
    if not text.strip():
        raise ValueError(f"text file {spec!r} is empty")
    return text


def corpus_ids(tokenizer: Any, spec: str | None = None) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot read text")
    text = load_corpus(spec)
    try:  # verbose=False: no warning that the whole text is longer than the context
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=False))


def token_windows(ids: list[int], window: int, max_windows: int | None = None
                  ) -> list[list[int]]:
    """Consecutive non-overlapping windows of exactly ``window`` tokens, from the start."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def batch_logits(llm: Any, windows: list[list[int]], tag: str = "eval") -> list[torch.Tensor]:
    """Logits [len, V] float32 at every position of each window, in one prefill step.

    Calls the executor directly (the scheduler would return only the last position's
    logits), on KV blocks borrowed from the pool and returned at once. Several windows per
    call make larger matmuls, which CPUs in particular run much faster.
    """
    engine = llm.engine
    bs = engine.cfg.cache.block_size
    need = [-(-len(w) // bs) for w in windows]
    try:
        blocks = engine.pool.allocate(sum(need))
    except RuntimeError as e:
        raise ValueError(f"{len(windows)} windows need {sum(need)} KV blocks: {e}") from None
    try:
        reqs, at = [], 0
        for i, (w, n) in enumerate(zip(windows, need)):
            reqs.append(ScheduledRequest(f"{tag}-{i}", list(w), 0, blocks[at:at + n],
                                         sample=False, prompt_logprobs=True))
            at += n
        out = engine.executor.execute(SchedulerOutput(reqs))
        return [out.prompt_logits[r.request_id].float() for r in reqs]
    finally:
        engine.pool.free(blocks)


def batches(windows: list[list[int]], size: int) -> list[list[list[int]]]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [windows[i:i + size] for i in range(0, len(windows), size)]


def target_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t = 1 .. len − 1, from logits [len, V]."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    return logp.gather(-1, targets[:, None])[:, 0]


def summarize_nll(window_nll: list[float], window: int) -> dict:
    tokens = len(window_nll) * (window - 1)
    nll = sum(window_nll)
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens,
            "tokens_scored": tokens, "num_windows": len(window_nll), "window": window,
            "window_nll": window_nll}


def perplexity(llm: Any, windows: list[list[int]], progress: bool = False,
               batch_size: int = 8) -> dict:
    """Perplexity of the engine's model over the windows, with each window's NLL sum."""
    nll = []
    with tqdm(total=len(windows), desc="perplexity", disable=not progress) as bar:
        for group in batches(windows, batch_size):
            for w, logits in zip(group, batch_logits(llm, group)):
                nll.append(-float(target_logprobs(logits, w).double().sum()))
            bar.update(len(group))
    return summarize_nll(nll, len(windows[0]))


@torch.inference_mode()
def hf_perplexity(model: Any, windows: list[list[int]], progress: bool = False,
                  batch_size: int = 8) -> dict:
    """The same windows through a transformers causal LM (the reference)."""
    device = next(model.parameters()).device
    nll = []
    with tqdm(total=len(windows), desc="perplexity (transformers)", disable=not progress) as bar:
        for group in batches(windows, batch_size):  # equal lengths: no padding needed
            logits = model(torch.tensor(group, device=device)).logits
            for w, lg in zip(group, logits):
                nll.append(-float(target_logprobs(lg, w).double().sum()))
            bar.update(len(group))
    return summarize_nll(nll, len(windows[0]))


def eval_engine_kwargs(window: int, batch_size: int = 1, block_size: int = 16) -> dict:
    """Engine sizing for evaluation: a context of one window, KV blocks for a batch of them."""
    return {"max_model_len": window,
            "num_kv_blocks": batch_size * -(-window // block_size) + 1}
