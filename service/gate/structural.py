"""The structural critic: cheap, always-on checks that veto a candidate outright.

A candidate is vetoed when it is empty, was cut off (finish_reason "length"), calls a tool the
request did not declare, passes arguments that are not a JSON object or break the tool's declared
JSON Schema, or ignores a tool_choice that forbids or demands a call. The reason is a short code
(a bounded metric label); the detail is the human-readable message the intervention feeds back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jsonschema import validators
from jsonschema.exceptions import SchemaError


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None
    detail: str | None = None


OK = Verdict(True)


@lru_cache(maxsize=1024)
def _validator(schema_json: str):
    """A compiled validator per distinct schema; agents send the same tools every turn."""
    schema = json.loads(schema_json)
    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def tool_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any] | None]:
    """Function name -> its parameters schema (None when the tool declares none)."""
    out: dict[str, dict[str, Any] | None] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters")
    return out


def check(message: dict[str, Any], finish_reason: str | None,
          schemas: dict[str, dict[str, Any] | None], tool_choice: Any = None) -> Verdict:
    if finish_reason == "length":
        return Verdict(False, "truncated", "the reply was cut off at the token limit")
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if not calls and not (isinstance(content, str) and content.strip()) and not message.get("refusal"):
        return Verdict(False, "empty", "the reply has neither content nor a tool call")
    if calls and tool_choice == "none":
        return Verdict(False, "tool_choice", "tool_choice is 'none' but the reply calls a tool")
    if not calls and tool_choice == "required":
        return Verdict(False, "tool_choice", "tool_choice is 'required' but the reply calls no tool")
    forced = _forced_function(tool_choice)
    for call in calls:
        verdict = _check_call(call, schemas, forced)
        if not verdict.ok:
            return verdict
    return OK


def _forced_function(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if isinstance(fn, dict):
            return fn.get("name")
    return None


def _check_call(call: dict[str, Any], schemas: dict[str, dict[str, Any] | None],
                forced: str | None) -> Verdict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return Verdict(False, "bad_json", "a tool call is not an object with a function")
    name = fn.get("name")
    if name not in schemas:
        return Verdict(False, "unknown_tool", f"the tool {name!r} is not among the declared tools")
    if forced and name != forced:
        return Verdict(False, "tool_choice", f"tool_choice demands {forced!r} but the reply calls {name!r}")
    raw = fn.get("arguments")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        return Verdict(False, "bad_json", f"arguments of {name} are not valid JSON: {e.msg}")
    if not isinstance(args, dict):
        return Verdict(False, "bad_json", f"arguments of {name} are not a JSON object")
    schema = schemas[name]
    if not schema:
        return OK
    try:
        validator = _validator(json.dumps(schema, sort_keys=True))
    except SchemaError:
        return OK  # the client's own schema is broken: not the candidate's fault
    error = next(iter(validator.iter_errors(args)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return Verdict(False, "schema", f"arguments of {name} break its schema at {where}: {error.message}")
    return OK
