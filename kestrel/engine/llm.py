"""The offline API, named as vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Union

from tqdm import tqdm

from kestrel.engine.args import EngineArgs, load_engine_tokenizer
from kestrel.engine.engine import Engine
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

PromptType = Union[str, dict, Sequence[int]]


class LLM:
    """Load a model once; generate for batches of prompts with continuous batching."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        args = EngineArgs(model=model, **kwargs)
        cfg = args.create_config()
        self.engine = Engine(cfg, load_engine_tokenizer(cfg))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. Prompts: strings, or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, plist)):
                sp = replace(sp, output_kind="final_only")  # only finished outputs are read
                ids.append(self._add(p, sp, priority[i] if priority else 0))
        except BaseException:
            for rid in ids:  # one bad prompt rejects the batch; nothing lingers in the engine
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _add(self, prompt: PromptType, params: SamplingParams, priority: int) -> str:
        rid = str(next(self._ids))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif not isinstance(prompt, str):
            prompt = list(prompt)
        self.engine.add_request(rid, prompt, params, priority=priority)
        return rid

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        try:
            while wanted - done.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in wanted - done.keys():
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             chat_template: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt,
                                                                  chat_template)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> list[int]:
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        if not conversation:
            raise ValueError("messages must not be empty")
        ids = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                      chat_template=chat_template, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
