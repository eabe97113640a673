"""uvicorn's httptools protocol, with a response's head and its body leaving in one write.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the
body on the next message: two send() system calls and, on loopback or a LAN, two packets for the
client to wake up for. For a response with a Content-Length (every JSON answer turngate gives) the
body follows at once, so the head is held for it and both go out together (a small saving of
system CPU: bench/proxy_threads.py with and without `--http httptools`, docs/proxy.md).
Streams (chunked), empty bodies and HEAD answers are written as uvicorn writes them; a head still
held when the connection is closed is written first.

It also bounds each request's head (request line and headers), before the app or any key check
sees it: at most MAX_HEAD_BYTES (a longer URL is a 414, a longer head a 431) and HEAD_TIMEOUT_S from
the connection's start, or the request's first byte, to the head's end (408). httptools buffers an
unfinished header line or URL whole, and uvicorn waits for a head without end: one connection could
otherwise grow the process without bound, or hold a connection with a byte now and then.

Run with `uvicorn --http service.api.onewrite:OneWriteProtocol` (turngate serve does).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

NAME = "service.api.onewrite:OneWriteProtocol"


class _HeldHead:
    """The transport one request's cycle writes through: its head waits for the body's first part."""

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        # Weak: the cycle holds this transport, and a cycle of references would leave every
        # request's objects to the cyclic GC instead of freeing them when the request ends.
        self._cycle = weakref.ref(cycle)
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif not self._started and (cycle := self._cycle()) is not None and cycle.response_started:
            # The head, written by the start message once uvicorn has read the framing headers.
            self._started = True
            if cycle.chunked_encoding is False and cycle.expected_content_length > 0 \
                    and cycle.scope["method"] != "HEAD":  # uvicorn writes no body for HEAD
                self._head = data
                return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:  # the app failed after its start message: as uvicorn, head then close
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, abort, pause_reading, ...
        return getattr(self._transport, name)


_REASONS = {408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class OneWriteProtocol(HttpToolsProtocol):
    MAX_HEAD_BYTES = 64 * 1024
    HEAD_TIMEOUT_S = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.url = b""  # uvicorn sets it at a request's first byte; bytes before that (CRLFs) are head too
        self._in_head = True  # a head is being read: from the connection's start, then each request's
        self._head_bytes = 0
        self._head_started = self.loop.time()
        # One timer a connection, armed when a head begins and none is: it re-arms itself for the
        # head being read then, if any (no timer made and cancelled for every request).
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.HEAD_TIMEOUT_S, self._head_check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # Counted whole: a pipelined request's tail in the same piece counts toward the next head.
        self._head_bytes += len(data)
        if len(self.url) > self.MAX_HEAD_BYTES:
            self._refuse(414, "request_uri_too_long", f"The request's URL is over {self.MAX_HEAD_BYTES} bytes.")
        elif self._head_bytes > self.MAX_HEAD_BYTES:
            self._refuse(431, "request_head_too_large",
                         f"The request line and headers are over {self.MAX_HEAD_BYTES} bytes.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._head_started = True, 0, self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.HEAD_TIMEOUT_S, self._head_check)

    def _head_check(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return  # between requests: uvicorn's keep-alive timeout closes an idle connection
        left = self._head_started + self.HEAD_TIMEOUT_S - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_check)
        else:
            self._refuse(408, "request_timeout",
                         f"The request's headers did not arrive within {self.HEAD_TIMEOUT_S:g} s.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """An answer in OpenAI's error format, then the connection closed: its head cannot be read."""
        self._in_head = False
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        # The cycle was just made and its task not yet run: it writes through the holder from the start.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _HeldHead):
            cycle.transport = _HeldHead(self.transport, cycle)  # type: ignore[assignment]
