"""Request bodies of the OpenAI-compatible API, as strict pydantic models.

Strict on purpose: wrong types are not coerced ("5" is not 5, 1 is not true), NaN and infinity
are refused, and unknown fields get a 400 naming them (vLLM's choice; OpenAI ignores them) so a
misspelt parameter is never silently dropped. The ranges repeat SamplingParams' own checks so
that the published schema tells clients (and the schema fuzzer) what is valid.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator

MAX_N = 32  # samples per prompt
MAX_CHOICES = 256  # prompts x n in one HTTP request
MAX_LOGPROBS = 20
MAX_STOP = 16


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_PROMPT_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    str | list[str] | list[int] | list[list[int]], config=ConfigDict(strict=True))


def _check_prompt(value: Any, handler: Any) -> Any:
    """One clear message instead of pydantic's four-way union report."""
    try:
        prompt = _PROMPT_ADAPTER.validate_python(value)
    except ValidationError:
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                         "or a list of lists of token ids") from None
    parts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else prompt
    if not parts or any(len(p) == 0 for p in parts):
        raise ValueError("prompt is empty: give at least one character or token")
    return prompt


_Text = Annotated[str, Field(min_length=1)]
_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# The constraints are for the published schema; _check_prompt does the validating.
PromptField = Annotated[_Text | Annotated[list[_Text], Field(min_length=1)] | _Ids
                        | Annotated[list[_Ids], Field(min_length=1)],
                        WrapValidator(_check_prompt)]


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchema(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(StrictModel):
    type: Literal["text"]


class JsonObjectFormat(StrictModel):
    type: Literal["json_object"]


class JsonSchemaFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                           Field(discriminator="type")]


class SamplingFields(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="served model name; omitted: the one model")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: disabled")
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured output (kestrel.structured): OpenAI's response_format, or vLLM's guided_*
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[_Text], Field(min_length=1)] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptField
    max_tokens: int | None = Field(16, ge=1,
                                   description="at most the context left after the prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


_Content = str | list[TextPart]


class _Message(StrictModel):
    name: str | None = None

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(p.text for p in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: _Content


class UserMessage(_Message):
    role: Literal["user"]
    content: _Content


class ToolCallFunction(StrictModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: _Content | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: _Content
    tool_call_id: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage,
                        Field(discriminator="role")]


class FunctionDef(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1,
                                   description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(StrictModel):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


def error_body(message: str, err_type: str, code: int | str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def describe_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line message naming the offending field, and the field (OpenAI's ``param``)."""
    parts = []
    param = None
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        param = param or (loc or None)
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}' (not supported by this server)")
        elif err["type"] == "missing":
            parts.append(f"missing required field '{loc}'")
        elif err["type"].startswith("json_") or err["type"] == "json_invalid":
            parts.append(f"request body is not valid JSON: {err['msg']}")
        elif loc:
            parts.append(f"{loc}: {_short_msg(err)}")
        else:
            parts.append(f"request body: {_short_msg(err)}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts), param


def _short_msg(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    return msg
