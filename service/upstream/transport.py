"""HTTP/1.1 to the upstream: kept-alive connections on asyncio's own transports, parsed by httptools.

Why not httpcore (httpx's transport): on the passthrough path a quarter of the proxy's CPU went to
its machinery around the bytes (anyio cancel scopes, h11's events, a select() per pooled connection
on every request and release). Here a request is one `transport.write` and its reply is parsed in
the protocol's `data_received`; nothing runs per connection but the one in use.

One pool per origin (scheme, host, port). Idle connections wait on a LIFO (the most recently used
is the likeliest still open): O(1) take and release. A connection the peer closed while idle is
known from its protocol's callbacks (`eof_received`, `connection_lost`) and leaves the pool then.
Connections per origin are capped; a request over the cap waits for one (`PoolTimeout` past its
timeout). An idle connection expires after `keepalive_expiry` seconds. A reply not read to its end
never goes back to the pool: its connection is closed.

Failures are this module's exceptions, which say what a caller may retry:
- ConnectFailed: no connection (refused, reset, name, TLS); nothing was sent.
- UnsupportedURL: not an http(s) URL; nothing was tried.
- StaleConnection: a reused kept-alive connection closed before a byte of reply came (the
  keep-alive race: the peer dropped it as the request went out).
- ConnectionBroken: closed after the request went out on a fresh connection, or mid-reply.
- ProtocolGarbage: the reply is not HTTP/1.1.
- TransportTimeout (also a TimeoutError; PoolTimeout is one): connect, pool wait, head or a read.

`Wire` is where a request notes what crossed the socket: whether it opened its connection, when its
bytes were handed to the socket, when the latest reply bytes came in (service.upstream.client).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

# Body bytes buffered, unread, at which the socket stops being read (a slow stream consumer), and
# below which it is read again.
_PAUSE_AT = 256 * 1024
_RESUME_AT = 64 * 1024
# A reply's status line and headers past this are garbage, not a reply (h11, which turngate used
# before, stopped at 16 KiB): an upstream streaming headers must not grow memory until the timeout.
_MAX_HEAD = 64 * 1024


class TransportError(Exception):
    pass


class ConnectFailed(TransportError):
    pass


class UnsupportedURL(TransportError):
    pass


class StaleConnection(TransportError):
    pass


class ConnectionBroken(TransportError):
    pass


class ProtocolGarbage(TransportError):
    pass


class ReplyTooLarge(Exception):
    """A reply body over the reader's limit: the upstream answered, with more than turngate holds."""


class TransportTimeout(TransportError, TimeoutError):
    pass


class PoolTimeout(TransportTimeout):
    pass


class Wire:
    """What one request saw on the wire (perf_counter() times)."""

    __slots__ = ("connected", "received", "sent")

    def __init__(self) -> None:
        self.connected = False  # the request opened its connection
        self.sent: float | None = None  # the request's bytes handed to the socket
        self.received: float | None = None  # the latest reply bytes in


@functools.lru_cache(maxsize=256)
def _target(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """(origin, request target, Host header) of a URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UnsupportedURL(f"not an http(s) URL: {url[:80]!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (scheme, parts.hostname, port), path.encode(), parts.netloc.rpartition("@")[2].encode()


class Response:
    """A reply: status and headers once `request` returns; the body then, read whole (`aread`) or
    piece by piece (`aiter_stream`). Close it (`aclose`) unless it was read to its end."""

    __slots__ = ("_buffered", "_conn", "_done", "_error", "_got_bytes", "_paused", "_pieces", "_read_timeout",
                 "_waiter", "_wire", "content", "head_bytes", "headers", "status")

    def __init__(self, conn: _Connection, wire: Wire | None, read_timeout: float | None) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # the headers' size so far (_MAX_HEAD)
        self.content = b""  # the body, once `aread` has read it
        self._conn: _Connection | None = conn  # None once the reply is all in (or failed)
        self._wire = wire
        self._read_timeout = read_timeout
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._done = False
        self._error: TransportError | None = None
        self._got_bytes = False
        self._waiter: asyncio.Future[None] | None = None

    async def aread(self, limit: int | None = None) -> bytes:
        """The whole body; ReplyTooLarge (the connection closed) once it is over `limit` bytes."""
        pieces, size = [], 0
        while (piece := await self._next()) is not None:
            size += len(piece)
            if limit is not None and size > limit:
                await self.aclose()
                raise ReplyTooLarge(f"upstream reply over {limit} bytes (upstream_max_reply_bytes)")
            pieces.append(piece)
        self.content = b"".join(pieces)
        return self.content

    async def aiter_stream(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """The body piece by piece; ReplyTooLarge (the connection closed) once it is over `limit` bytes."""
        size = 0
        while (piece := await self._next()) is not None:
            size += len(piece)
            if limit is not None and size > limit:
                await self.aclose()
                raise ReplyTooLarge(f"upstream reply over {limit} bytes (upstream_max_reply_bytes)")
            yield piece

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # not read to its end: the connection's state is unknown
            conn.response = None
            conn.close()

    async def _next(self) -> bytes | None:
        """The next body piece; None at the body's end."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            await self._wait(self._read_timeout, "no reply bytes")
        piece = self._pieces.popleft()
        self._buffered -= len(piece)
        if self._paused and self._buffered < _RESUME_AT:
            self._paused = False
            if self._conn is not None and self._conn.transport is not None:
                self._conn.transport.resume_reading()
        return piece

    async def _wait(self, timeout: float | None, what: str) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            raise TransportTimeout(f"{what} within {timeout:g}s") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: TransportError) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()


class _Connection(asyncio.Protocol):
    """One connection: the protocol asyncio calls, and the httptools parser's callbacks, which feed
    the reply in progress (`response`)."""

    def __init__(self, pool: _OriginPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.open = True  # False once either side closed it
        self.used = False  # has carried a request before the current one
        self.idle_since = 0.0
        self.in_pool = False  # on its pool's idle LIFO
        self.counted = False  # holds one of its pool's connection slots (from a connect's success)
        self._keep_alive = False
        self._spoiled = False  # more than one reply came for one request
        self._interim = False  # the message being parsed is a 1xx interim reply, skipped

    # -- asyncio --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for: the connection can't be trusted with the next request
            self.close()
            return
        resp._got_bytes = True
        if resp._wire is not None:
            resp._wire.received = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._failed(ProtocolGarbage(f"the upstream's reply is not HTTP/1.1 ({e})"))
            return
        if resp._done and self.response is resp:
            self.response = None
            resp._conn = None
            if resp._paused:  # an idle connection must read, to see its peer close it
                resp._paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            if self._keep_alive and self.open and not self._spoiled:
                self.pool.release(self)
            else:
                self.close()

    def eof_received(self) -> bool:
        self._closed_by_peer(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_peer(exc)
        self.pool.discard(self)

    # -- httptools --

    def on_message_begin(self) -> None:
        resp = self.response
        if resp is not None and (resp.status or resp._done):
            self._spoiled = True

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.response
        if resp is not None and not resp._done:
            resp.head_bytes += len(name) + len(value)
            if resp.head_bytes > _MAX_HEAD:  # raised through feed_data: data_received's ProtocolGarbage
                raise ValueError(f"headers over {_MAX_HEAD} bytes")
            resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is not None and not resp.status:
            status = self.parser.get_status_code()
            if 100 <= status < 200:  # 100 Continue and the like: the reply proper follows
                self._interim = True
                resp.headers.clear()
                return
            resp.status = status
            resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is None or resp._done:
            return
        resp._pieces.append(body)
        resp._buffered += len(body)
        if resp._buffered > _PAUSE_AT and not resp._paused and self.transport is not None:
            resp._paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self.response
        if resp is not None and not resp._done:
            self._keep_alive = self.parser.should_keep_alive()
            resp._done = True
            resp._wake()

    # -- its own --

    def send(self, data: bytes, resp: Response) -> None:
        self.response = resp
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()
        self.pool.discard(self)

    def _closed_by_peer(self, exc: Exception | None) -> None:
        self.open = False
        resp = self.response
        if resp is None:
            self.pool.discard(self)
            return
        if resp.status and _close_delimited(resp) and exc is None:
            resp._done = True  # a body without a length ends with the connection
            resp._wake()
            self.response, resp._conn = None, None
        elif not resp._got_bytes and self.used:
            self._failed(StaleConnection("a kept-alive connection closed before the reply"))
        else:
            when = "mid-reply" if resp._got_bytes else "before the reply"
            why = f": {type(exc).__name__}" if exc is not None else ""
            self._failed(ConnectionBroken(f"the connection closed {when}{why}"))

    def _failed(self, error: TransportError) -> None:
        resp = self.response
        if resp is not None:
            self.response, resp._conn = None, None
            resp._fail(error)
        self.close()


def _close_delimited(resp: Response) -> bool:
    """A reply whose body has no stated length (none ends at the connection's close otherwise)."""
    if resp.status < 200 or resp.status in (204, 304):
        return False
    return not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in resp.headers)


class _OriginPool:
    """The connections to one origin."""

    def __init__(self, origin: tuple[str, str, int], max_connections: int, keepalive_expiry: float,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.scheme, self.host, self.port = origin
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.idle: collections.deque[_Connection] = collections.deque()  # oldest left, newest right
        self.count = 0  # connections open or opening
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self, timeout: float | None, wire: Wire | None) -> _Connection:
        deadline: float | None = None  # for the wait for a free connection, however many turns it takes
        waited = False
        while True:
            idle = self.idle
            while idle:
                conn = idle.pop()
                conn.in_pool = False
                if conn.open and time.monotonic() - conn.idle_since < self.keepalive_expiry:
                    conn.used = True
                    return conn
                conn.close()
            if self.count < self.max_connections:
                self.count += 1
                return await self._connect(timeout, wire)
            if timeout is not None and deadline is None:
                deadline = asyncio.get_running_loop().time() + timeout
            # Woken but beaten to the connection by a newcomer: back at the front of the queue.
            await self._wait_turn(timeout, deadline, front=waited)
            waited = True

    async def _wait_turn(self, timeout: float | None, deadline: float | None, front: bool) -> None:
        waiter = asyncio.get_running_loop().create_future()
        if front:
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but gone: the turn passes on
            if isinstance(e, TimeoutError):
                raise PoolTimeout(f"no connection to {self.host}:{self.port} free within {timeout:g}s") from None
            raise

    async def _connect(self, timeout: float | None, wire: Wire | None) -> _Connection:
        loop = asyncio.get_running_loop()
        ssl_context = self.ssl_context if self.scheme == "https" else None
        if wire is not None:
            wire.connected = True
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=ssl_context,
                    server_hostname=self.host if ssl_context is not None else None)
        except TimeoutError:
            self._slot_freed()
            raise TransportTimeout(f"no connection to {self.host}:{self.port} within {timeout:g}s") from None
        except OSError as e:  # refused, reset, unknown name, TLS verification (ssl.SSLError is one)
            self._slot_freed()
            raise ConnectFailed(f"{type(e).__name__}: {e}") from e
        except BaseException:
            self._slot_freed()
            raise
        if not conn.open:  # closed as it opened
            self._slot_freed()
            raise ConnectFailed("the connection closed as it opened")
        conn.counted = True
        return conn

    def release(self, conn: _Connection) -> None:
        now = time.monotonic()
        idle = self.idle
        while idle and now - idle[0].idle_since >= self.keepalive_expiry:  # the oldest, expired
            idle[0].close()
        conn.idle_since = now
        conn.in_pool = True
        idle.append(conn)
        self._wake_one()

    def discard(self, conn: _Connection) -> None:
        """The connection is closed: out of the pool, its slot free (once)."""
        if conn.in_pool:
            conn.in_pool = False
            self.idle.remove(conn)  # rare (the peer closed an idle connection): O(idle) is fine
        if conn.counted:
            conn.counted = False
            self._slot_freed()

    def _slot_freed(self) -> None:
        self.count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        while self.idle:
            self.idle[-1].close()


class ConnectionPools:
    """The pools of all upstream origins; `request` is one HTTP/1.1 exchange over them."""

    def __init__(self, max_connections: int = 1024, keepalive_expiry: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections  # per origin
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, str, int], _OriginPool] = {}

    async def request(self, method: bytes, url: str, headers: list[tuple[bytes, bytes]], body: bytes, *,
                      timeout: float | None = None, wire: Wire | None = None) -> Response:
        """Sends the request (Host and Content-Length added) and returns once the reply's status and
        headers are in, its body unread. `timeout` bounds each wait (a free connection, the connect,
        the head, each body read); None: the caller bounds the whole (asyncio.timeout)."""
        origin, path, host = _target(url)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _OriginPool(origin, self.max_connections, self.keepalive_expiry,
                                                     self._ssl() if origin[0] == "https" else None)
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (method, path, host, len(body))]
        for name, value in headers:
            if b"\r" in value or b"\n" in value:
                raise ValueError(f"header {name!r}: a line break in its value")
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        lines.append(body)
        conn = await pool.take(timeout, wire)
        resp = Response(conn, wire, timeout)
        conn.send(b"".join(lines), resp)
        if wire is not None:
            wire.sent = time.perf_counter()
        try:
            while not resp.status:
                if resp._error is not None:
                    raise resp._error
                await resp._wait(timeout, "no reply")
        except BaseException:
            await resp.aclose()  # cancelled or failed before the head: never reused
            raise
        return resp

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # built once: loading the CA bundle costs milliseconds
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
