"""The upstream's event stream: SSE events cut from the bytes as they arrive, and the chat
completion the chunks add up to.

Events are kept as the upstream wrote them (`raw`), so a relay forwards them unchanged; `data` is
the parsed JSON of their data field, which the assembler reads to record the turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service import wirejson

# One event past this size is not a chat chunk: the stream is garbage, not a reason to buffer on.
MAX_EVENT_BYTES = 8 * 1024 * 1024


class StreamGarbage(ValueError):
    pass


@dataclass
class Event:
    raw: bytes  # the event as sent, with its terminating blank line
    data: Any = None  # the data field's JSON (None for comments, [DONE] and data that is not JSON)
    done: bool = False  # data: [DONE]


class Decoder:
    """Cuts SSE events out of the byte pieces of a response body (any line ending)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, piece: bytes) -> list[Event]:
        # CRLF turned to LF on the joined buffer, so a pair split across pieces is still seen.
        self._buffer = (self._buffer + piece).replace(b"\r\n", b"\n")
        events = []
        while (end := self._buffer.find(b"\n\n")) >= 0:
            block, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            if block.strip():
                events.append(_event(block))
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise StreamGarbage(f"an event over {MAX_EVENT_BYTES} bytes")
        return events

    def close(self) -> list[Event]:
        """The last event, when the body ended without its blank line."""
        block, self._buffer = self._buffer, b""
        return [_event(block.rstrip(b"\n"))] if block.strip() else []


def _event(block: bytes) -> Event:
    data_lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    event = Event(block + b"\n\n")
    if not data_lines:
        return event  # a comment (": keepalive") or a field turngate does not read
    text = b"\n".join(data_lines)
    if text.strip() == b"[DONE]":
        event.done = True
        return event
    try:
        event.data = wirejson.loads_upstream(text)
    except ValueError:
        raise StreamGarbage(f"an event whose data is not JSON: {text[:80]!r}") from None
    return event


@dataclass
class _Choice:
    message: dict[str, Any] = field(default_factory=lambda: {"role": "assistant", "content": None})
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # by the delta's index
    finish_reason: str | None = None
    other: dict[str, Any] = field(default_factory=dict)  # the choice's other fields (logprobs, vendor ones)


class Assembler:
    """The ChatCompletion that a stream's chunks add up to: the message of each choice (content,
    refusal and any other text field joined, tool calls by index), its logprobs, the last non-null
    value of every other field, and the usage chunk."""

    def __init__(self) -> None:
        self.top: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        for key, value in chunk.items():
            if key not in ("choices", "object") and value is not None:
                self.top[key] = value
        for c in chunk.get("choices") or ():
            if isinstance(c, dict):
                self._add_choice(c)

    def _add_choice(self, c: dict[str, Any]) -> None:
        at = c.get("index")
        state = self._choices.setdefault(at if isinstance(at, int) else 0, _Choice())
        raw = c.get("delta")
        delta: dict[str, Any] = raw if isinstance(raw, dict) else {}
        for key, value in delta.items():
            if key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):
                        given = call.get("index")
                        index = given if isinstance(given, int) else len(state.calls)
                        _merge(state.calls.setdefault(index, {}), {k: v for k, v in call.items() if k != "index"})
            elif isinstance(value, str) and key != "role":
                state.message[key] = (state.message.get(key) or "") + value
            elif value is not None:
                state.message[key] = value
        if c.get("finish_reason") is not None:
            state.finish_reason = c["finish_reason"]
        for key, value in c.items():
            if key == "logprobs" and isinstance(value, dict):
                logprobs = state.other.setdefault("logprobs", {})
                for part, entries in value.items():  # content, refusal: token lists, one piece per chunk
                    if isinstance(entries, list):
                        logprobs[part] = (logprobs.get(part) or []) + entries
                    else:
                        logprobs.setdefault(part, entries)
            elif key not in ("index", "delta", "finish_reason", "logprobs") and value is not None:
                state.other[key] = value

    def body(self) -> dict[str, Any]:
        """The ChatCompletion so far (a cut stream gives what had arrived)."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message = dict(state.message)
            if state.calls:
                message["tool_calls"] = [state.calls[k] for k in sorted(state.calls)]
            choices.append({"index": index, "message": message, "finish_reason": state.finish_reason,
                            "logprobs": None, **state.other})
        return {**self.top, "object": "chat.completion", "choices": choices}


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """A tool-call delta into the call so far: text pieces (arguments, a custom tool's input) are
    joined; ids, types and names are set once."""
    for key, value in delta.items():
        if isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        elif isinstance(value, str) and key not in ("id", "type", "name") and isinstance(into.get(key), str):
            into[key] += value
        elif value is not None and not (key in ("id", "type", "name") and into.get(key)):
            into[key] = value
