"""uvicorn's httptools protocol, with a response's head and its body leaving in one write.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the
body on the next message: two send() system calls and, on loopback or a LAN, two packets for the
client to wake up for. For a response with a Content-Length (every JSON answer turngate gives) the
body follows at once, so the head is held for it and both go out together (a small saving of
system CPU: bench/proxy_threads.py with and without `--http httptools`, docs/proxy.md).
Streams (chunked), empty bodies and HEAD answers are written as uvicorn writes them; a head still
held when the connection is closed is written first.

It also bounds how a request arrives, before the app or any key check sees it: its head (request
line and headers) at most MAX_HEAD_BYTES (a longer URL is a 414, a longer head a 431) and
HEAD_TIMEOUT_S from the connection's start, or the request's first byte, to the head's end; its body
never idle for BODY_IDLE_TIMEOUT_S (both 408, the connection closed). httptools buffers an
unfinished header line or URL whole, and uvicorn waits for a head or a body without end: one
connection could otherwise grow the process without bound, or hold a connection with a byte now
and then.

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


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class OneWriteProtocol(HttpToolsProtocol):
    MAX_HEAD_BYTES = 64 * 1024
    HEAD_TIMEOUT_S = 30.0  # a head's whole time, from its first byte (or the connection's start)
    BODY_IDLE_TIMEOUT_S = 30.0  # the longest pause between two pieces of a request's body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.url = b""  # uvicorn sets it at a request's first byte; bytes before that (CRLFs) are head too
        self._reading: str | None = "head"  # what of a request is being read: "head", "body" or None
        self._head_bytes = 0
        self._head_started = self._last_in = self.loop.time()
        # One timer a connection, armed when a request begins and none is due sooner: it re-arms
        # itself while a request is being read (no timer made and cancelled for every request).
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self._head_started + self.HEAD_TIMEOUT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_in = self.loop.time()
        HttpToolsProtocol.data_received(self, data)  # not super(): this runs for every piece of every request
        if self._reading != "head" or self.transport.is_closing():
            return
        # Counted whole: a pipelined request's tail in the same piece counts toward the next head.
        self._head_bytes += len(data)
        if len(self.url) > self.MAX_HEAD_BYTES:
            self._refuse(414, "request_uri_too_long", f"The request's URL is over {self.MAX_HEAD_BYTES} bytes.")
        elif self._head_bytes > self.MAX_HEAD_BYTES:
            self._refuse(431, "request_head_too_large",
                         f"The request line and headers are over {self.MAX_HEAD_BYTES} bytes.")

    def on_message_begin(self) -> None:
        HttpToolsProtocol.on_message_begin(self)
        self._reading, self._head_bytes, self._head_started = "head", 0, self.loop.time()
        at = self._head_started + self.HEAD_TIMEOUT_S
        if self._timer is None or self._timer.when() > at:  # inline: this runs for every request
            self._arm(at)

    def _arm(self, at: float) -> None:
        """The timer due at `at` (instead of a later one)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._check_time)

    def _check_time(self) -> None:
        self._timer = None
        if self._reading == "body" and (self.cycle is None or not self.cycle.more_body):
            self._reading = None  # the body is all in
        if self._reading is None or self.transport.is_closing():
            return  # between requests: uvicorn's keep-alive timeout closes an idle connection
        now = self.loop.time()
        if self._reading == "head":
            left = self._head_started + self.HEAD_TIMEOUT_S - now
        elif self.flow.read_paused:  # the app has not taken what came: the client is not the one waiting
            left = self.BODY_IDLE_TIMEOUT_S
        else:
            left = self._last_in + self.BODY_IDLE_TIMEOUT_S - now
        if left > 0:
            self._arm(now + left)
        elif self._reading == "head":
            self._refuse(408, "request_timeout",
                         f"The request's headers did not arrive within {self.HEAD_TIMEOUT_S:g} s.")
        else:  # the app waiting for the body sees the client gone (http.disconnect)
            self._refuse(408, "request_timeout",
                         f"No bytes of the request's body arrived for {self.BODY_IDLE_TIMEOUT_S:g} s.")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """An answer in OpenAI's error format, then the connection closed: the request cannot be read."""
        self._reading = None
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse (a bad chunk size, two Content-Lengths, a control byte in a
        header): uvicorn's answer is plain text; clients of this API read OpenAI's format."""
        self._refuse(400, "invalid_http_request", f"The request could not be read as HTTP/1.1 ({msg.rstrip('.')}).")

    def on_headers_complete(self) -> None:
        self._reading = "body"  # until the cycle has it all (more_body False), at once without a body
        at = self._last_in + self.BODY_IDLE_TIMEOUT_S
        if self._timer is None or self._timer.when() > at:
            self._arm(at)
        super().on_headers_complete()
        # The cycle was just made and its task not yet run: it writes through the holder from the start.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _HeldHead):
            cycle.transport = _HeldHead(self.transport, cycle)  # type: ignore[assignment]
