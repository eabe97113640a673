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
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, NamedTuple

from service.gate.record import TurnRecord

METADATA_KEYS = ("conversation_id", "session_id", "thread_id")


class ThreadKeys(NamedTuple):  # one per turn written: cheaper to build than a frozen dataclass
    explicit_id: str | None  # conversation id derived from an explicit client id
    external_id: str | None  # the client's own id, kept on the conversation row
    lookup_hash: str | None  # prefix hash to look up; None on a first turn
    link_hash: str | None  # what the next turn will look up; None without a chosen reply
    idx: int  # assistant messages before this turn = its position in the conversation (turns.idx)


# Histories are client data: any shape must hash (deterministically) rather than raise, since a
# record the writer cannot thread would never be written. Well-formed messages hash as before.
def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(_part_text(p) for p in content)
    return str(content)


def _part_text(part: Any) -> str:
    if isinstance(part, dict):
        text = part.get("text", "")
        return text if isinstance(text, str) else str(text)
    return str(part)


def _args(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments
    return arguments


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):  # mixed key types, odd objects, deep nesting
        return repr(value)


def normalize(message: Any) -> str:
    """The parts of a message that identify it, as one string (cheap: this runs on every message
    of every turn's history)."""
    if not isinstance(message, dict):
        return "\x1f" + _canonical(message)
    parts = [str(message.get("role")), _text(message.get("content")), str(message.get("tool_call_id") or ""),
             str(message.get("name") or "")]
    calls = message.get("tool_calls")
    for c in calls if isinstance(calls, list) else ():
        fn = (c.get("function") or {}) if isinstance(c, dict) else c
        if isinstance(fn, dict):
            parts.append(str(fn.get("name")))
            parts.append(_canonical(_args(fn.get("arguments"))))
        else:  # a function given as a bare value (a name) instead of {name, arguments}
            parts.append(_canonical(fn))
            parts.append("")
    return "\x1f".join(parts)


def _feed(h: hashlib._Hash, message: dict[str, Any]) -> None:
    h.update(normalize(message).encode("utf-8", "surrogatepass"))
    h.update(b"\x1e")


def _id(prefix: str, *parts: str | None) -> str:
    joined = "\x1f".join("" if p is None else str(p) for p in parts)
    return prefix + hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def explicit_id(record: TurnRecord) -> str | None:
    hint = record.conversation
    if hint.header_id:
        return str(hint.header_id)
    meta = hint.metadata if isinstance(hint.metadata, dict) else {}
    return next((str(meta[k]) for k in METADATA_KEYS if meta.get(k)), None)


def conversation_id_for_external(external_id: str, key_id: str | None) -> str:
    return _id("conv-", "x", key_id, external_id)


def new_conversation_id(turn_id: str, created_at: Any) -> str:
    """A new conversation's id: its first turn's time, then a hash of that turn's id (the same
    length as the ids of earlier releases, which stay valid). Time first: new conversations sort
    after older ones, so their rows and index entries (conversations, turns by conversation, links)
    are appended to each B-tree instead of dirtying a random page of it each."""
    return "conv-" + _millis_hex(created_at) + _id("", "t", turn_id)[:20]


def _millis_hex(ts: Any) -> str:
    """A unix time in milliseconds as 12 hex digits; deterministic (0) for a value that is not a time."""
    try:
        ms = int(float(ts) * 1000)
    except (TypeError, ValueError, OverflowError):
        ms = 0
    return f"{min(max(ms, 0), 16**12 - 1):012x}"


def thread_keys(record: TurnRecord) -> ThreadKeys:
    hint = record.conversation
    messages = record.request_messages if isinstance(record.request_messages, list) else []
    last_assistant, assistants = -1, 0
    for i, m in enumerate(messages):
        if _role(m) == "assistant":
            last_assistant, assistants = i, assistants + 1
    h = hashlib.sha256()
    h.update(_who(hint.key_id, hint.user if isinstance(hint.user, str) else None).encode("utf-8", "surrogatepass"))
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
                      external, lookup, link, assistants)


def _who(key_id: Any, user: str | None) -> str:
    """json.dumps([key_id, user], default=str): the start of every prefix hash (so it must never
    change). Built directly for the usual text or None, the same bytes at a fraction of the cost."""
    if key_id is None or type(key_id) is str:
        return (f"[{'null' if key_id is None else _json_str(key_id)}, "
                f"{'null' if user is None else _json_str(user)}]")
    return json.dumps([key_id, user], default=str)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None
