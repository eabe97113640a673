"""OpenAI wire models: what turngate validates on the way in.

turngate checks the shape of everything it reads itself (messages, their content parts and tool
calls, tools and their schemas, tool_choice, the streaming flags) and the types of the sampling
parameters it declares, as OpenAI does: types are strict (`"stream": "no"` is refused, not read as
true). Ranges and every other field, known or not, are the upstream's business: the request is
forwarded as sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo
from typing_extensions import TypedDict

from service.gate import toolschema

# The parts of a request are TypedDicts: validated in pydantic-core without building an object per
# message (half the cost of models), and what passes is the client's own dict, unknown keys included.
_WIRE = ConfigDict(extra="allow", strict=True)


class _Open(BaseModel):
    """Unknown fields are kept (and forwarded); declared ones are typed strictly."""

    model_config = _WIRE


class ContentPart(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    type: str
    text: NotRequired[str]
    refusal: NotRequired[str]


class FunctionCall(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    name: str
    arguments: str


class CustomCall(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    name: str
    input: str


def _needs_its_spec(what: str):
    """A function tool (or call) carries `function`, a custom one `custom`, as its type says."""
    def check(item: dict[str, Any]) -> dict[str, Any]:
        kind = item.get("type") or "function"
        if kind not in item:
            raise ValueError(f"a {kind} {what} needs its {kind!r} object")
        return item
    return check


class _ToolCall(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    id: NotRequired[str]
    type: NotRequired[Literal["function", "custom"]]
    function: NotRequired[FunctionCall]
    custom: NotRequired[CustomCall]


ToolCall = Annotated[_ToolCall, AfterValidator(_needs_its_spec("tool call"))]


class ChatMessage(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: NotRequired[str | list[ContentPart] | None]
    name: NotRequired[str | None]
    tool_calls: NotRequired[list[ToolCall] | None]
    tool_call_id: NotRequired[str | None]


def may_refer(raw: bytes) -> bool:
    """Whether a body could hold a `$ref`-like key ($ref, $dynamicRef, $recursiveRef).

    Such a key ends in `ef"` on the wire unless its `e` or `f` is written as a \\u escape.
    """
    return b'ef"' in raw or b"\\u0065" in raw or b"\\u0066" in raw


def _evaluable(schema: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    # Only the chat route evaluates schemas, and it says whether its raw body can hold a ref at all;
    # elsewhere (the critic's score route reads tool names only) the walk would be cost for nothing.
    if schema is None or not (info.context or {}).get("may_refer"):
        return schema
    problem = toolschema.self_reference(schema)
    if problem:
        raise ValueError(problem)
    return schema


class FunctionDef(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: NotRequired[str | None]
    parameters: NotRequired[Annotated[dict[str, Any] | None, AfterValidator(_evaluable),
                                      Field(description="A JSON Schema; `$ref`s resolve in the document only.")]]
    strict: NotRequired[bool | None]


class CustomDef(TypedDict):
    """A custom tool: the model calls it with free text (`format` may constrain it by a grammar,
    which turngate forwards and does not check)."""

    __pydantic_config__ = _WIRE  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: NotRequired[str | None]
    format: NotRequired[dict[str, Any] | None]


class _Tool(TypedDict):
    __pydantic_config__ = _WIRE  # type: ignore[misc]
    type: NotRequired[Literal["function", "custom"]]
    function: NotRequired[FunctionDef]
    custom: NotRequired[CustomDef]


Tool = Annotated[_Tool, AfterValidator(_needs_its_spec("tool"))]


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """A Chat Completions request. Fields not listed here are forwarded to the upstream unchanged."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Choices: passthrough forwards n; a gated route returns its best "
                                                  "n candidates (n at most the route's candidates; fewer when fewer "
                                                  "pass)")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
