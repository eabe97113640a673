"""The tokens a forwarded reply (embeddings, completions, responses) reports, charged to the client
key's spend (service.limits.spend) once the reply is sent.

A JSON reply is parsed after it went out (a large one on a worker thread); a stream is watched as
it is relayed, and only its events that mention "usage" are parsed: the usage chunk of a completion
stream that asked for stream_options.include_usage, the response.completed event of a Responses
stream. A reply without usage is not charged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from service.gate.usage import is_token_count
from service.limits.spend import SpendMeter

log = logging.getLogger(__name__)

_PARSE_OFF_LOOP_BYTES = 64 * 1024
_MAX_EVENT_BYTES = 1 << 20  # an event longer than this is not looked into
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def tokens_of(usage: Any) -> int | None:
    """total_tokens, else prompt + completion (Chat, Completions, Embeddings), else input + output
    (Responses)."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if is_token_count(total):
        return total
    for parts in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        values = [v for k in parts if is_token_count(v := usage.get(k))]
        if values:
            return sum(values)
    return None


def usage_of(body: Any) -> Any:
    """A body's usage: top level, or the response's of a Responses event."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("usage"), dict):
        return body["usage"]
    response = body.get("response")
    return response.get("usage") if isinstance(response, dict) else None


class Tap:
    """Watches a relayed SSE stream for the event that reports usage; keeps the last one's tokens.
    Each piece is searched once (from the last event's end on), so a long event costs its length."""

    def __init__(self) -> None:
        self.tokens: int | None = None
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> None:
        pending = self._pending
        at = max(len(pending) - 3, 0)  # an event's end ("\r\n\r\n" at most) may straddle two pieces
        pending += chunk
        start = 0
        while (end := _EVENT_END.search(pending, at)) is not None:
            if pending.find(b'"usage"', start, end.start()) >= 0:
                self._look_into(bytes(pending[start:end.start()]))
            start = at = end.end()
        del pending[:start]
        if len(pending) > _MAX_EVENT_BYTES:
            pending.clear()  # not looked into; the rest of it then reads as garbage, and is relayed

    def _look_into(self, event: bytes) -> None:
        try:
            self._read(event)
        except Exception:  # a stream turngate cannot read is still relayed
            log.debug("could not read a forwarded stream's usage", exc_info=True)

    def _read(self, event: bytes) -> None:
        data = b"\n".join(line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:"))
        tokens = tokens_of(usage_of(json.loads(data))) if data and data != b"[DONE]" else None
        if tokens is not None:
            self.tokens = tokens


class Meter:
    """Charges one forwarded reply's tokens to its client key."""

    def __init__(self, spend: SpendMeter | None, key_id: str | None) -> None:
        self.spend, self.key_id = spend, key_id
        self._tap = Tap()

    def tap(self) -> Tap:
        return self._tap

    async def charge(self) -> None:
        await self._charge(self._tap.tokens)

    async def charge_body(self, content: bytes) -> None:
        if self.spend is None or self.key_id is None or b'"usage"' not in content:
            return
        try:
            body = await asyncio.to_thread(json.loads, content) if len(content) > _PARSE_OFF_LOOP_BYTES \
                else json.loads(content)
        except ValueError:
            return
        await self._charge(tokens_of(usage_of(body)))

    async def _charge(self, tokens: int | None) -> None:
        if self.spend is None or self.key_id is None or not tokens:
            return
        try:
            await self.spend.charge(self.key_id, tokens)
        except Exception:  # never fails a reply already sent
            log.exception("could not charge a forwarded reply to its key")
