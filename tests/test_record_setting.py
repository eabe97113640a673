"""A route's `record` setting (all / sample / off), through the openai client against a gateway with
a real store (SQLite and PostgreSQL): an unrecorded turn is answered as any other, says so in
`x-turngate-recorded: false`, is counted and charged, and never reaches the turns table (nor the
journal); a sampled share is kept by turn id, the same on any process; the setting is validated
wherever it is set (YAML, the environment, the admin API)."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError
from sqlalchemy import bindparam, text

from service import config_summary
from service.app import create_app
from service.control.key_policy import KeyPolicy
from service.demo.fake_actor import serve_in_thread
from service.gate import recording
from service.limits.spend import MemorySpendMeter
from service.settings import RouteSettings, Settings, SettingsError
from service.store.engine import make_sync_engine
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_admin_routes import ADMIN_HEADERS, chat
from tests.test_admin_routes import gateway as admin_gateway
from tests.test_config import config, env  # noqa: F401 - fixture
from tests.test_metrics import delta, scrape
from tests.test_spend import read, with_policies
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

USER: Any = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "sk-record-test-key"
KEY_ID = KEY[:12]  # the id of the key's policy: only an issued key's spend is charged
PER_CALL = 15  # the fake actor's usage: 10 prompt + 5 completion tokens a call


@contextmanager
def gateway(actor_url: str, db: str, tmp_path: Path, *routes: dict[str, Any]
            ) -> Iterator[tuple[str, MemorySpendMeter]]:
    cfg = Settings(routes=[RouteSettings(**{"upstream_base_url": actor_url, "upstream_model": "actor-model",
                                            "candidates": 2, "attempt_timeout_s": 5, "deadline_s": 10, **r})
                           for r in routes], database_url=db)
    sink = StoreSink(db, tmp_path / "spool", flush_interval_s=0.1)
    sink.feedback_wait_s = 0.3  # the wait before feedback for an unknown turn is refused
    meter = MemorySpendMeter(window_s=60, slots=4)
    app = create_app(cfg, critic=TableCritic({}), sink=sink, spend=meter)
    with_policies(app, {KEY: KeyPolicy(id=KEY_ID, name="record-test")})
    with serve_in_thread(app) as url:
        yield url + "/v1", meter
    # Stopped: the sink has drained (lifespan), so what the store will ever hold of these turns is in.


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)


def stored(db: str, turn_ids: list[str]) -> set[str]:
    engine = make_sync_engine(db)
    try:
        with engine.connect() as conn:
            q = text("SELECT id FROM turns WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))
            return {row[0] for row in conn.execute(q, {"ids": turn_ids})}
    finally:
        engine.dispose()


def journal_ids(spool: Path) -> set[str]:
    return {json.loads(line)["turn"]["turn_id"] for p in spool.glob("seg-*.jsonl")
            for line in p.read_text().splitlines()}


def test_record_off_answers_counts_and_charges_but_stores_nothing(actor, db_url, tmp_path):
    with gateway(actor[1], db_url, tmp_path, {"alias": "quiet", "mode": "rank", "record": "off"},
                 {"alias": "loud", "mode": "rank"}) as (url, meter):
        before = scrape(url)
        quiet = client(url).chat.completions.with_raw_response.create(model="quiet", messages=USER)
        streamed = client(url).chat.completions.with_raw_response.create(model="quiet", messages=USER, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == "hi"
        loud = client(url).chat.completions.with_raw_response.create(model="loud", messages=USER)
        after = scrape(url)
        # The reply is the same either way; only the header tells.
        assert quiet.parse().choices[0].message.content == loud.parse().choices[0].message.content == "hi"
        assert quiet.headers["x-turngate-decision"] == loud.headers["x-turngate-decision"]
        assert quiet.headers["x-turngate-recorded"] == streamed.headers["x-turngate-recorded"] == "false"
        assert "x-turngate-recorded" not in loud.headers
        ids = [r.headers["x-turngate-turn-id"] for r in (quiet, streamed, loud)]
        assert delta(before, after, "turngate_turns_unrecorded_total", route="quiet") == 2
        assert delta(before, after, "turngate_turns_unrecorded_total", route="loud") == 0
        assert delta(before, after, "turngate_turns_total", route="quiet") == 2
        # Charged all the same: 2 candidate calls per turn.
        give_up = time.monotonic() + 5
        while (reading := read(meter, KEY_ID)) is None or reading.spent < 3 * 2 * PER_CALL:
            assert time.monotonic() < give_up, reading
            time.sleep(0.02)
        assert reading.spent == 3 * 2 * PER_CALL
        # Feedback needs a recorded turn: the unrecorded one is not found, the recorded one is.
        fb = httpx.post(url + "/feedback", headers={"authorization": f"Bearer {KEY}"}, timeout=10,
                        json={"turn_id": ids[0], "reward": 1})
        assert fb.status_code == 404 and fb.json()["error"]["code"] == "turn_not_found", fb.text
        fb = httpx.post(url + "/feedback", headers={"authorization": f"Bearer {KEY}"}, timeout=10,
                        json={"turn_id": ids[2], "reward": 1})
        assert fb.status_code == 200, fb.text
        assert ids[0] not in journal_ids(tmp_path / "spool") and ids[1] not in journal_ids(tmp_path / "spool")
    assert stored(db_url, ids) == {ids[2]}


def _kept_elsewhere(turn_ids: list[str], share: float) -> set[str]:
    """Which of the turn ids a share keeps, decided by another process (another hash seed)."""
    code = ("import json, sys; from service.gate import recording; from service.settings import RouteSettings; "
            f"r = RouteSettings(alias='x', record='sample', record_sample={share}); "
            "print(json.dumps([t for t in json.load(sys.stdin) if recording.recorded(r, t)]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(turn_ids), capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=60)
    return set(json.loads(out.stdout))


def test_a_sampled_share_is_kept_by_turn_id_the_same_on_any_process(actor, db_url, tmp_path):
    with gateway(actor[1], db_url, tmp_path, {"alias": "half", "mode": "passthrough", "record": "sample",
                                              "record_sample": 0.5}) as (url, _):
        before = scrape(url)
        replies = [client(url).chat.completions.with_raw_response.create(model="half", messages=USER)
                   for _ in range(40)]
        after = scrape(url)
    ids = [r.headers["x-turngate-turn-id"] for r in replies]
    said_kept = {t for t, r in zip(ids, replies, strict=True) if "x-turngate-recorded" not in r.headers}
    kept = stored(db_url, ids)
    assert kept == said_kept
    assert 10 <= len(kept) <= 30, len(kept)  # 0.5 of 40, far outside chance
    assert delta(before, after, "turngate_turns_unrecorded_total", route="half") == 40 - len(kept)
    assert _kept_elsewhere(ids, 0.5) == kept


def test_shadow_turns_sampled_hold_and_enqueue_agree(actor, db_url, tmp_path):
    """A shadow turn's provisional record (before the reply) and its scored one (after) are both kept
    or both skipped: the stored turns are the sampled ones, each with every candidate scored."""
    with gateway(actor[1], db_url, tmp_path, {"alias": "shadow", "mode": "shadow", "candidates": 3,
                                              "record": "sample", "record_sample": 0.5}) as (url, _):
        replies = [client(url).chat.completions.with_raw_response.create(model="shadow", messages=USER)
                   for _ in range(16)]
        ids = [r.headers["x-turngate-turn-id"] for r in replies]
        skipped = {t for t, r in zip(ids, replies, strict=True) if r.headers.get("x-turngate-recorded") == "false"}
        assert not skipped & journal_ids(tmp_path / "spool")
    assert all(r.headers["x-turngate-decision"] == "shadow" for r in replies)
    kept = stored(db_url, ids)
    route = RouteSettings(alias="shadow", record="sample", record_sample=0.5)
    assert kept == {t for t in ids if recording.recorded(route, t)} == set(ids) - skipped
    assert 0 < len(kept) < 16, len(kept)
    engine = make_sync_engine(db_url)
    try:
        with engine.connect() as conn:
            q = text("SELECT count(*), count(score) FROM candidates WHERE turn_id IN :ids").bindparams(
                bindparam("ids", expanding=True))
            n, scored = conn.execute(q, {"ids": list(kept)}).one()
    finally:
        engine.dispose()
    assert n == scored == 3 * len(kept)  # the scored record superseded the provisional one


# -- where the setting comes from -------------------------------------------------------------------


def test_the_setting_from_yaml_and_the_environment_is_validated(env, tmp_path, monkeypatch):
    env(TURNGATE_CONFIG=config(tmp_path, "routes:\n  - alias: a\n    record: sample\n    record_sample: 0.25\n"
                                         "  - alias: b\n"))
    routes = Settings().routes_by_alias
    assert (routes["a"].record, routes["a"].record_sample, routes["b"].record) == ("sample", 0.25, "all")
    for bad in ("record: sometimes", "record_sample: 0", "record_sample: 1.5"):
        env(TURNGATE_CONFIG=config(tmp_path, f"routes:\n  - alias: a\n    {bad}\n", "bad.yaml"))
        with pytest.raises(ValidationError, match="record"):
            Settings()
    monkeypatch.delenv("TURNGATE_CONFIG")
    env(TURNGATE_RECORD="sample", TURNGATE_RECORD_SAMPLE="0.05")
    route = Settings().routes[0]
    assert (route.record, route.record_sample) == ("sample", 0.05)
    env(TURNGATE_RECORD="never")
    with pytest.raises(ValidationError, match="record"):
        Settings()
    # Beside declared routes the default route's setting would be ignored: refused.
    env(TURNGATE_RECORD="off", TURNGATE_CONFIG=config(tmp_path, "routes:\n  - alias: a\n", "ok.yaml"))
    with pytest.raises(SettingsError, match="TURNGATE_RECORD"):
        Settings()


def test_the_setting_through_the_admin_api(tmp_path):
    db = f"sqlite:///{tmp_path}/admin.db"
    with admin_gateway(db, tmp_path) as (base, _):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        for body in ({"record": "none"}, {"record": "sample", "record_sample": 0},
                     {"record": "sample", "record_sample": 2}):
            reply = admin.put("/routes/plain", json={"mode": "passthrough", **body})
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"].startswith("record"), reply.text
        assert "x-turngate-recorded" not in chat(base, "plain").headers
        put = admin.put("/routes/plain", json={"mode": "passthrough", "record": "off"})
        assert put.status_code == 200 and put.json()["record"] == "off", put.text
        give_up = time.monotonic() + 5
        while chat(base, "plain").headers.get("x-turngate-recorded") != "false":
            assert time.monotonic() < give_up, "the route change never reached the gateway"
            time.sleep(0.05)
        listed = {r["alias"]: r for r in admin.get("/routes").json()["data"]}
        assert (listed["plain"]["record"], listed["plain"]["record_sample"]) == ("off", 0.1)


def test_the_start_summary_names_what_each_route_records():
    class Critic:
        name, version, provider = "c", "1", "cpu"

    settings = Settings(routes=[RouteSettings(alias="a", record="sample", record_sample=0.05),
                                RouteSettings(alias="b", record="off"), RouteSettings(alias="c")])
    summary = config_summary.effective(settings, Critic())
    assert [r["record"] for r in summary["routes"]] == ["sample 0.05", "off", "all"]
    line = config_summary.one_line(summary)
    assert "model=a key=client record=sample:0.05;" in line and "model=b key=client record=off;" in line
    assert "model=c key=client]" in line


def test_sqlite_json_columns_are_the_same_json_whatever_they_hold(tmp_path):
    """The SQLite engines encode JSON columns with orjson; what orjson refuses still gets stored."""
    from sqlalchemy import JSON, Column, MetaData, Table, insert, select

    engine = make_sync_engine(f"sqlite:///{tmp_path}/j.db")
    table = Table("j", MetaData(), Column("v", JSON))
    values = [{"text": "café ☕", "n": [1, 2.5, None, True]}, {"big": 2**70}, {"odd": "\ud800"}]
    try:
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(insert(table), [{"v": v} for v in values])
        with engine.connect() as conn:
            assert [r[0] for r in conn.execute(select(table.c.v))] == values
            raw = conn.execute(text("SELECT v FROM j")).scalars().first()
    finally:
        engine.dispose()
    assert raw == '{"text":"café ☕","n":[1,2.5,null,true]}'  # orjson's text, UTF-8
