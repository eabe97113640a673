"""Upstream faults as the client sees them: turngate's own upstream key refused (502 upstream_auth,
no upstream text), the client's forwarded key refused (its 401), and connection resets, retried
once only when no response byte had arrived."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import openai
import pytest

from service.demo.fake_actor import Reply, assistant, completion_body
from tests.test_metrics import delta, scrape

USER = [{"role": "user", "content": "Book a table for two."}]
SECRET = "org-7f3a internal shard eu-west-4b"  # upstream internals that must not reach the client


def client(url: str, key: str = "sk-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def refuse(status: int) -> Callable:
    return lambda body, i: Reply(raw=json.dumps({"error": {
        "message": f"Incorrect API key provided: sk-ro***ey. {SECRET}", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}), status=status)


@pytest.mark.parametrize("status", [401, 403])
def test_the_routes_own_upstream_key_refused_is_a_502_without_upstream_text(gateway, scripted, status):
    scripted.fn = refuse(status)
    with gateway(upstream_api_key="sk-route-key") as (url, sink):
        before = scrape(url)
        with pytest.raises(openai.InternalServerError) as info:
            client(url).chat.completions.create(model="gpt-test", messages=USER)
        after = scrape(url)
    err = info.value
    assert err.status_code == 502 and err.code == "upstream_auth" and err.type == "upstream_error"
    assert SECRET not in err.response.text and "sk-ro" not in err.response.text
    assert "Incorrect API key" not in err.message and f"HTTP {status}" in err.message
    assert delta(before, after, "turngate_upstream_errors_total", route="gpt-test", kind="auth") == 4
    record = sink.records[0]
    assert record.decision == "error" and {e.kind for e in record.upstream_errors} == {"auth"}


def test_a_forwarded_client_key_refused_stays_the_clients_401(gateway, scripted, actor):
    scripted.fn = refuse(401)
    with gateway() as (url, _), pytest.raises(openai.AuthenticationError) as info:
        client(url, "sk-clients-own").chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert actor[0].requests  # it did go upstream, with the client's key


# -- connection resets ---------------------------------------------------------------------------

class RawUpstream:
    """A minimal HTTP/1.1 upstream on loopback whose behaviour per request the test scripts:
    `plan(connection_no, request_no_on_that_connection)` returns "ok", "close" (read the request,
    then reset the connection without a byte of response) or "partial" (send the status line, the
    headers and half the body, then reset)."""

    def __init__(self, plan: Callable[[int, int], str]) -> None:
        self.plan = plan
        self.connections = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_no = self.connections
        self.connections += 1
        request_no = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                action = self.plan(conn_no, request_no)
                request_no += 1
                body = json.dumps(completion_body([assistant("ok")], "actor-model")).encode()
                head_out = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
                if action == "ok":
                    writer.write(head_out + body)
                    await writer.drain()
                    continue
                if action == "partial":
                    writer.write(head_out + body[: len(body) // 2])
                    await writer.drain()
                _reset(writer)
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or recycling server does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextmanager
def raw_upstream(plan: Callable[[int, int], str]) -> Iterator[tuple[RawUpstream, str]]:
    upstream = RawUpstream(plan)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        holder["server"], holder["port"] = server, server.sockets[0].getsockname()[1]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()),
                              daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield upstream, f"http://127.0.0.1:{holder['port']}/v1"
    finally:
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def passthrough(gateway, url: str):
    # One pool, so the second turn reuses the first turn's kept-alive connection.
    return gateway(upstream_base_url=url, mode="passthrough", settings={"upstream_pool_shards": 1})


def test_a_kept_alive_connection_reset_before_any_reply_is_retried_once(gateway):
    # The keep-alive race: the upstream drops the pooled connection as the next request goes out.
    with raw_upstream(lambda conn, req: "close" if (conn, req) == (0, 1) else "ok") as (up, url), \
            passthrough(gateway, url) as (base, sink):
        before = scrape(base)
        for _ in range(2):
            reply = client(base).chat.completions.create(model="gpt-test", messages=USER)
            assert reply.choices[0].message.content == "ok"
        after = scrape(base)
    assert up.connections == 2 and up.requests == 3  # the reset request, then its retry on a new connection
    assert delta(before, after, "turngate_upstream_retries_total", route="gpt-test",
                 reason="stale_connection") == 1
    assert [r.upstream_errors for r in sink.records] == [[], []]


def test_a_reset_after_reply_bytes_arrived_is_never_retried(gateway):
    with raw_upstream(lambda conn, req: "partial") as (up, url), passthrough(gateway, url) as (base, _), \
            pytest.raises(openai.InternalServerError) as info:
        client(base).chat.completions.create(model="gpt-test", messages=USER)
    assert info.value.status_code == 502 and info.value.code == "upstream_connect"
    assert up.requests == 1


def test_a_fresh_connection_reset_after_the_request_went_out_is_not_retried(gateway):
    # The upstream had the whole request on a new connection: it may be working on it.
    with raw_upstream(lambda conn, req: "close") as (up, url), passthrough(gateway, url) as (base, _), \
            pytest.raises(openai.InternalServerError):
        client(base).chat.completions.create(model="gpt-test", messages=USER)
    assert up.requests == 1


def test_connection_refused_is_retried_once(gateway):
    with gateway(upstream_base_url="http://127.0.0.1:1/v1", mode="passthrough") as (base, _):
        before = scrape(base)
        with pytest.raises(openai.InternalServerError) as info:
            client(base).chat.completions.create(model="gpt-test", messages=USER)
        after = scrape(base)
    assert info.value.code == "upstream_connect"
    assert delta(before, after, "turngate_upstream_retries_total", route="gpt-test", reason="connect") == 1
