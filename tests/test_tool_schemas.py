"""A client's tool schema is data: no fetching, no catastrophic backtracking, no stalled event loop.

Each test sends a turn whose tool schema is hostile through the real openai client while another
client polls /healthz; the gateway must keep answering it fast and settle the turn sensibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.demo.fake_actor import Reply, assistant
from service.gate import structural, toolschema
from service.settings import GatePolicy
from tests.conftest import TableCritic
from tests.test_metrics import delta, scrape

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Look it up."}]
HEALTHZ_LIMIT_S = 0.1


def lookup_tool(x_schema: dict) -> dict:
    return {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"x": x_schema}, "required": ["x"]}}}


def calls_lookup(*values: str):
    """Candidate i calls lookup(x=values[i % len(values)]), after a short think (so /healthz polls overlap)."""
    return lambda body, i: Reply([assistant(tool_calls=[("lookup", {"x": values[i % len(values)]})])], delay_s=0.2)


class Turn(threading.Thread):
    """One chat turn on its own thread, so the test can poll /healthz meanwhile."""

    def __init__(self, url: str, tools: list[Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.tools = url, tools  # hostile schemas: not openai's typed params
        self.reply: Any = None
        self.error: Exception | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.perf_counter()
        client = openai.OpenAI(base_url=self.url, api_key="sk-test", max_retries=0, timeout=60)
        try:
            self.reply = client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=USER, tools=self.tools)
        except Exception as e:
            self.error = e
        self.seconds = time.perf_counter() - started


def healthz_while(url: str, turn: Turn, limit_s: float = 30) -> list[float]:
    """Seconds per /healthz request, polled until the turn is done (at least 20 polls)."""
    base = url.removesuffix("/v1")
    out: list[float] = []
    deadline = time.monotonic() + limit_s
    with httpx.Client(timeout=2) as http:
        while (turn.is_alive() or len(out) < 20) and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                http.get(base + "/healthz").raise_for_status()
                out.append(time.perf_counter() - started)
            except httpx.TimeoutException:
                out.append(float("inf"))
            time.sleep(0.01)
    return out


def run_turn(url: str, tools: list[dict]) -> tuple[Turn, list[float]]:
    turn = Turn(url, tools)
    turn.start()
    latencies = healthz_while(url, turn)
    turn.join(timeout=10)
    return turn, latencies


def assert_healthz_stayed_fast(latencies: list[float]) -> None:
    slow = [round(s, 3) for s in latencies if s >= HEALTHZ_LIMIT_S]
    # One slow poll is allowed for a loaded CI machine; a stalled loop makes every poll in the stall slow.
    assert len(slow) <= 1 and max(latencies) < 1, f"/healthz slow {len(slow)}/{len(latencies)} times: {slow}"


@contextmanager
def tarpit() -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback server that accepts connections and never answers; yields (url, accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/schema.json", accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_a_remote_ref_is_never_fetched_and_the_loop_keeps_serving(gateway, scripted):
    scripted.fn = calls_lookup("ABC123")
    with tarpit() as (url_of_schema, accepted), gateway(critic=TableCritic({})) as (url, sink):
        tools = [lookup_tool({"$ref": url_of_schema}), {"type": "function", "function": {
            "name": "other", "parameters": {"$ref": url_of_schema.replace("http:", "https:")}}}]
        turn, latencies = run_turn(url, tools)
        assert turn.error is None, turn.error
        assert accepted == []  # not one connection reached the tarpit
    assert_healthz_stayed_fast(latencies)
    assert turn.seconds < 5
    call = turn.reply.parse().choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"x": "ABC123"})
    # What the ref would have said is unknown, so the candidate is not vetoed for it.
    assert all(c.verdict == "ok" for c in sink.records[0].candidates)


def test_a_file_ref_is_never_opened(gateway, scripted, tmp_path):
    # A schema that would veto the reply if it were read, and a FIFO that would block whoever opened it.
    vetoing = tmp_path / "schema.json"
    vetoing.write_text(json.dumps({"type": "string", "maxLength": 1}))
    fifo = tmp_path / "schema.fifo"
    os.mkfifo(fifo)
    scripted.fn = calls_lookup("ABC123")
    tools = [lookup_tool({"$ref": vetoing.as_uri()}),
             {"type": "function", "function": {"name": "other", "parameters": {"$ref": fifo.as_uri()}}}]
    with gateway(critic=TableCritic({})) as (url, sink):
        turn, latencies = run_turn(url, tools)
        try:
            # Opening a FIFO to write without blocking works only while someone has it open to read.
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            opened = True
        except OSError:
            opened = False
    assert turn.error is None, turn.error
    assert not opened
    assert_healthz_stayed_fast(latencies)
    assert turn.reply.headers["x-turngate-decision"] == "ranked"
    assert all(c.verdict == "ok" for c in sink.records[0].candidates)


def test_a_backtracking_pattern_is_matched_in_linear_time(gateway, scripted):
    evil = "a" * 26 + "!"  # ^(a+)+$ on this took Python's re seconds, holding the GIL throughout
    scripted.fn = calls_lookup(evil, "aaaa")
    tools = [lookup_tool({"type": "string", "pattern": "^(a+)+$"}),
             {"type": "function", "function": {"name": "other", "parameters": {
                 "type": "object", "patternProperties": {"^(a+)+$": {"type": "integer"}},
                 "additionalProperties": False}}}]
    with gateway(critic=TableCritic({evil: 0.99, "aaaa": 0.1})) as (url, sink):
        turn, latencies = run_turn(url, tools)
    assert turn.error is None, turn.error
    assert_healthz_stayed_fast(latencies)
    assert turn.seconds < 5
    # The critic prefers the backtracking argument, but it breaks the pattern: the valid one is returned.
    call = turn.reply.parse().choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"x": "aaaa"}
    vetoed = [c for c in sink.records[0].candidates if c.verdict == "veto"]
    assert vetoed and all(c.veto_reason == "schema" and "does not match" in c.veto_detail for c in vetoed)


def test_an_exponential_schema_gives_up_within_its_budget(gateway, scripted):
    # 2**40 paths through anyOf/$ref pairs that all fail: a finite schema no validator can finish.
    defs = {f"n{i}": {"anyOf": [{"$ref": f"#/$defs/n{i + 1}"}, {"$ref": f"#/$defs/n{i + 1}"}]} for i in range(40)}
    defs["n40"] = {"type": "integer"}
    scripted.fn = calls_lookup("text")
    tools = [lookup_tool({"$ref": "#/$defs/n0"})]
    tools[0]["function"]["parameters"]["$defs"] = defs
    assert_turn_left_unchecked(gateway, tools, "timeout", within_s=5)


def assert_turn_left_unchecked(gateway, tools: list[dict], reason: str, within_s: float) -> None:
    """The turn ends in time, the loop stays free, and its candidates are returned unchecked, counted."""
    with gateway(critic=TableCritic({})) as (url, sink):
        before = scrape(url)
        turn, latencies = run_turn(url, tools)
        after = scrape(url)
    assert turn.error is None, turn.error
    assert_healthz_stayed_fast(latencies)
    assert turn.seconds < within_s
    # Not checkable is not the candidate's fault: it is returned, and the metric counts it.
    assert turn.reply.headers["x-turngate-decision"] == "ranked"
    assert all(c.verdict == "ok" for c in sink.records[0].candidates)
    assert delta(before, after, "turngate_schema_unchecked_total", route="gpt-test", reason=reason) == 4


@pytest.mark.parametrize("schema, arguments, vetoed", [
    ({"type": "object", "properties": {"t": {"$ref": "#/$defs/tree"}},
      "$defs": {"tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}}},
                         "additionalProperties": False}}},
     {"t": {"kids": [{"kids": []}, {"kids": [{"bad": 1}]}]}}, True),
    ({"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}, {"ids": [1, 1.0]}, True),
    ({"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}, {"ids": [1, True]}, False),
    ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
     {"x_a": 1, "y": 2}, True),
    ({"type": "object", "properties": {"p": {"type": "string", "pattern": "^(?=a)a$"}}}, {"p": "b"}, False),
])
def test_in_document_schemas_are_still_enforced(gateway, scripted, schema, arguments, vetoed):
    """Recursive refs that descend into the value, uniqueItems, patternProperties: enforced as before;
    a pattern RE2 cannot run (lookahead) is not enforced rather than guessed."""
    scripted.fn = lambda body, i: Reply([assistant(tool_calls=[("f", arguments)])] if i == 0
                                        else [assistant("plain text")])
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    with gateway(critic=TableCritic({'"f"': 0.9}), candidates=2) as (url, sink):
        openai.OpenAI(base_url=url, api_key="k", max_retries=0).chat.completions.create(
            model="gpt-test", messages=USER, tools=tools)
    first = next(c for c in sink.records[0].candidates if c.index == 0)
    assert (first.verdict == "veto") == vetoed, first.veto_detail
    if vetoed:
        assert first.veto_reason == "schema"


def wide_schema(properties: int) -> dict:
    """An object schema with that many string properties (about 45 bytes of JSON each)."""
    return {"type": "object", "properties": {f"p{i}": {"type": "string", "minLength": 1} for i in range(properties)}}


def test_a_huge_schema_is_not_checked_and_the_turn_stays_fast(gateway, scripted):
    # 20,000 properties (0.9 MB): jsonschema's metaschema walk over it alone took over 3 s a candidate.
    scripted.fn = calls_lookup("ABC123")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": wide_schema(20_000)}}]
    assert_turn_left_unchecked(gateway, tools, "too_large", within_s=3)


def test_checking_a_large_schema_keeps_to_the_turn_budget(monkeypatch):
    # 4,000 properties (180 KB): under the size limit, but its metaschema walk alone takes far longer
    # than the (here shortened) budget, and it used to be rebuilt for every candidate.
    monkeypatch.setattr(structural, "SCHEMA_BUDGET_S", 0.05)
    schemas = structural.tool_schemas([{"type": "function", "function": {
        "name": "f", "parameters": wide_schema(4_000)}}])
    replies = [(assistant(tool_calls=[("f", {"p1": ""})]), "tool_calls") for _ in range(4)]
    started = time.perf_counter()
    verdicts = asyncio.run(structural.check_all(replies, schemas))
    assert time.perf_counter() - started < 0.3
    assert [(v.ok, v.reason) for v in verdicts] == [(True, "timeout")] * 4


def test_a_schema_is_built_once_a_turn_and_still_vetoes(monkeypatch):
    # Over the validator cache's size limit (a long description), so nothing outlives the turn.
    builds: list[str] = []
    build = toolschema._build
    monkeypatch.setattr(toolschema, "_build", lambda schema_json: builds.append(schema_json) or build(schema_json))
    schema = {"type": "object", "properties": {"x": {"type": "string", "maxLength": 3, "description": "d" * 40_000}}}
    schemas = structural.tool_schemas([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    replies = [(assistant(tool_calls=[("f", {"x": x})]), "tool_calls") for x in ("abc", "abcd", "ab", "toolong")]
    verdicts = asyncio.run(structural.check_all(replies, schemas))
    assert [(v.ok, v.reason) for v in verdicts] == [(True, None), (False, "schema"), (True, None), (False, "schema")]
    assert len(builds) == 1


def test_an_intervention_explains_its_objections_off_the_event_loop(gateway, scripted, monkeypatch):
    # The objections fed back to the actor check each candidate against the tool schemas again; that
    # ran on the event loop, up to the whole schema budget (here lengthened) each round.
    monkeypatch.setattr(structural, "SCHEMA_BUDGET_S", 3.0)
    scripted.fn = calls_lookup("ABC123")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": wide_schema(5_500)}}]
    with gateway(critic=TableCritic({}), policy=GatePolicy(intervene_threshold=0.99, max_interventions=1)) as (
            url, sink):
        turn, latencies = run_turn(url, tools)
    assert turn.error is None, turn.error
    assert_healthz_stayed_fast(latencies)
    assert sink.records[0].rounds == 2 and len(sink.records[0].feedback) == 1
