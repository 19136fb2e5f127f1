"""Logits → next tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws exactly from
p; seeded requests draw E from their own generator, so their tokens do not depend on which
other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kestrel.request import Request
from kestrel.spec.rejection import accept_greedy, accept_sampled_batch
from kestrel.structured import constrain_logits


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row: {token id: logprob} or None


def _pad_ids(lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """Ragged id lists → [N, L] with -1 padding."""
    width = max((len(x) for x in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), -1, dtype=torch.long)
    for i, ids in enumerate(lists):
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out.to(device)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """Repetition (prompt + output, divides positive logits), presence and frequency (output)."""
    ps = [r.params for r in reqs]
    n, v = logits.shape
    dev = logits.device
    if any(p.repetition_penalty != 1.0 for p in ps):
        ids = _pad_ids([r.all_token_ids for r in reqs], dev)
        seen = torch.zeros(n, v + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, ids.clamp(min=-1) % (v + 1), True)  # -1 lands in the spare column
        seen = seen[:, :v]
        rp = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        pen = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, pen, logits)
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        ids = _pad_ids([r.output_token_ids for r in reqs], dev)
        counts = torch.zeros(n, v + 1, device=dev)
        counts.scatter_add_(1, ids % (v + 1), torch.ones_like(ids, dtype=counts.dtype))
        counts = counts[:, :v]
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        logits = logits - freq * counts - pres * (counts > 0)
    return logits


def _block_stop_tokens(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """min_tokens: EOS and stop tokens are impossible until enough tokens were generated."""
    if any(len(r.output_token_ids) < r.params.min_tokens for r in reqs):
        logits = logits.clone()  # the runner's logits may be inference tensors: never write them
    for i, r in enumerate(reqs):
        if len(r.output_token_ids) < r.params.min_tokens:
            banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos
                                                       else list(r.eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (0 = off), top-p (1 = off) and min-p (0 = off) exclude."""
    v = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, v)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above this token
    drop |= before > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _on(device: torch.device, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small per-request tensor on ``device``. On CUDA it goes through pinned memory without
    blocking: a plain upload would wait for the device and undo overlapped steps."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    # allocated pinned: Tensor.pin_memory() would first ask the driver (see ModelRunner._upload)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _random_sample(probs: torch.Tensor, reqs: list[Request], gen: torch.Generator
                   ) -> torch.Tensor:
    """Exponential race on the logits' device: no host round trip, no large upload."""
    dev = probs.device
    noise = torch.empty_like(probs)
    unseeded = [i for i, r in enumerate(reqs) if r.params.seed is None]
    if unseeded:
        e = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_(generator=gen)
        if len(unseeded) == len(reqs):
            noise = e
        else:
            noise.index_copy_(0, _on(dev, unseeded, torch.long), e)
    for i, r in enumerate(reqs):
        if r.params.seed is not None:
            noise[i].exponential_(generator=r.generator_on(dev))
    return (probs / noise).argmax(dim=-1)


class Sampler:
    def __init__(self, seed: int = 0, fast_argmax: bool = False) -> None:
        """``fast_argmax``: greedy rows through kestrel.kernels.argmax on CUDA logits (torch's
        argmax takes ~27 µs for one 128k row on an H200)."""
        self.seed = seed
        self.fast_argmax = fast_argmax
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Next tokens [N] on the logits' device, without waiting for the device."""
        logits = _block_stop_tokens(apply_penalties(logits, reqs), reqs)
        logits = constrain_logits(logits, [r.grammar for r in reqs])
        if self.fast_argmax and logits.is_cuda:
            from kestrel.kernels.argmax import argmax_rows

            tokens = argmax_rows(logits)
        else:
            tokens = logits.argmax(dim=-1)
        rand = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if rand:
            dev = logits.device
            rr = [reqs[i] for i in rand]
            rows = None if len(rand) == len(reqs) else _on(dev, rand, torch.long)
            sub = logits if rows is None else logits.index_select(0, rows)
            temp = _on(dev, [r.params.temperature for r in rr])[:, None]
            sub = filter_logits(
                sub / temp, _on(dev, [r.params.top_k for r in rr], torch.long),
                _on(dev, [r.params.top_p for r in rr]), _on(dev, [r.params.min_p for r in rr]))
            picked = _random_sample(sub.softmax(-1), rr, self._generator(dev))
            tokens = picked if rows is None else tokens.index_copy(0, rows, picked)
        return tokens

    def verify(self, chunks: list[tuple[torch.Tensor, list[int], Request]]) -> list[list[int]]:
        """Speculative decoding: per request, the tokens it appends after a step that scored its
        proposals, from (logits [k + 1, V] float32 of its known token and the k guesses, the
        guesses, the request): the accepted guesses and one token of the target's, drawn as
        ``sample`` would (temperature, top-k/top-p/min-p, the request's seed). The greedy
        requests' argmaxes come back to the host in one copy, the sampled requests' decisions
        in another (accept_sampled_batch). Requests with penalties or
        min_tokens get no proposals (Scheduler._propose), so none apply here."""
        out: list[list[int]] = [[] for _ in chunks]
        greedy = [i for i, (_, _, r) in enumerate(chunks) if r.params.greedy]
        if greedy:
            best = torch.cat([chunks[i][0] for i in greedy]).argmax(dim=-1).tolist()
            at = 0
            for i in greedy:
                drafts = chunks[i][1]
                out[i] = accept_greedy(best[at: at + len(drafts) + 1], drafts)
                at += len(drafts) + 1
        rand = [i for i, (_, _, r) in enumerate(chunks) if not r.params.greedy]
        if rand:  # every sampled request's rows filtered together, accepted in one pass
            dev = chunks[rand[0]][0].device
            reqs = [chunks[i][2] for i in rand]
            sizes = [chunks[i][0].shape[0] for i in rand]

            def per_row(field: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
                return _on(dev, [getattr(r.params, field) for r, n in zip(reqs, sizes)
                                 for _ in range(n)], dtype)

            logits = torch.cat([chunks[i][0] for i in rand])
            probs = filter_logits(logits / per_row("temperature")[:, None],
                                  per_row("top_k", torch.long), per_row("top_p"),
                                  per_row("min_p")).softmax(-1)
            gens = [r.generator_on(dev) or self._generator(dev) for r in reqs]
            for i, toks in zip(rand, accept_sampled_batch(probs, [chunks[i][1] for i in rand],
                                                          gens)):
                out[i] = toks
        return out

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits [N, V] float32, one row per request to sample."""
        raw_logprobs = (logits.log_softmax(-1)
                        if any(r.params.logprobs is not None for r in reqs) else None)
        token_list = self.sample(logits, reqs).tolist()
        return SamplerOutput(token_list, gather_logprobs(raw_logprobs, token_list,
                                                         [r.params.logprobs for r in reqs]))


def gather_logprobs(logprobs: torch.Tensor | None, chosen: list[int],
                    ks: list[int | None]) -> list[dict[int, float] | None]:
    """Per row: top-k logprobs plus the chosen token's, as {token id: logprob}."""
    if logprobs is None:
        return [None] * len(chosen)
    kmax = max((k for k in ks if k), default=0)
    top_v, top_i = (logprobs.topk(kmax, dim=-1) if kmax else (None, None))
    chosen_lp = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device)[:, None])[:, 0]
    chosen_lp = chosen_lp.tolist()
    top_v = top_v.tolist() if top_v is not None else None
    top_i = top_i.tolist() if top_i is not None else None
    out: list[dict[int, float] | None] = []
    for row, (tok, k) in enumerate(zip(chosen, ks)):
        if k is None:
            out.append(None)
            continue
        d = {tok: chosen_lp[row]}
        for j in range(k):
            d.setdefault(top_i[row][j], top_v[row][j])
        out.append(d)
    return out
