"""A user's request: its n samples, their detokenizers, stop checks and the RequestOutput view."""

from __future__ import annotations

from typing import Any

import torch

from kestrel.engine.detokenizer import find_stop, make_detokenizer
from kestrel.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kestrel.request import Request, RequestStatus
from kestrel.sampling_params import SamplingParams


class RequestGroup:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, samples: list[Request], tokenizer: Any) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.samples = samples
        self.detok = [make_detokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
                      for _ in samples]
        self.texts = [""] * len(samples)
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # "delta" outputs: tokens and visible characters of each sample already sent
        self.sent_tokens = [0] * len(samples)
        self.sent_chars = [0] * len(samples)
        self.sent_prompt_logprobs = False

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.samples)

    def append_token(self, r: Request, token: int, logprobs: dict[int, float] | None,
                     now: float) -> RequestStatus | None:
        """Record a sampled token; return the finishing status if the sample is done."""
        r.output_token_ids.append(token)
        if logprobs is not None:
            r.logprobs.append(logprobs)
        if r.first_token_time is None:
            r.first_token_time = now
        r.token_times.append(now)
        i = r.sample_index
        p = self.params
        stop_tok = token in p.stop_token_ids
        is_eos = not p.ignore_eos and token in r.eos_token_ids
        delta = self.detok[i].add(token) if not (is_eos or stop_tok) else ""
        self.texts[i] += delta
        hit = find_stop(self.texts[i], p.stop, len(delta))
        if hit is not None:
            idx, s = hit
            self.texts[i] = self.texts[i][: idx + (len(s) if p.include_stop_str_in_output else 0)]
            r.stop_reason = s
            return RequestStatus.FINISHED_STOPPED
        if is_eos:
            return RequestStatus.FINISHED_STOPPED
        if stop_tok:
            r.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if r.grammar is not None:
            if not r.grammar.accept(token):  # it allowed no token at all: a dead end
                r.stop_reason = "grammar"
                return RequestStatus.FINISHED_STOPPED
            if r.grammar.done:  # the grammar took its stop token (also under ignore_eos)
                return RequestStatus.FINISHED_STOPPED
        if len(r.output_token_ids) >= r.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def add_prompt_logprobs(self, r: Request, start: int, logits: torch.Tensor) -> None:
        """Logits of prompt positions start.. predict tokens start+1..; only sample 0 records."""
        if r.sample_index != 0 or self.prompt_logprobs is None:
            return
        k = self.params.prompt_logprobs or 0
        lp = logits.log_softmax(-1)
        n = len(self.prompt_ids)
        for row in range(lp.shape[0]):
            pos = start + row + 1  # the prompt token this row predicts
            if pos >= n or pos < len(self.prompt_logprobs):
                continue
            tok = self.prompt_ids[pos]
            d = {tok: float(lp[row, tok])}
            if k:
                v, ids = lp[row].topk(k)
                for t, x in zip(ids.tolist(), v.tolist()):
                    d.setdefault(t, x)
            self.prompt_logprobs.append(d)

    def output(self) -> RequestOutput:
        """Everything so far, or (output_kind "delta") what is new since the last output;
        metrics only once the group is finished (nothing reads them before)."""
        delta = self.params.output_kind == "delta"
        want_lps = self.params.logprobs is not None
        outs = []
        for i, (r, text) in enumerate(zip(self.samples, self.texts)):
            done = r.is_finished
            visible = text if done or self.holdback == 0 else text[: max(0, len(text) - self.holdback)]
            if delta:  # a stop string never cuts text already sent: the holdback kept it back
                t0, c0 = self.sent_tokens[i], self.sent_chars[i]
                self.sent_tokens[i], self.sent_chars[i] = len(r.output_token_ids), len(visible)
                visible = visible[c0:]
            else:
                t0 = 0
            outs.append(CompletionOutput(  # slices: copies the engine goes on appending to
                index=r.sample_index, text=visible, token_ids=r.output_token_ids[t0:],
                logprobs=r.logprobs[t0:] if want_lps else None,
                finish_reason=r.status.value if done else None, stop_reason=r.stop_reason))
        # the prompt is done before the first token, so the first output has them all
        prompt_lps = None if delta and self.sent_prompt_logprobs else self.prompt_logprobs
        self.sent_prompt_logprobs = True
        finished = self.finished
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, finished,
                             prompt_lps, self.metrics() if finished else None,
                             self.samples[0].num_cached_tokens)

    def metrics(self) -> RequestMetrics:
        r0 = self.samples[0]
        firsts = [r.first_token_time for r in self.samples if r.first_token_time is not None]
        ends = [r.finished_time for r in self.samples if r.finished_time is not None]
        return RequestMetrics(
            arrival_time=r0.arrival_time, first_scheduled_time=r0.first_scheduled_time,
            first_token_time=min(firsts) if firsts else None,
            finished_time=max(ends) if self.finished and ends else None,
            token_times=list(r0.token_times), num_cached_tokens=r0.num_cached_tokens,
            num_preemptions=sum(r.num_preemptions for r in self.samples))
