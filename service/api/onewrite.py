"""uvicorn's httptools protocol, with a response's head and its body leaving in one write.

uvicorn writes the status line and headers as soon as the app sends `http.response.start`, and the
body on the next message: two send() system calls and, on loopback or a LAN, two packets for the
client to wake up for. For a response with a Content-Length (every JSON answer turngate gives) the
body follows at once, so the head is held for it and both go out together (a small saving of
system CPU: bench/proxy_threads.py with and without `--http httptools`, docs/proxy.md).
Streams (chunked), empty bodies and HEAD answers are written as uvicorn writes them; a head still
held when the connection is closed is written first.

Run with `uvicorn --http service.api.onewrite:OneWriteProtocol` (turngate serve does).
"""

from __future__ import annotations

import asyncio
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


class OneWriteProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The cycle was just made and its task not yet run: it writes through the holder from the start.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _HeldHead):
            cycle.transport = _HeldHead(self.transport, cycle)  # type: ignore[assignment]
