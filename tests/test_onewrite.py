"""The HTTP protocol turngate serves with (service/api/onewrite.py): what reaches the socket, write by
write, for each kind of answer. A recording transport stands in for the socket, so the writes are
counted exactly (two writes sent back to back would often arrive as one read on a real socket)."""

from __future__ import annotations

import asyncio
import gc

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.server import ServerState

from service.api import onewrite


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def chunks():
    yield b"data: 1\n\n"
    await asyncio.sleep(0)
    yield b"data: 2\n\n"


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def fails_after_start(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
    raise RuntimeError("the app broke half way")


async def app(scope, receive, send) -> None:
    if scope["path"] == "/broken":
        return await fails_after_start(scope, receive, send)
    await ROUTES(scope, receive, send)


ROUTES = Starlette(routes=[
        Route("/json", lambda r: JSONResponse({"ok": True}), methods=["GET", "HEAD"]),
        Route("/empty", lambda r: Response(status_code=204)),
        Route("/stream", lambda r: StreamingResponse(chunks(), media_type="text/event-stream")),
        Route("/echo", echo, methods=["POST"]),
    ])


async def exchange(request: bytes) -> RecordingTransport:
    config = Config(app=app, http=onewrite.NAME, log_level="critical", lifespan="off")
    config.load()
    assert config.http_protocol_class is onewrite.OneWriteProtocol  # what uvicorn makes of the name
    protocol = onewrite.OneWriteProtocol(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(200):  # until the answer is complete (or the connection closed)
        await asyncio.sleep(0.001)
        if transport.closed or (protocol.cycle is not None and protocol.cycle.response_complete):
            break
    return transport


def test_a_json_answer_leaves_in_one_write():
    t = asyncio.run(exchange(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert len(t.writes) == 1
    head, body = t.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
    assert body == b'{"ok":true}'


def test_a_request_body_is_echoed_with_its_head_in_one_write():
    t = asyncio.run(exchange(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"))
    assert len(t.writes) == 1 and t.writes[0].endswith(b"\r\n\r\nhello")


def test_head_requests_and_empty_bodies_still_get_their_head():
    head = asyncio.run(exchange(b"HEAD /json HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert b"".join(head.writes).startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head.writes[0]
    empty = asyncio.run(exchange(b"GET /empty HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert b"".join(empty.writes).startswith(b"HTTP/1.1 204 No Content")


def test_a_stream_sends_its_head_before_its_first_chunk():
    t = asyncio.run(exchange(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in t.writes[0]
    assert b"data: 1" in t.writes[1] and b"data: 2" in b"".join(t.writes[2:])


def test_an_app_failing_after_its_start_gets_its_head_out_before_the_close():
    t = asyncio.run(exchange(b"GET /broken HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert t.closed
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK")


def test_a_finished_request_is_freed_without_the_cyclic_gc():
    """The held-head transport and its request's cycle must not hold each other: every request's
    objects would otherwise wait for a full GC pass (a stall of the event loop) to be freed."""
    async def two_requests_on_one_connection() -> int:
        config = Config(app=app, http=onewrite.NAME, log_level="critical", lifespan="off")
        config.load()
        protocol = onewrite.OneWriteProtocol(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        for _ in range(2):
            protocol.data_received(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
            while protocol.cycle is None or not protocol.cycle.response_complete:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # the first request's task is done and gone
        assert len(transport.writes) == 2
        return sum(isinstance(o, RequestResponseCycle) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        assert asyncio.run(two_requests_on_one_connection()) == 1  # the connection's current one only
    finally:
        gc.enable()
