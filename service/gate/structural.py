"""The structural critic: cheap, always-on checks that veto a candidate outright.

A candidate is vetoed when it is empty, was cut off (finish_reason "length"), calls a tool the
request did not declare, passes arguments that are not a JSON object or break the tool's declared
JSON Schema, or ignores a tool_choice that forbids or demands a call. Calls of custom tools (free
text input) are checked for the tool's name and for text input; a grammar in the tool's `format` is
the upstream's to enforce and is not checked. The reason is a short code
(a bounded metric label); the detail is the human-readable message the intervention feeds back.

The tool schemas are the client's data (service.gate.toolschema): checking against them never
fetches, never backtracks, and runs off the event loop within a time budget. When arguments cannot
be checked (budget spent, a schema too large or one the checker cannot use) the candidate is not
vetoed: a schema turngate cannot honour must not make the gate worse than passing the reply through.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from service import wirejson
from service.gate import toolschema

# Wall time for checking one turn's candidates against their schemas; real schemas take microseconds.
SCHEMA_BUDGET_S = 0.25
_DETAIL_CHARS = 500  # jsonschema quotes the whole value; the detail is fed back to the actor and stored


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None  # a veto's reason; on an ok verdict, why the arguments went unchecked
    detail: str | None = None


OK = Verdict(True)


def custom_tools(tools: list[dict[str, Any]] | None) -> frozenset[str]:
    """The names of the request's custom tools."""
    return frozenset(t["custom"]["name"] for t in tools or [] if isinstance(t, dict) and t.get("type") == "custom"
                     and isinstance(t.get("custom"), dict) and isinstance(t["custom"].get("name"), str))


def tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, str | None]:
    """Function name -> its parameters schema as canonical JSON (None when the tool declares none)."""
    out: dict[str, str | None] = {}
    for tool in tools or []:
        if isinstance(tool, dict) and tool.get("type") == "custom":
            continue
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schema = fn.get("parameters")
            out[fn["name"]] = json.dumps(schema, sort_keys=True) if schema else None
    return out


async def check_all(replies: list[tuple[dict[str, Any], str | None]], schemas: dict[str, str | None],
                    tool_choice: Any = None, custom: frozenset[str] = frozenset()) -> list[Verdict]:
    """Verdicts for (message, finish_reason) pairs; schema checks run on a worker thread."""
    if not any(schemas.values()) or not any(_calls(m) for m, _ in replies):
        return [check(m, f, schemas, tool_choice, custom=custom) for m, f in replies]

    def run() -> list[Verdict]:
        deadline = time.monotonic() + SCHEMA_BUDGET_S
        turn = toolschema.TurnValidators()  # candidates calling the same tool share one build of its schema
        return [check(m, f, schemas, tool_choice, deadline, custom, turn) for m, f in replies]

    return await asyncio.to_thread(run)


def check(message: dict[str, Any], finish_reason: str | None, schemas: dict[str, str | None],
          tool_choice: Any = None, deadline: float = float("inf"), custom: frozenset[str] = frozenset(),
          turn: toolschema.TurnValidators | None = None) -> Verdict:
    if finish_reason == "length":
        return Verdict(False, "truncated", "the reply was cut off at the token limit")
    calls = _calls(message)
    content = message.get("content")
    if not calls and not (isinstance(content, str) and content.strip()) and not message.get("refusal"):
        return Verdict(False, "empty", "the reply has neither content nor a tool call")
    if calls and tool_choice == "none":
        return Verdict(False, "tool_choice", "tool_choice is 'none' but the reply calls a tool")
    if not calls and tool_choice == "required":
        return Verdict(False, "tool_choice", "tool_choice is 'required' but the reply calls no tool")
    forced = _forced(tool_choice)
    unchecked = OK
    for call in calls:
        if isinstance(call, dict) and call.get("type") == "custom":
            verdict = _check_custom_call(call, custom, forced)
        else:
            verdict = _check_call(call, schemas, forced, deadline, turn)
        if not verdict.ok:
            return verdict
        unchecked = unchecked if unchecked.reason else verdict
    return unchecked


def _calls(message: dict[str, Any]) -> list[Any]:
    calls = message.get("tool_calls")
    return calls if isinstance(calls, list) else []


def _forced(tool_choice: Any) -> tuple[str, str] | None:
    """(kind, name) of the tool a tool_choice demands: {"type": "function"|"custom", <type>: {"name"}}."""
    if isinstance(tool_choice, dict):
        kind = "custom" if tool_choice.get("type") == "custom" else "function"
        spec = tool_choice.get(kind)
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return kind, spec["name"]
    return None


def _check_custom_call(call: dict[str, Any], custom: frozenset[str], forced: tuple[str, str] | None) -> Verdict:
    spec = call.get("custom")
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or name not in custom:
        return Verdict(False, "unknown_tool", f"the custom tool {name!r} is not among the declared tools")
    if forced and forced != ("custom", name):
        return Verdict(False, "tool_choice", f"tool_choice demands {forced[1]!r} but the reply calls {name!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("input"), str):
        return Verdict(False, "bad_json", f"the input of {name} is not text")
    return OK


def _check_call(call: Any, schemas: dict[str, str | None], forced: tuple[str, str] | None,
                deadline: float, turn: toolschema.TurnValidators | None) -> Verdict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return Verdict(False, "bad_json", "a tool call has no function object")
    name = fn.get("name")
    if not isinstance(name, str) or name not in schemas:
        return Verdict(False, "unknown_tool", f"the tool {name!r} is not among the declared tools")
    if forced and forced != ("function", name):
        return Verdict(False, "tool_choice", f"tool_choice demands {forced[1]!r} but the reply calls {name!r}")
    raw = fn.get("arguments")
    try:
        args = wirejson.loads(raw) if isinstance(raw, str) else raw
    except wirejson.WireJSONError as e:
        return Verdict(False, "bad_json", f"arguments of {name} are not valid JSON: {e}")
    if not isinstance(args, dict):
        return Verdict(False, "bad_json", f"arguments of {name} are not a JSON object")
    schema = schemas[name]
    if not schema:
        return OK
    try:
        error = toolschema.first_error(schema, args, deadline, turn)
    except toolschema.Unchecked as e:
        return Verdict(True, e.reason, f"arguments of {name} were not checked against its schema ({e.reason})")
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        message = error.message if len(error.message) <= _DETAIL_CHARS else error.message[:_DETAIL_CHARS] + "..."
        return Verdict(False, "schema", f"arguments of {name} break its schema at {where}: {message}")
    return OK
