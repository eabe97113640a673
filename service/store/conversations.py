"""Which conversation a turn belongs to.

Agents resend the whole history every turn, so a turn is linked to its conversation by, in order:
1. the explicit id: the `x-turngate-conversation-id` header, else the request's
   `metadata.conversation_id`, `metadata.session_id` or `metadata.thread_id` (METADATA_KEYS);
2. the message prefix: this turn's request messages up to and including the last assistant message
   equal the previous turn's request messages plus the reply turngate chose. Every written turn
   registers hash(request messages + chosen reply) -> conversation (conversation_links table);
   the next turn looks up hash(its messages up to its last assistant message).
3. otherwise the turn starts a new conversation.

Hashes are scoped by the client key digest and the request's `user`, so two clients sending the
same prompts never share a conversation. Messages are normalized before hashing (role, text,
tool calls by name and canonical arguments, tool_call_id, name) so that a client resending the
reply with cosmetic differences (null vs missing content, extra fields, argument spacing) still
matches. Every id here is derived deterministically, so replaying a turn threads it the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from service.gate.record import TurnRecord

METADATA_KEYS = ("conversation_id", "session_id", "thread_id")


@dataclass(frozen=True)
class ThreadKeys:
    explicit_id: str | None  # conversation id derived from an explicit client id
    external_id: str | None  # the client's own id, kept on the conversation row
    lookup_hash: str | None  # prefix hash to look up; None on a first turn
    link_hash: str | None  # what the next turn will look up; None without a chosen reply
    index: int  # assistant messages before this turn = its position in the conversation


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def normalize(message: dict[str, Any]) -> str:
    """The parts of a message that identify it, as one string (cheap: this runs on every message
    of every turn's history)."""
    parts = [str(message.get("role")), _text(message.get("content")), str(message.get("tool_call_id") or ""),
             str(message.get("name") or "")]
    for c in message.get("tool_calls") or ():
        fn = c.get("function") or {}
        parts.append(str(fn.get("name")))
        args = _args(fn.get("arguments"))
        parts.append(args if isinstance(args, str) else json.dumps(args, sort_keys=True, separators=(",", ":")))
    return "\x1f".join(parts)


def _feed(h: hashlib._Hash, message: dict[str, Any]) -> None:
    h.update(normalize(message).encode("utf-8", "surrogatepass"))
    h.update(b"\x1e")


def _id(prefix: str, *parts: str | None) -> str:
    return prefix + hashlib.sha256("\x1f".join(p or "" for p in parts).encode()).hexdigest()[:32]


def explicit_id(record: TurnRecord) -> str | None:
    hint = record.conversation
    if hint.header_id:
        return str(hint.header_id)
    meta = hint.metadata if isinstance(hint.metadata, dict) else {}
    return next((str(meta[k]) for k in METADATA_KEYS if meta.get(k)), None)


def conversation_id_for_external(external_id: str, key_id: str | None) -> str:
    return _id("conv-", "x", key_id, external_id)


def new_conversation_id(turn_id: str) -> str:
    return _id("conv-", "t", turn_id)


def thread_keys(record: TurnRecord) -> ThreadKeys:
    hint = record.conversation
    messages = record.request_messages or []
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    h = hashlib.sha256()
    h.update(json.dumps([hint.key_id, hint.user if isinstance(hint.user, str) else None]).encode())
    lookup = None
    for i, m in enumerate(messages):
        _feed(h, m)
        if i == last_assistant:
            lookup = h.hexdigest()
    chosen = record.chosen
    link = None
    if chosen is not None:
        _feed(h, chosen.message)
        link = h.hexdigest()
    external = explicit_id(record)
    return ThreadKeys(conversation_id_for_external(external, hint.key_id) if external else None,
                      external, lookup, link, sum(1 for m in messages if m.get("role") == "assistant"))
