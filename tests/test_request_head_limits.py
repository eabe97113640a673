"""A request's head (its request line and headers) is bounded in size and in time, before any
authentication: httptools buffers an unfinished header line or URL whole, and uvicorn waits for a
head without end. Before, one connection sending an endless header grew the process without bound,
and a connection that sent nothing, or a byte now and then, was held forever.

Raw sockets here: no HTTP client sends such heads."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from service.api.onewrite import OneWriteProtocol

LIMIT = OneWriteProtocol.MAX_HEAD_BYTES


def connect(base_url: str) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def reply(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, the JSON error, everything after it) once the server closed the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return status, json.loads(body[:length]), body[length:]


def response_head(sock: socket.socket) -> bytes:
    """A response's status line and headers, the connection left open."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    return head


def test_a_header_over_the_limit_is_a_431_and_the_connection_closes(gateway):
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (LIMIT + 4096))
        status, body, rest = reply(sock)
    assert status == 431 and rest == b""
    assert body["error"]["code"] == "request_head_too_large" and str(LIMIT) in body["error"]["message"]


def test_many_small_headers_over_the_limit_are_a_431(gateway):
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * (LIMIT // 8 + 100))
        status, body, _ = reply(sock)
    assert status == 431 and body["error"]["type"] == "invalid_request_error"


def test_a_url_over_the_limit_is_a_414(gateway):
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(b"GET /healthz?" + b"q" * (LIMIT + 4096))
        status, body, _ = reply(sock)
    assert status == 414 and body["error"]["code"] == "request_uri_too_long"


def test_an_endless_header_stops_being_read(gateway):
    """The server hangs up after about the limit, however much the client would send."""
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: ")
        sent = 0
        with pytest.raises(OSError):  # BrokenPipe or ConnectionReset: the server closed
            while sent < 64 << 20:
                sock.sendall(b"a" * 65536)
                sent += 65536
                time.sleep(0.001)
    assert sent < 16 << 20  # the limit, plus what the socket buffers held


def test_heads_under_the_limit_are_served(gateway):
    with gateway() as (url, _), connect(url) as sock:
        big = b"a" * (LIMIT - 1024)
        for _ in range(2):  # twice on one kept-alive connection
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
            assert response_head(sock).startswith(b"HTTP/1.1 200")


@pytest.fixture
def head_timeout(monkeypatch):
    monkeypatch.setattr(OneWriteProtocol, "HEAD_TIMEOUT_S", 0.5)


@pytest.mark.parametrize("sent", [b"", b"\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
def test_a_head_not_finished_in_time_is_a_408(gateway, head_timeout, sent):
    with gateway() as (url, _), connect(url) as sock:
        start = time.monotonic()
        sock.sendall(sent)
        status, body, _ = reply(sock)
        waited = time.monotonic() - start
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert 0.4 < waited < 5


def test_a_kept_alive_connection_has_the_time_limit_for_each_head_not_for_all(gateway, head_timeout):
    with gateway() as (url, _), connect(url) as sock:
        for _ in range(4):  # 4 x 0.3 s: over the head's limit in all, each head well within it
            time.sleep(0.3)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response_head(sock).startswith(b"HTTP/1.1 200")


@pytest.fixture
def body_timeout(monkeypatch):
    monkeypatch.setattr(OneWriteProtocol, "BODY_IDLE_TIMEOUT_S", 0.5)


CHAT = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()


def chat_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def test_a_body_that_stops_coming_is_a_408(gateway, body_timeout):
    with gateway(mode="passthrough") as (url, sink), connect(url) as sock:
        start = time.monotonic()
        sock.sendall(chat_head(len(CHAT)) + CHAT[:10])
        status, body, _ = reply(sock)
        waited = time.monotonic() - start
    assert status == 408 and body["error"]["code"] == "request_timeout" and "body" in body["error"]["message"]
    assert 0.4 < waited < 5 and sink.records == []


def test_a_body_that_keeps_coming_slowly_is_served(gateway, body_timeout):
    with gateway(mode="passthrough") as (url, _), connect(url) as sock:
        sock.sendall(chat_head(len(CHAT)))
        step = len(CHAT) // 8 + 1
        for i in range(0, len(CHAT), step):  # 8 pieces 0.2 s apart: 1.6 s in all, each gap under 0.5 s
            time.sleep(0.2)
            sock.sendall(CHAT[i:i + step])
        assert response_head(sock).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("head", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
], ids=["bad chunk size", "two content lengths", "control byte in a header"])
def test_a_request_http_cannot_parse_is_a_400_in_openais_format(gateway, head):
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(head)
        status, body, _ = reply(sock)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_http_request"


@pytest.mark.parametrize("path", [b"POST /v1/chat/completions/", b"GET /admin/", b"GET /v1/admin/keys/"])
def test_a_trailing_slash_is_an_unknown_url_not_a_redirect_to_the_clients_host(gateway, path):
    with gateway() as (url, _), connect(url) as sock:
        sock.sendall(path + b" HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"404" and b"location" not in head.lower()
    assert json.loads(body)["error"]["code"] == "unknown_url"
