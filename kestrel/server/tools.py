"""Tool calls on /v1/chat/completions (OpenAI's ``tools`` and ``tool_choice``).

A named function (``tool_choice: {"type": "function", "function": {"name": ...}}``) constrains
the answer to that function's arguments, ``"required"`` to a JSON list of one or more calls
``[{"name": ..., "parameters": {...}}]`` (vLLM's form), both through the structured outputs of
kestrel/structured.py, so the arguments always parse and fit their schemas; the server returns
them as ``tool_calls``. ``"auto"`` would need a parser of the model's own free-text call format
and is refused (as vLLM refuses it without ``--tool-call-parser``); ``"none"`` answers in text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from kestrel.server.errors import bad_request
from kestrel.server.protocol import ChatCompletionRequest, NamedToolChoice
from kestrel.structured import StructuredOutput


@dataclass
class ToolMode:
    """How this request calls its tools: one named function, or any number (``required``)."""

    required: bool
    parameters: dict[str, dict]  # function name → JSON schema of its arguments
    single: bool = False  # required, parallel_tool_calls false: exactly one call

    def structured(self) -> StructuredOutput:
        if not self.required:
            (params,) = self.parameters.values()
            return StructuredOutput(json=params)
        call = [{"type": "object", "additionalProperties": False,
                 "required": ["name", "parameters"],
                 "properties": {"name": {"enum": [name]}, "parameters": params}}
                for name, params in self.parameters.items()]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
        return StructuredOutput(json={**calls, "maxItems": 1} if self.single else calls)

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` entries from the answer; None where it is not complete JSON
        (max_tokens cut it)."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        pairs = ([(next(iter(self.parameters)), value)] if not self.required
                 else [(c["name"], c["parameters"]) for c in value])
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                for name, args in pairs]


def tool_mode(req: ChatCompletionRequest) -> ToolMode | None:
    """The request's tool calling, validated (400s naming the problem); None: a text answer."""
    choice, tools = req.tool_choice, req.tools or []
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    if choice == "auto":
        raise bad_request("tool_choice 'auto' needs a parser of the model's own tool-call "
                          "format, which this server does not have: name a function or use "
                          "'required'", "tool_choice")
    schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in schemas:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools",
                              "tool_choice")
        return ToolMode(False, {name: schemas[name]})
    return ToolMode(True, schemas, single=req.parallel_tool_calls is False)
