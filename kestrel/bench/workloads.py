"""Named workloads from the seed documents, and prompts of exact token lengths.

``llama3-paper``: the Llama 3 paper's inference setting (4,096 input, 256 output tokens).
``trtllm-*``: the input/output pairs of NVIDIA's TensorRT Model Optimizer tables (Llama 3.1 405B
on H200). ``mixed-100-1024``: 256 requests, input and output lengths uniform in 100–1024.
``chat``: a chat-like shape (log-normal lengths, short prompts, medium answers); a synthetic
stand-in for ShareGPT-style traffic, not a recorded trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: fixed (lo == hi), uniform in [lo, hi], or log-normal clipped to it."""

    lo: int
    hi: int
    kind: str = "uniform"  # "uniform" | "lognormal"
    median: float = 0.0  # log-normal only
    sigma: float = 1.0  # log-normal only

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.lo == self.hi:
            return [self.lo] * n
        if self.kind == "lognormal":
            x = rng.lognormal(np.log(self.median), self.sigma, n)
            return [int(v) for v in np.clip(np.rint(x), self.lo, self.hi)]
        return [int(v) for v in rng.integers(self.lo, self.hi + 1, n)]


def fixed(n: int) -> LengthDist:
    return LengthDist(n, n)


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: LengthDist
    output_len: LengthDist
    description: str

    def with_overrides(self, num_prompts: int | None = None, input_len: int | None = None,
                       output_len: int | None = None) -> Workload:
        """The same workload with a count or fixed lengths replaced (CI runs it tiny)."""
        w = self
        if num_prompts is not None:
            w = replace(w, num_prompts=num_prompts)
        if input_len is not None:
            w = replace(w, input_len=fixed(input_len))
        if output_len is not None:
            w = replace(w, output_len=fixed(output_len))
        return w

    def lengths(self, seed: int = 0) -> list[tuple[int, int]]:
        """(input, output) lengths of every request, reproducible from the seed."""
        rng = np.random.default_rng(seed)
        ins = self.input_len.sample(rng, self.num_prompts)
        outs = self.output_len.sample(rng, self.num_prompts)
        return list(zip(ins, outs))


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("llama3-paper", 64, fixed(4096), fixed(256),
             "Llama 3 paper §6: 4,096 input and 256 output tokens"),
    Workload("trtllm-2k-128", 64, fixed(2048), fixed(128),
             "TensorRT Model Optimizer table: 2,048 input / 128 output"),
    Workload("trtllm-32k-2k", 16, fixed(32768), fixed(2048),
             "TensorRT Model Optimizer table: 32,768 input / 2,048 output"),
    Workload("trtllm-120k-2k", 8, fixed(120000), fixed(2048),
             "TensorRT Model Optimizer table: 120,000 input / 2,048 output"),
    Workload("mixed-100-1024", 256, LengthDist(100, 1024), LengthDist(100, 1024),
             "256 requests, input and output uniform in 100-1024"),
    Workload("chat", 256, LengthDist(8, 4096, "lognormal", median=256, sigma=1.0),
             LengthDist(8, 1024, "lognormal", median=192, sigma=0.8),
             "chat-like: log-normal input (median 256) and output (median 192) lengths"),
)}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    return WORKLOADS[name]


def usable_token_ids(vocab_size: int, tokenizer: object | None = None) -> np.ndarray:
    """Ids for random prompts: no special tokens (they can end or reshape a prompt).

    With a tokenizer its special ids are excluded; without one, the lowest 100 ids and the top
    256 (where Llama 3 keeps its reserved tokens) are.
    """
    if tokenizer is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids = np.array([i for i in range(vocab_size) if i not in special], dtype=np.int64)
    else:
        lo, hi = min(100, vocab_size // 4), max(vocab_size - 256, vocab_size * 3 // 4)
        ids = np.arange(lo, hi, dtype=np.int64)
    if ids.size == 0:
        raise ValueError(f"no usable token ids in a vocabulary of {vocab_size}")
    return ids


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0,
                   tokenizer: object | None = None) -> list[list[int]]:
    """Prompts of random token ids with exactly the given lengths (distinct, so no cache hits)."""
    rng = np.random.default_rng(seed)
    ids = usable_token_ids(vocab_size, tokenizer)
    return [ids[rng.integers(0, ids.size, n)].tolist() for n in lengths]


def text_prompts(lengths: list[int], corpus_ids: list[int], seed: int = 0) -> list[list[int]]:
    """Slices of real text (already tokenized) with exactly the given lengths."""
    if not corpus_ids:
        raise ValueError("the text corpus is empty")
    rng = np.random.default_rng(seed)
    arr = np.asarray(corpus_ids, dtype=np.int64)
    out = []
    for n in lengths:
        reps = -(-n // arr.size) + 1  # prompts longer than the corpus wrap around it
        start = int(rng.integers(0, arr.size))
        out.append(np.tile(arr, reps)[start:start + n].tolist())
    return out


def make_prompts(lengths: list[int], vocab_size: int, source: str = "random", seed: int = 0,
                 tokenizer: object | None = None, text: str | None = None) -> list[list[int]]:
    """Prompts by source: "random" token ids, or "text" (a corpus: pydoc or a file path)."""
    if source == "random":
        return random_prompts(lengths, vocab_size, seed, tokenizer)
    if source == "text":
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (this model has none): "
                             "use --prompt-source random")
        from kestrel.eval.perplexity import corpus_ids

        return text_prompts(lengths, corpus_ids(tokenizer, text or "pydoc"), seed)
    raise ValueError(f"unknown prompt source {source!r}; choose random or text")
