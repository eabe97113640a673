"""turngate's HTTP/1.1 upstream transport (service.upstream.transport) against real loopback servers:
kept-alive reuse, the three ways a body ends, what is and is not reused, the failures a caller tells
apart (and through the gateway: the one retry of a stale connection, garbage as a 502), TLS with
verification on, and the cap on connections."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import openai
import pytest

from service.demo.fake_actor import assistant, completion_body
from service.upstream import transport
from tests.test_metrics import delta, scrape

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
BODY = json.dumps(completion_body([assistant("ok")], "actor-model")).encode()
USER = [{"role": "user", "content": "Book a table for two."}]


class RawServer:
    """A loopback server whose connections `handler(reader, writer, connection_no)` serves."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        try:
            await self.handler(reader, writer, number)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        self.requests += 1
        return head + body


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%b\r\n%b"
            % (len(body), extra, body))


@asynccontextmanager
async def serving(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[RawServer, str]]:
    server = RawServer(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}/v1/chat/completions"
    finally:
        listener.close()


def keep_answering(server_ref: list[RawServer], reply: bytes = ok()) -> Handler:
    async def handle(reader, writer, _):
        while True:
            await server_ref[0].read_request(reader)
            writer.write(reply)
            await writer.drain()
    return handle


async def call(pools: transport.ConnectionPools, url: str, wire: transport.Wire | None = None,
               timeout: float | None = None) -> bytes:
    resp = await pools.request(b"POST", url, [(b"content-type", b"application/json")], b"{}", wire=wire,
                               timeout=timeout)
    assert resp.status == 200
    return await resp.aread()


@asynccontextmanager
async def answering(reply: bytes = ok()) -> AsyncIterator[tuple[RawServer, str]]:
    ref: list[RawServer] = []
    async with serving(keep_answering(ref, reply)) as (server, url):
        ref.append(server)
        yield server, url


# -- bodies and keep-alive ------------------------------------------------------------------------

async def test_sequential_calls_share_one_kept_alive_connection():
    pools = transport.ConnectionPools()
    async with answering() as (server, url):
        wires = [transport.Wire() for _ in range(5)]
        for wire in wires:
            assert await call(pools, url, wire) == BODY
    await pools.aclose()
    assert server.connections == 1 and server.requests == 5
    assert [w.connected for w in wires] == [True, False, False, False, False]
    assert all(w.sent is not None and w.received is not None and w.received >= w.sent for w in wires)


async def test_a_chunked_body_is_joined_and_its_connection_reused():
    pieces = [BODY[:10], BODY[10:40], BODY[40:]]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n" + chunked
    pools = transport.ConnectionPools()
    async with answering(reply) as (server, url):
        assert await call(pools, url) == BODY
        assert await call(pools, url) == BODY
    await pools.aclose()
    assert server.connections == 1


async def test_a_body_without_a_length_ends_with_the_connection_and_is_not_reused():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + BODY)
        await writer.drain()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        assert await call(pools, url) == BODY
        assert await call(pools, url) == BODY
    await pools.aclose()
    assert server.connections == 2


async def test_connection_close_is_honoured():
    pools = transport.ConnectionPools()
    async with answering(ok(extra=b"connection: close\r\n")) as (server, url):
        assert await call(pools, url) == BODY
        assert await call(pools, url) == BODY
    await pools.aclose()
    assert server.connections == 2


async def test_an_interim_1xx_reply_is_skipped():
    pools = transport.ConnectionPools()
    async with answering(b"HTTP/1.1 100 Continue\r\n\r\n" + ok()) as (server, url):
        assert await call(pools, url) == BODY
        assert await call(pools, url) == BODY
    await pools.aclose()
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_dropped_not_used():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await asyncio.sleep(0.05)  # then closes it, idle (a server's keep-alive timeout)

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        assert await call(pools, url) == BODY
        await asyncio.sleep(0.3)
        wire = transport.Wire()
        assert await call(pools, url, wire) == BODY  # no failure: the closed one left the pool
    await pools.aclose()
    assert wire.connected and server.connections == 2 and server.requests == 2


async def test_a_stream_closed_before_its_end_is_not_reused():
    async def handle(reader, writer, number):
        await server.read_request(reader)
        if number == 0:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            await reader.read()  # holds the connection until the client closes it
            return
        writer.write(ok())
        await writer.drain()
        await reader.read()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        resp = await pools.request(b"POST", url, [], b"{}")
        first = await anext(resp.aiter_stream())
        assert first == b"x" * 1000
        await resp.aclose()
        wire = transport.Wire()
        assert await call(pools, url, wire) == BODY
    await pools.aclose()
    assert wire.connected and server.connections == 2


async def test_a_stream_not_read_holds_the_upstream_back_then_arrives_whole():
    size = 32 * 1024 * 1024  # far past what the transport buffers and the sockets hold
    written = [0]

    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"y" * 65536)
            await writer.drain()
            written[0] += 65536
        await server.read_request(reader)
        writer.write(ok())

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        resp = await pools.request(b"POST", url, [], b"{}")
        await asyncio.sleep(0.3)  # a slow client: nothing read
        assert written[0] < size / 2  # the upstream was made to wait, not buffered in full
        got = 0
        async for piece in resp.aiter_stream():
            got += len(piece)
        assert got == size
        assert await call(pools, url) == BODY  # read to its end: the connection went back, reading again
    await pools.aclose()
    assert server.connections == 1


# -- failures -------------------------------------------------------------------------------------

async def test_a_kept_alive_connection_closed_as_the_request_went_out_is_stale():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(ok())
        await writer.drain()
        await server.read_request(reader)  # the next request: closed without a byte of reply

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        assert await call(pools, url) == BODY
        with pytest.raises(transport.StaleConnection):
            await call(pools, url)
    await pools.aclose()


async def test_a_fresh_connection_closed_before_the_reply_is_broken_not_stale():
    async def handle(reader, writer, _):
        await server.read_request(reader)

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        with pytest.raises(transport.ConnectionBroken):
            await call(pools, url)
    await pools.aclose()


async def test_a_reset_mid_body_is_broken():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(ok()[: -len(BODY) // 2])
        await writer.drain()
        writer.transport.abort()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        with pytest.raises(transport.ConnectionBroken):
            await call(pools, url)
    await pools.aclose()
    assert server.requests == 1


async def test_a_garbage_status_line_is_protocol_garbage():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await reader.read()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        with pytest.raises(transport.ProtocolGarbage):
            await call(pools, url)
    await pools.aclose()


async def test_endless_headers_are_protocol_garbage():
    """An upstream that sends headers without end is cut off at the head's cap, not read until the timeout."""
    async def handle(reader, writer, _):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(20_000):
            writer.write(b"x-filler-%d: %s\r\n" % (i, b"y" * 100))
            await writer.drain()
        await reader.read()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        with pytest.raises(transport.ProtocolGarbage):
            await call(pools, url, timeout=10)
    await pools.aclose()


async def test_slow_headers_time_out_and_the_connection_is_not_reused():
    async def handle(reader, writer, number):
        await server.read_request(reader)
        if number == 0:
            await asyncio.sleep(1.0)
        writer.write(ok())
        await writer.drain()
        await reader.read()

    pools = transport.ConnectionPools()
    async with serving(handle) as (server, url):
        with pytest.raises(transport.TransportTimeout):
            await call(pools, url, timeout=0.2)
        assert await call(pools, url, timeout=2) == BODY
    await pools.aclose()
    assert server.connections == 2


async def test_a_refused_connection_is_a_connect_failure():
    pools = transport.ConnectionPools()
    with pytest.raises(transport.ConnectFailed):
        await call(pools, "http://127.0.0.1:1/v1/chat/completions")


# -- the cap on connections -----------------------------------------------------------------------

async def test_calls_over_the_cap_wait_for_a_connection_then_succeed():
    async def handle(reader, writer, _):
        while True:
            await server.read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(ok())
            await writer.drain()

    pools = transport.ConnectionPools(max_connections=2)
    async with serving(handle) as (server, url):
        assert await asyncio.gather(*(call(pools, url) for _ in range(8))) == [BODY] * 8
    await pools.aclose()
    assert server.connections == 2 and server.requests == 8


async def test_a_wait_for_a_connection_past_the_timeout_is_a_pool_timeout():
    async def handle(reader, writer, _):
        await server.read_request(reader)
        await asyncio.sleep(1.0)

    pools = transport.ConnectionPools(max_connections=1)
    async with serving(handle) as (server, url):
        first = asyncio.create_task(call(pools, url))
        await asyncio.sleep(0.05)
        with pytest.raises(transport.PoolTimeout):
            await call(pools, url, timeout=0.1)
        first.cancel()
    await pools.aclose()


# -- TLS ------------------------------------------------------------------------------------------

def self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turngate test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_verifies_the_upstreams_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    ref: list[RawServer] = []
    async with serving(keep_answering(ref), server_ctx) as (server, url):
        ref.append(server)
        untrusting = transport.ConnectionPools()  # the system's CAs: a self-signed certificate fails
        with pytest.raises(transport.ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await call(untrusting, url)
        trusting = transport.ConnectionPools(ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert await call(trusting, url) == BODY
        assert await call(trusting, url) == BODY
        await trusting.aclose()
    assert server.requests == 2


# -- through the gateway --------------------------------------------------------------------------

@contextmanager
def threaded(handler_for: Callable[[RawServer], Handler]) -> Iterator[tuple[RawServer, str]]:
    """A RawServer on its own thread's loop (the gateway runs on another), base URL /v1."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def start() -> None:
        server = RawServer(lambda r, w, n: handler_for(server)(r, w, n))
        listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
        holder.update(server=server, listener=listener, port=listener.sockets[0].getsockname()[1])
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield holder["server"], f"http://127.0.0.1:{holder['port']}/v1"
    finally:
        loop.call_soon_threadsafe(holder["listener"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_kept_alive_connection_closed_under_the_gateway_is_retried_once(gateway):
    def handler_for(server: RawServer) -> Handler:
        async def handle(reader, writer, number):
            await server.read_request(reader)
            writer.write(ok())
            await writer.drain()
            if number == 0:
                await server.read_request(reader)  # the second turn's request: closed unanswered
                return
            await reader.read()
        return handle

    with threaded(handler_for) as (server, url), \
            gateway(upstream_base_url=url, mode="passthrough") as (base, _):
        client = openai.OpenAI(base_url=base, api_key="sk-client", max_retries=0)
        before = scrape(base)
        for _ in range(2):
            assert client.chat.completions.create(model="gpt-test", messages=USER).choices[0].message.content == "ok"
        after = scrape(base)
    assert server.connections == 2 and server.requests == 3
    assert delta(before, after, "turngate_upstream_retries_total", route="gpt-test",
                 reason="stale_connection") == 1


def test_a_garbage_reply_is_a_502(gateway):
    def handler_for(server: RawServer) -> Handler:
        async def handle(reader, writer, _):
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 OK-ish\r\n\r\n")
            await writer.drain()
            await reader.read()
        return handle

    with threaded(handler_for) as (server, url), \
            gateway(upstream_base_url=url, mode="passthrough") as (base, _), \
            pytest.raises(openai.InternalServerError) as info:
        openai.OpenAI(base_url=base, api_key="sk-client", max_retries=0).chat.completions.create(
            model="gpt-test", messages=USER)
    assert info.value.status_code == 502
    assert server.requests == 1  # garbage is never retried
