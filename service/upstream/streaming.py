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
    """Cuts SSE events out of the byte pieces of a response body (any line ending), in time linear
    in the bytes: each piece is scanned once, however many pieces an event takes."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # the buffer's bytes already searched for an event's end
        self._cr = False  # the last piece ended in CR: it may be the first half of a CRLF

    def feed(self, piece: bytes) -> list[Event]:
        if self._cr:
            piece, self._cr = b"\r" + piece, False
        if piece.endswith(b"\r"):
            piece, self._cr = piece[:-1], True
        piece = piece.replace(b"\r\n", b"\n")
        buffer = self._buffer
        data: bytes | bytearray = piece  # the usual case: nothing left over, events whole in the piece
        if buffer:
            buffer += piece
            data = buffer
        events = []
        start = 0
        at = max(self._scanned - 1, 0)  # an event's end may straddle the last piece and this one
        while (end := data.find(b"\n\n", at)) >= 0:
            block = bytes(data[start:end])
            if block.strip():
                events.append(_event(block))
            start = at = end + 2
        if data is buffer:
            del buffer[:start]
        else:
            buffer += piece[start:]
        self._scanned = len(buffer)
        if len(buffer) > MAX_EVENT_BYTES:
            raise StreamGarbage(f"an event over {MAX_EVENT_BYTES} bytes")
        return events

    def close(self) -> list[Event]:
        """The last event, when the body ended without its blank line."""
        block = bytes(self._buffer) + (b"\r" if self._cr else b"")
        self._buffer, self._scanned, self._cr = bytearray(), 0, False
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
    # A text field's pieces, joined once by body(): adding each to the text so far would copy the
    # text again for every delta, the square of the reply's length.
    texts: dict[str, list[str]] = field(default_factory=dict)
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
                if key not in state.texts:
                    so_far = state.message.get(key)
                    state.texts[key] = [so_far] if isinstance(so_far, str) else []
                    state.message[key] = ""  # its place among the message's fields
                state.texts[key].append(value)
            elif value is not None:
                state.texts.pop(key, None)
                state.message[key] = value
        if c.get("finish_reason") is not None:
            state.finish_reason = c["finish_reason"]
        for key, value in c.items():
            if key == "logprobs" and isinstance(value, dict):
                logprobs = state.other.setdefault("logprobs", {})
                for part, entries in value.items():  # content, refusal: token lists, one piece per chunk
                    if isinstance(entries, list):
                        if not isinstance(logprobs.get(part), list):
                            logprobs[part] = []
                        logprobs[part].extend(entries)
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
            message.update((key, "".join(pieces)) for key, pieces in state.texts.items())
            if state.calls:
                message["tool_calls"] = [_joined(state.calls[k]) for k in sorted(state.calls)]
            choices.append({"index": index, "message": message, "finish_reason": state.finish_reason,
                            "logprobs": None, **state.other})
        return {**self.top, "object": "chat.completion", "choices": choices}


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """A tool-call delta into the call so far: text pieces (arguments, a custom tool's input) are
    gathered in a list (_Pieces) that _joined joins once; ids, types and names are set once."""
    for key, value in delta.items():
        if isinstance(value, dict):
            inner = into.get(key)
            if not isinstance(inner, dict):
                inner = into[key] = {}
            _merge(inner, value)
        elif isinstance(value, str) and key not in ("id", "type", "name") and isinstance(into.get(key), str | _Pieces):
            so_far = into[key]
            if isinstance(so_far, str):
                so_far = into[key] = _Pieces([so_far])
            so_far.append(value)
        elif value is not None and not (key in ("id", "type", "name") and into.get(key)):
            into[key] = value


class _Pieces(list):
    """A tool call's text field while its deltas arrive."""


def _joined(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call with its gathered text pieces joined."""
    return {k: "".join(v) if isinstance(v, _Pieces) else _joined(v) if isinstance(v, dict) else v
            for k, v in call.items()}
