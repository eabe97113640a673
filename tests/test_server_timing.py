"""Server-Timing's `upstream` is the time the upstream spent as turngate sees it on the wire: request
written to reply read. turngate's own work before the send and after the receive is not in it."""

from __future__ import annotations

import time

import httpx
import pytest

from service.demo.fake_actor import Reply
from service.upstream import client as upstream_client
from service.upstream.client import UpstreamWait, _Call


def server_timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


@pytest.mark.parametrize("mode", ["passthrough", "rank"])
def test_upstream_timing_leaves_out_turngates_own_work(gateway, scripted, monkeypatch, mode):
    upstream_s, own_s = 0.15, 0.1
    scripted.fn = lambda body, i: Reply([{"role": "assistant", "content": "ok"}], delay_s=upstream_s)
    payload, parse = upstream_client._payload, upstream_client._parse
    calls = {"payload": 0, "parse": 0}

    # turngate's own work before the first send and after the last receive, made big enough to see.
    # Work between one candidate's receive and another's would delay the other's receive (a busy loop
    # counts, see UpstreamWait), so none is put there.
    def slow_payload(*args, **kwargs):
        calls["payload"] += 1
        if calls["payload"] == 1:
            time.sleep(own_s)
        return payload(*args, **kwargs)

    def slow_parse(*args, **kwargs):
        calls["parse"] += 1
        if calls["parse"] == calls["payload"]:
            time.sleep(own_s)
        return parse(*args, **kwargs)

    monkeypatch.setattr(upstream_client, "_payload", slow_payload)
    monkeypatch.setattr(upstream_client, "_parse", slow_parse)
    with gateway(mode=mode, candidates=1 if mode == "passthrough" else 2) as (url, _):
        resp = httpx.post(url + "/chat/completions", timeout=10,
                          json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    t = server_timing(resp.headers["server-timing"])
    # The actor's sleep plus loopback and its own request handling; not the 2 x 100 ms of ours.
    assert upstream_s <= t["upstream"] / 1000 < upstream_s + 0.08, t
    assert t["total"] - t["upstream"] - t["critic"] >= 2 * own_s * 1000 * 0.9, t


def test_a_streamed_turns_upstream_time_runs_from_the_request_written_to_the_last_piece(gateway, scripted,
                                                                                        monkeypatch):
    first_s, gap_s, own_s = 0.1, 0.02, 0.1
    scripted.fn = lambda body, i: Reply([{"role": "assistant", "content": "one two three four"}], delay_s=first_s,
                                        chunk_delay_s=gap_s)
    payload = upstream_client._payload

    def slow_payload(*args, **kwargs):
        time.sleep(own_s)
        return payload(*args, **kwargs)

    monkeypatch.setattr(upstream_client, "_payload", slow_payload)
    with gateway(mode="passthrough", candidates=1) as (url, sink):
        with httpx.stream("POST", url + "/chat/completions", timeout=10, json={
                "model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            text = "".join(resp.iter_text())
        assert resp.status_code == 200 and "[DONE]" in text
        deadline = time.monotonic() + 5
        while not sink.records and time.monotonic() < deadline:
            time.sleep(0.01)
    record = sink.records[0]
    streamed = first_s + 3 * gap_s  # four words: the first after first_s, one every gap_s after it
    assert record.latency_upstream_ms is not None and record.latency_total_ms is not None
    assert streamed <= record.latency_upstream_ms / 1000 < streamed + 0.08, record.latency_upstream_ms
    assert record.latency_total_ms - record.latency_upstream_ms >= own_s * 1000 * 0.9


def call(sent: float | None, ended: float | None) -> _Call:
    c = _Call()
    c.sent, c.received, c.ended = sent, ended, ended
    return c


def test_upstream_wait_is_the_union_of_the_calls_spans():
    wait = UpstreamWait()
    for c in (call(0.0, 5.0), call(1.0, 3.0), call(4.0, 7.0), call(10.0, 12.0), call(None, 20.0)):
        wait.add(c)
    assert wait.seconds() == pytest.approx(9.0)  # [0, 7] and [10, 12]; the call never sent is none of it
    wait.add(call(11.0, None))  # still out: only counts up to `at`
    assert wait.seconds() == pytest.approx(9.0)
    assert wait.seconds(at=15.0) == pytest.approx(12.0)
