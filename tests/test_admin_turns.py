"""The turn inspector's admin API on SQLite and PostgreSQL: turns served for real and listed, filtered,
paged and opened; totals; bad queries; the admin key. (The page itself: tests/test_admin_page.py.)"""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import ast
import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.gate.decisions import Decision
from service.gate.record import CandidateRecord, TurnRecord
from service.settings import Settings
from service.store.base import MemorySink
from service.store.sink import StoreSink
from tests.inspector_support import (
    ADMIN,
    ADMIN_HEADERS,
    CLIENT_A,
    CLIENT_B,
    N,
    chat,
    key_id,
    numbered_choices,
    store_gateway,
    wait_stored,
)
from tests.test_store_support import db_url, make_pg_db, record, shared_pg_db  # noqa: F401 - fixtures

TOOLS = [{"type": "function", "function": {"name": "get_order", "description": "look an order up",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]


@pytest.fixture
def gateway_db(actor, scripted, db_url, tmp_path):
    scripted.fn = numbered_choices
    _, actor_url = actor
    with store_gateway(actor_url, db_url, tmp_path / "spool") as (base, sink):
        yield base, sink


def admin_get(base: str, path: str, **params) -> httpx.Response:
    return httpx.get(base + path, params=params, headers=ADMIN_HEADERS)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def test_served_turns_are_listed_newest_first_and_filtered(gateway_db):
    base, _ = gateway_db
    a1 = chat(base, "first question from a")
    b1 = chat(base, "a question from b", key=CLIENT_B)
    p1 = chat(base, "echo:passed through", model="gpt-pass")
    a2 = chat(base, "second question from a " + "x" * 400)
    for t in (a1, b1, p1, a2):
        wait_stored(base, t)

    page = ok(admin_get(base, "/v1/admin/turns"))
    assert [t["id"] for t in page["data"]] == [a2, p1, b1, a1] and page["next_cursor"] is None
    newest = page["data"][0]
    assert newest["route"] == "gpt-test" and newest["mode"] == "rank" and newest["decision"] == "ranked"
    assert newest["candidates"] == N and newest["rounds"] == 1 and newest["chosen_index"] is not None
    assert newest["chosen_reply"] == "answer 1" and newest["chosen_score"] == 0.9  # the critic's best
    assert newest["key_id"] == key_id(CLIENT_A) and newest["has_feedback"] is False
    assert newest["last_user_message"].startswith("second question from a xxx")
    assert len(newest["last_user_message"]) == 200 and newest["last_user_message"].endswith("…")
    assert newest["tokens"]["prompt"] and newest["tokens"]["completion"] and newest["latency_total_ms"] > 0

    def ids(**params) -> list[str]:
        return [t["id"] for t in ok(admin_get(base, "/v1/admin/turns", **params))["data"]]

    assert ids(route="gpt-pass") == [p1]
    assert ids(decision="passthrough") == [p1]
    assert ids(decision="ranked", route="gpt-test") == [a2, b1, a1]
    assert ids(key_id=key_id(CLIENT_B)) == [b1]
    assert ids(key_id=key_id(CLIENT_A), route="gpt-test") == [a2, a1]
    assert ids(route="no-such-route") == []
    # since is inclusive, until exclusive; a time without an offset is UTC.
    at = {t["id"]: datetime.fromisoformat(t["created_at"]) for t in page["data"]}
    assert ids(since=at[b1].isoformat()) == [a2, p1, b1]
    assert ids(until=at[b1].isoformat()) == [a1]
    naive = at[p1].astimezone(UTC).replace(tzinfo=None).isoformat()
    assert ids(since=naive) == [a2, p1]
    shifted = at[p1].astimezone(timezone(timedelta(hours=5))).isoformat()  # the same instant, in +05:00
    assert ids(since=shifted) == [a2, p1]
    assert ids(since=(at[a2] + timedelta(seconds=1)).isoformat()) == []


def test_a_turn_opened_shows_request_candidates_decision_and_feedback(gateway_db):
    base, _ = gateway_db
    turn_id = chat(base, "where is order 7?", tools=TOOLS, metadata={"conversation_id": "conv-inspect-1"})
    later = chat(base, "another conversation")
    turn = wait_stored(base, turn_id)
    wait_stored(base, later)

    assert turn["id"] == turn_id and turn["route"] == "gpt-test" and turn["decision"] == "ranked"
    assert turn["request"]["messages"][-1] == {"role": "user", "content": "where is order 7?"}
    assert turn["request"]["tools"] == TOOLS
    assert turn["request"]["client_metadata"] == {"conversation_id": "conv-inspect-1"}
    assert turn["key_id"] == key_id(CLIENT_A) and turn["conversation_id"] and turn["conversation_index"] == 0
    assert turn["critic"] == {"name": "table", "version": "test"}
    assert turn["rounds"] == 1 and turn["interventions"] == [] and turn["upstream_errors"] == []
    assert turn["latency_ms"]["total"] > 0 and turn["tokens"]["prompt"] > 0

    cands = turn["candidates"]
    assert [c["index"] for c in cands] == list(range(N)) and {c["round"] for c in cands} == {0}
    assert [c["message"]["content"] for c in cands] == [f"answer {i}" for i in range(N)]
    assert [c["score"] for c in cands] == [0.2, 0.9, 0.55]
    assert [c["chosen"] for c in cands] == [False, True, False] and turn["chosen_index"] == 1
    assert all(c["verdict"] == "ok" and c["veto_reason"] is None and c["finish_reason"] == "stop" for c in cands)
    assert cands[1]["contributions"] == {"length": 0.4, "agreement": -0.125}
    assert cands[1]["features"]["length"] == float(len("answer 1"))
    assert all(c["upstream_request_id"].startswith("req_fake") and c["upstream_latency_ms"] >= 0 for c in cands)
    assert cands[0]["usage"]["prompt_tokens"] > 0  # one call with n=3: its usage is kept on the first

    # Feedback on the turn and on its whole conversation, through the client API.
    client = {"authorization": f"Bearer {CLIENT_A}"}
    given = httpx.post(base + "/v1/feedback", json={"turn_id": turn_id, "reward": 0.75, "label": "solved",
                                                    "comment": "<b>fine</b>"}, headers=client)
    assert given.status_code == 200, given.text
    conv = httpx.post(base + "/v1/feedback", json={"conversation_id": "conv-inspect-1", "reward": 1.0},
                      headers=client)
    assert conv.status_code == 200, conv.text
    fb = ok(admin_get(base, f"/v1/admin/turns/{turn_id}"))["feedback"]
    assert [(f["reward"], f["label"], f["comment"], f["turn_id"]) for f in fb["turn"]] == [
        (0.75, "solved", "<b>fine</b>", turn_id)]
    assert [(f["reward"], f["turn_id"]) for f in fb["conversation"]] == [(1.0, None)]
    listed = {t["id"]: t["has_feedback"] for t in ok(admin_get(base, "/v1/admin/turns"))["data"]}
    assert listed == {turn_id: True, later: False}
    assert ok(admin_get(base, f"/v1/admin/turns/{later}"))["feedback"] == {"turn": [], "conversation": []}


def test_unknown_turn_is_404_in_the_envelope(gateway_db):
    base, _ = gateway_db
    for turn_id in ("turn-nope", "a%00b"):
        got = admin_get(base, f"/v1/admin/turns/{turn_id}")
        assert got.status_code == 404, got.text
        assert got.json()["error"]["code"] == "turn_not_found" and got.json()["error"]["param"] == "turn_id"
    too_long = admin_get(base, "/v1/admin/turns/" + "x" * 65)  # longer than any stored id
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "turn_id", too_long.text


# -- pages -----------------------------------------------------------------------------------------
def write_records(db_url: str, spool: Path, records: list[TurnRecord]) -> None:
    """Through the store's own writer, as the gateway writes them."""
    async def run() -> None:
        sink = StoreSink(db_url, spool)
        await sink.start()
        for r in records:
            sink.enqueue(r)
        assert await sink.flush(timeout_s=20)
        await sink.stop()
    asyncio.run(run())


@pytest.fixture
def admin_only(actor, db_url, tmp_path):
    """A gateway on db_url for turns the test writes itself."""
    _, actor_url = actor
    with store_gateway(actor_url, db_url, tmp_path / "spool-gateway") as (base, _):
        yield base, db_url, tmp_path / "spool-writer"


def test_pages_cover_every_turn_once_with_ties_on_created_at(admin_only):
    base, url, spool = admin_only
    now = time.time()
    records = []
    for i in range(23):
        r = record([{"role": "user", "content": f"question {i}"}], f"reply {i}")
        # Five turns share one timestamp: the page boundary falls among them.
        r.created_at = now - 100 if 5 <= i < 10 else now - 200 + i
        r.route = "gpt-test" if i % 3 else "other"
        records.append(r)
    write_records(url, spool, records)
    expected = [r.turn_id for r in sorted(records, key=lambda r: (r.created_at, r.turn_id), reverse=True)]

    def walk(limit: int, **params) -> list[str]:
        seen: list[str] = []
        cursor = None
        for _ in range(50):
            more: dict[str, str] = {"cursor": cursor} if cursor else {}
            page = ok(admin_get(base, "/v1/admin/turns", limit=limit, **params, **more))
            assert len(page["data"]) <= limit
            seen += [t["id"] for t in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return seen
        raise AssertionError("the cursor never ended")

    for limit in (1, 4, 7, 23, 500):
        assert walk(limit) == expected, limit
    assert walk(3, route="other") == [t for t in expected if t in {r.turn_id for r in records if r.route == "other"}]
    assert ok(admin_get(base, "/v1/admin/turns"))["data"][0]["id"] == expected[0]  # default limit 50: one page
    # A page exactly at the end says so.
    assert ok(admin_get(base, "/v1/admin/turns", limit=23))["next_cursor"] is None


def test_previews_find_the_last_user_message_and_show_tool_calls(admin_only):
    base, url, spool = admin_only
    call = {"id": "call_1", "type": "function", "function": {"name": "get_order", "arguments": '{"id": "7"}'}}
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]
    # Eleven earlier exchanges: the last user message is found by position, not by text order of indexes.
    earlier = [m for i in range(11) for m in ({"role": "user", "content": f"old {i}"},
                                              {"role": "assistant", "content": f"reply {i}"})]
    agent = record([{"role": "system", "content": "sys"}, *earlier, {"role": "user", "content": parts},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "shipped"}],
                   {"role": "assistant", "content": None, "tool_calls": [call]})
    no_user = record([{"role": "system", "content": "only a system prompt"}], "hello")
    write_records(url, spool, [agent, no_user])
    got = {t["id"]: t for t in ok(admin_get(base, "/v1/admin/turns"))["data"]}
    assert got[agent.turn_id]["last_user_message"] == "part one two"
    assert got[agent.turn_id]["chosen_reply"] == 'get_order({"id": "7"})'
    assert got[no_user.turn_id]["last_user_message"] is None and got[no_user.turn_id]["chosen_reply"] == "hello"


# -- stats -----------------------------------------------------------------------------------------
def turn(route: str, decision: str, *, rounds: int = 1, n: int = 4, saved: int = 0, prompt: int = 100,
         completion: int = 20, age_s: float = 60.0, key: str = CLIENT_A) -> TurnRecord:
    r = record([{"role": "user", "content": f"{route} {decision} {age_s} {rounds} {n}"}], "ok", n=n,
               key_id=key_id(key))
    r.route, r.decision, r.rounds, r.candidates_saved = route, decision, rounds, saved
    r.prompt_tokens, r.completion_tokens = prompt, completion
    r.created_at = time.time() - age_s
    if rounds > 1:
        msg = {"role": "assistant", "content": "c"}
        r.candidates = [CandidateRecord(index=i, round=i // (n // rounds), message=msg) for i in range(n)]
        r.feedback = [f"intervention {k}" for k in range(rounds - 1)]
    return r


def test_stats_count_decisions_interventions_saved_candidates_tokens_and_feedback(admin_only):
    base, url, spool = admin_only
    ranked = [turn("gpt-test", "ranked", age_s=60 + i) for i in range(3)]
    intervened = turn("gpt-test", "intervened", rounds=3, n=6, prompt=300, completion=60)
    accepted = turn("gpt-test", "accepted", n=2, saved=2, prompt=40, completion=8)
    passed = [turn("gpt-pass", "passthrough", n=1, prompt=50, completion=10, age_s=30 + i) for i in range(2)]
    old = turn("gpt-test", "ranked", age_s=2 * 86400)  # outside the default 24 h
    write_records(url, spool, [*ranked, intervened, accepted, *passed, old])
    client = {"authorization": f"Bearer {CLIENT_A}"}
    for turn_id, reward in ((ranked[0].turn_id, 1.0), (ranked[1].turn_id, 0.25), (ranked[1].turn_id, 0.75),
                            (passed[0].turn_id, 0.0), (old.turn_id, 1.0)):
        got = httpx.post(base + "/v1/feedback", json={"turn_id": turn_id, "reward": reward}, headers=client)
        assert got.status_code == 200, got.text
    label_only = httpx.post(base + "/v1/feedback", json={"turn_id": accepted.turn_id, "label": "meh"}, headers=client)
    assert label_only.status_code == 200, label_only.text

    s = ok(admin_get(base, "/v1/admin/stats"))
    assert s["route"] is None and s["until"] is None
    assert abs(datetime.fromisoformat(s["since"]).timestamp() - (time.time() - 86400)) < 60
    total, test_route, pass_route = s["total"], s["by_route"]["gpt-test"], s["by_route"]["gpt-pass"]
    assert set(s["by_route"]) == {"gpt-test", "gpt-pass"}
    assert total["turns"] == 7 and total["by_decision"] == {"ranked": 3, "intervened": 1, "accepted": 1,
                                                            "passthrough": 2}
    assert total["intervened_turns"] == 1 and total["intervention_rounds"] == 2
    assert total["candidates"] == 3 * 4 + 6 + 2 + 2 and total["candidates_saved"] == 2
    assert total["tokens"] == {"prompt": 300 + 300 + 40 + 100, "completion": 60 + 60 + 8 + 20}
    assert test_route["turns"] == 5 and test_route["candidates"] == 20 and test_route["tokens"]["prompt"] == 640
    assert pass_route == {"turns": 2, "by_decision": {"passthrough": 2}, "intervened_turns": 0,
                          "intervention_rounds": 0, "candidates": 2, "candidates_saved": 0,
                          "tokens": {"prompt": 100, "completion": 20},
                          "feedback": {"turns_with_feedback": 1, "rewards": 1, "mean_reward": 0.0,
                                       "positive_share": 0.0}}
    # Rewards on this window's turns: 1.0, 0.25, 0.75 (gpt-test) and 0.0 (gpt-pass); a label is feedback too.
    assert test_route["feedback"] == {"turns_with_feedback": 3, "rewards": 3, "mean_reward": pytest.approx(2 / 3),
                                      "positive_share": pytest.approx(2 / 3)}
    assert total["feedback"] == {"turns_with_feedback": 4, "rewards": 4, "mean_reward": pytest.approx(0.5),
                                 "positive_share": pytest.approx(0.5)}

    only = ok(admin_get(base, "/v1/admin/stats", route="gpt-pass"))
    assert only["by_route"] is None and only["total"] == pass_route
    week = ok(admin_get(base, "/v1/admin/stats", since=(datetime.now(UTC) - timedelta(days=7)).isoformat()))
    assert week["total"]["turns"] == 8 and week["total"]["feedback"]["rewards"] == 5
    empty = ok(admin_get(base, "/v1/admin/stats", route="nothing-here"))
    assert empty["total"]["turns"] == 0 and empty["total"]["feedback"]["mean_reward"] is None


# -- refusals --------------------------------------------------------------------------------------
BAD_QUERIES = [
    ("/v1/admin/turns", {"decision": "great"}, "decision"),
    ("/v1/admin/turns", {"limit": "0"}, "limit"),
    ("/v1/admin/turns", {"limit": "501"}, "limit"),
    ("/v1/admin/turns", {"limit": "ten"}, "limit"),
    ("/v1/admin/turns", {"since": "yesterday"}, "since"),
    ("/v1/admin/turns", {"until": "2026-13-01T00:00:00"}, "until"),
    ("/v1/admin/turns", {"since": "0001-01-01T00:00:00+05:00"}, "since"),  # before year 1 in UTC
    ("/v1/admin/turns", {"cursor": "not-a-cursor"}, "cursor"),
    ("/v1/admin/turns", {"cursor": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", 5]').decode()}, "cursor"),
    ("/v1/admin/turns", {"cursor": base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", "\\ud800"]').decode()},
     "cursor"),  # a lone surrogate: not a string the database can take
    ("/v1/admin/turns", {"route": "a\x00b"}, "route"),
    ("/v1/admin/turns", {"key_id": "k" * 65}, "key_id"),
    ("/v1/admin/stats", {"since": "soon"}, "since"),
    ("/v1/admin/stats", {"route": ""}, "route"),
]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("path", "params", "param"), BAD_QUERIES)
def test_bad_query_values_are_400_in_the_envelope(gateway_db, path, params, param):
    base, _ = gateway_db
    got = admin_get(base, path, **params)
    assert got.status_code == 400, got.text
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_inspector_endpoint_needs_the_admin_key(gateway_db):
    base, _ = gateway_db
    turn_id = chat(base, "hello")
    wait_stored(base, turn_id)
    for path in ("/v1/admin/turns", f"/v1/admin/turns/{turn_id}", "/v1/admin/stats"):
        for headers in ({}, {"authorization": f"Bearer {CLIENT_A}"}, {"authorization": "Bearer wrong"}):
            got = httpx.get(base + path, headers=headers)
            assert got.status_code == 401, (path, headers, got.text)
            assert got.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + path, headers=ADMIN_HEADERS).status_code == 200


def test_without_a_database_store_the_inspector_is_503(actor):
    _, actor_url = actor
    app = create_app(Settings(admin_key=ADMIN, upstream_base_url=actor_url), sink=MemorySink())
    with serve_in_thread(app) as base:
        for path in ("/v1/admin/turns", "/v1/admin/turns/turn-x", "/v1/admin/stats"):
            got = admin_get(base, path)
            assert got.status_code == 503 and got.json()["error"]["code"] == "store_unavailable", got.text


def test_the_decision_filter_knows_every_decision_the_gate_makes():
    """Decisions are assigned as string literals in the gate; the enum must hold each of them."""
    made: set[str] = set()
    for source in ("service/gate/pipeline.py", "service/store/transfer.py"):
        tree = ast.parse((Path(__file__).resolve().parents[1] / source).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    made |= _decision_literals(target, node.value)
            elif isinstance(node, ast.keyword) and node.arg == "decision":
                made |= _strings(node.value)
    assert made >= {"ranked", "accepted", "intervened", "passthrough", "shadow", "error", "imported"}
    assert made <= {d.value for d in Decision}, made - {d.value for d in Decision}


def _decision_literals(target: ast.expr, value: ast.expr) -> set[str]:
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
        return set().union(*(_decision_literals(t, v) for t, v in zip(target.elts, value.elts)))
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
    return _strings(value) if name == "decision" else set()


def _strings(value: ast.expr) -> set[str]:
    return {n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_the_api_document_declares_the_inspector_replies():
    doc = create_app(Settings(admin_key=ADMIN)).openapi()
    replies = {path: doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
               for path in ("/v1/admin/turns", "/v1/admin/turns/{turn_id}", "/v1/admin/stats")}
    assert replies == {"/v1/admin/turns": "#/components/schemas/TurnPage",
                       "/v1/admin/turns/{turn_id}": "#/components/schemas/TurnDetail",
                       "/v1/admin/stats": "#/components/schemas/StatsReply"}
    assert doc["components"]["schemas"]["Decision"]["enum"] == [d.value for d in Decision]
