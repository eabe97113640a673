"""What a tool call does to the world, judged from its name, and whether it matches a gold action.

A *write* call changes state (book, cancel, modify, refund...); reads (get_, find_, list_, search_,
calculate, think, transfer to a human) do not. The labels of training data, the evaluation and
`turngate replay` all use this one rule.
"""

from __future__ import annotations

import json
from typing import Any

READ_PREFIXES = ("get_", "find_", "list_", "search_", "calculate", "think", "transfer_to_human")


def is_write(name: str) -> bool:
    return not name.startswith(READ_PREFIXES)


def call_arguments(call: dict[str, Any]) -> Any:
    raw = (call.get("function") or {}).get("arguments")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def matches_gold(call: dict[str, Any], gold_actions: list[dict[str, Any]]) -> bool:
    """Same tool name and the same arguments (as JSON values) as one of the gold actions."""
    name = (call.get("function") or {}).get("name")
    args = call_arguments(call)
    return any(g.get("name") == name and g.get("arguments") == args for g in gold_actions)


def gold_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The gold actions of a trajectory row's own task.

    In the τ²-bench files a row's `gold_actions` belong to another task than its conversation,
    while `action_checks` (each gold action of the conversation's task and whether the agent made
    it) match it; so `action_checks` win when a row has them.
    """
    checks = row.get("action_checks")
    if checks:
        return [{"name": c["name"], "arguments": c.get("arguments")} for c in checks]
    return row.get("gold_actions") or []


def write_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in message.get("tool_calls") or [] if is_write((c.get("function") or {}).get("name", ""))]
