"""`kestrel generate`, `kestrel chat` and `kestrel pull`: the offline API from the shell."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kestrel.engine.args import add_engine_cli_args, engine_args_from_cli
from kestrel.sampling_params import SamplingParams
from kestrel.structured import StructuredOutput


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("prompt", nargs="+", help="prompt text (several: one request each)")
    _sampling_args(p)
    add_engine_cli_args(p)
    p.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="interactive chat on the terminal, streaming tokens")
    c.add_argument("--system", default=None)
    _sampling_args(c)
    add_engine_cli_args(c)
    c.set_defaults(func=run_chat)
    pl = sub.add_parser("pull", help="fetch and convert the default model (SmolLM2-135M-Instruct)")
    pl.set_defaults(func=run_pull)


def _sampling_args(p: Any) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    s = p.add_argument_group("structured output (one of)")
    s.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="JSON matching this schema: a file, inline JSON, or 'object' (any object)")
    s.add_argument("--regex", default=None, help="text matching this regular expression")
    s.add_argument("--choice", action="append", default=None,
                   help="one of these strings (repeat the flag)")
    s.add_argument("--grammar", default=None, help="an EBNF grammar: a file, or inline")


def _params(ns: Any) -> SamplingParams:
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                          top_k=ns.top_k, min_p=ns.min_p, seed=ns.sampling_seed, stop=ns.stop,
                          structured=_structured(ns))


def _structured(ns: Any) -> StructuredOutput | None:
    def text(value: str) -> str:  # a file's contents, or the value itself
        path = Path(value)
        return path.read_text() if len(value) < 4096 and path.is_file() else value

    given = {"regex": ns.regex, "choice": ns.choice,
             "grammar": ns.grammar and text(ns.grammar)}
    if ns.json_schema == "object":
        given["json_object"] = True
    elif ns.json_schema:
        given["json"] = text(ns.json_schema)
    given = {k: v for k, v in given.items() if v}
    return StructuredOutput(**given) if given else None


def _llm(ns: Any):
    from kestrel.engine.llm import LLM

    args = engine_args_from_cli(ns)
    return LLM(**vars(args))


def run_generate(ns: Any) -> int:
    llm = _llm(ns)
    for out in llm.generate(ns.prompt, _params(ns)):
        c = out.outputs[0]
        m = out.metrics
        print(c.text)
        print(f"[{len(c.token_ids)} tokens, finish={c.finish_reason}, "
              f"ttft={m.time_to_first_token:.3f}s, e2e={m.e2e_latency:.3f}s]", file=sys.stderr)
    return 0


def run_chat(ns: Any) -> int:
    llm = _llm(ns)
    engine = llm.engine
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    print("kestrel chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for turn in range(10**9):
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        ids = llm.apply_chat_template(history)
        engine.add_request(f"chat-{turn}", ids, _params(ns))
        shown, text = 0, ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                print(text[shown:], end="", flush=True)
                shown = len(text)
        print()
        history.append({"role": "assistant", "content": text})
    return 0


def run_pull(ns: Any) -> int:
    from kestrel.loader.pull import pull_default_model

    print(pull_default_model(progress=True))
    return 0
