"""The per-turn candidate wait: once the first candidate is in, the turn waits a bounded time for
the others, then answers with what it has; what failed or was given up is on the turn record."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import select

from service.app import create_app
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.gate.record import TurnRecord, UpstreamFailure
from service.settings import RouteSettings, Settings
from service.store.engine import make_sync_engine
from service.store.models import Turn
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_metrics import delta, scrape
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Where is my order?"}]


def ask(url: str):
    client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-test", messages=USER)


def until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_one_hung_candidate_of_four_does_not_hold_the_turn(actor, scripted, db_url, tmp_path):
    fake, actor_url = actor
    scripted.fn = lambda body, i: (Reply([assistant("hung")], delay_s=30) if i == 2
                                   else Reply([assistant(f"fast {i}")]))
    route = RouteSettings(alias="gpt-test", upstream_base_url=actor_url, candidates=4, mode="rank",
                          attempt_timeout_s=60, deadline_s=120, candidate_wait_s=1.0)
    sink = StoreSink(db_url, tmp_path / "spool", flush_interval_s=0.05)
    with serve_in_thread(create_app(Settings(routes=[route]), critic=TableCritic({}), sink=sink)) as base:
        url = base + "/v1"
        before = scrape(url)
        started = time.monotonic()
        raw = ask(url)
        elapsed = time.monotonic() - started
        after = scrape(url)
        turn_id = raw.headers["x-turngate-turn-id"]
        assert raw.parse().choices[0].message.content.startswith("fast")
        assert until(lambda: turn_id not in sink.pending_ids)
    # The wait (1 s) plus a generous margin for a loaded machine; the hung call alone takes 30 s.
    assert elapsed < 6.0, elapsed
    assert raw.headers["x-turngate-candidates"] == "3"
    assert until(lambda: fake.disconnected == 1)  # the hung call was cancelled, not left running
    assert delta(before, after, "turngate_upstream_errors_total", route="gpt-test", kind="abandoned") == 1
    assert delta(before, after, "turngate_turns_partial_total", route="gpt-test") == 1
    engine = make_sync_engine(db_url)
    try:
        with engine.connect() as conn:
            errors = conn.execute(select(Turn.upstream_errors).where(Turn.id == turn_id)).scalar_one()
    finally:
        engine.dispose()
    assert [e["kind"] for e in errors] == ["abandoned"]
    assert "candidate_wait_s" in errors[0]["message"]


def test_upstream_errors_survive_the_spool_format():
    record = TurnRecord(turn_id="turn-1", route="r", mode="rank", upstream_model="m", request_messages=[],
                        upstream_errors=[UpstreamFailure.of("timeout", "late\x00" + "x" * 900)])
    back = TurnRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record and back.upstream_errors[0].message.startswith("latex")
    assert len(back.upstream_errors[0].message) == 499  # bounded, NUL dropped


def test_candidates_back_within_the_wait_are_all_kept(gateway, scripted):
    scripted.fn = lambda body, i: Reply([assistant(f"c {i}")], delay_s=0.4 if i == 3 else 0.0)
    with gateway(candidate_wait_s=3.0) as (url, sink):
        raw = ask(url)
    assert raw.headers["x-turngate-candidates"] == "4"
    assert sink.records[0].upstream_errors == []


def test_the_wait_grows_with_the_first_candidates_latency(gateway, scripted):
    # First back after 0.5 s; a sibling 0.5 s later is inside ratio x first latency (1 s), though
    # over the 0.1 s floor.
    scripted.fn = lambda body, i: Reply([assistant(f"c {i}")], delay_s=1.0 if i == 3 else 0.5)
    with gateway(candidate_wait_s=0.1, candidate_wait_ratio=2.0) as (url, sink):
        raw = ask(url)
    assert raw.headers["x-turngate-candidates"] == "4", sink.records[0].upstream_errors


@pytest.mark.parametrize("mode", ["rank", "shadow"])
def test_partial_failures_are_recorded_on_an_answered_turn(gateway, scripted, mode):
    scripted.fn = lambda body, i: Reply(status=500) if i in (1, 2) else Reply([assistant(f"ok {i}")])
    with gateway(mode=mode) as (url, sink):
        before = scrape(url)
        raw = ask(url)
        assert raw.parse().choices[0].message.content.startswith("ok")
        assert until(lambda: bool(sink.records))
        after = scrape(url)
    record = sink.records[0]
    assert record.error is None and len(record.candidates) == 2
    assert [e.kind for e in record.upstream_errors] == ["server_error", "server_error"]
    assert all("500" in e.message for e in record.upstream_errors)
    assert delta(before, after, "turngate_turns_partial_total", route="gpt-test") == 1


def test_a_failed_turn_records_every_attempt(gateway, scripted):
    scripted.fn = lambda body, i: Reply(status=503)
    with gateway(candidates=3) as (url, sink), pytest.raises(openai.InternalServerError):
        ask(url)
    record = sink.records[0]
    assert record.decision == "error" and [e.kind for e in record.upstream_errors] == ["server_error"] * 3
