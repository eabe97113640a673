"""Routes changed through the admin API on one gateway (SQLite and PostgreSQL): listed with their
policy and the upstream key masked, put whole, deleted, refused when invalid, audited; the next turn
follows the change, a turn already running keeps its route. (Two replicas: test_control_replicas.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from sqlalchemy import select

from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from service.store.engine import make_sync_engine
from service.store.models import AuditEntry, RouteOverride
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

ADMIN = "adm-" + "7c1e5b" * 6
UPSTREAM_KEY = "sk-upstream-" + "9d2f4a" * 5
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


class KeyRecorder:
    """The fake actor behind an ASGI wrapper that keeps each chat request's Authorization header."""

    def __init__(self, actor: FakeActor) -> None:
        self.actor, self.keys = actor, []  # type: ignore[var-annotated]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            self.keys.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await self.actor.app(scope, receive, send)


def n_replies(body, attempt) -> Reply:
    return Reply([assistant(f"reply {attempt}.{i}") for i in range(int(body.get("n") or 1))])


@contextmanager
def gateway(url: str, tmp_path, *, store: bool = True, responder=n_replies) -> Iterator[tuple[str, KeyRecorder]]:
    actor = KeyRecorder(FakeActor(responder))
    with serve_in_thread(actor) as actor_url:
        seed = [RouteSettings(alias="agent", upstream_base_url=actor_url + "/v1", upstream_model="actor",
                              upstream_api_key=UPSTREAM_KEY, candidates=3, mode="rank", attempt_timeout_s=5,
                              deadline_s=10),
                RouteSettings(alias="plain", upstream_base_url=actor_url + "/v1", mode="passthrough")]
        settings = Settings(routes=seed, admin_key=ADMIN, database_url=url, control_poll_s=0.2)
        sink = StoreSink(url, tmp_path / "spool", flush_interval_s=0.1) if store else MemorySink()
        with serve_in_thread(create_app(settings, critic=TableCritic({}), sink=sink)) as base:
            yield base, actor


def chat(base: str, model: str) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=20, headers={"authorization": "Bearer sk-client"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def audit_rows(url: str) -> list[AuditEntry]:
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(AuditEntry).order_by(AuditEntry.id)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def test_list_put_delete_and_the_next_turn_follows(db_url, tmp_path):  # noqa: F811
    with gateway(db_url, tmp_path) as (base, actor):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        listed = admin.get("/routes").json()["data"]
        assert [(r["alias"], r["mode"], r["candidates"], r["source"]) for r in listed] == [
            ("agent", "rank", 3, "config"), ("plain", "passthrough", 4, "config")]
        assert listed[0]["upstream_api_key"] == "***" + UPSTREAM_KEY[-4:]
        assert listed[0]["policy"]["max_interventions"] == 0
        assert UPSTREAM_KEY not in json.dumps(listed)

        assert chat(base, "agent").headers["x-turngate-candidates"] == "3"
        # The whole route back, as GET showed it (the masked key keeps the stored one), in passthrough.
        route = {k: v for k, v in listed[0].items() if k not in ("alias", "source")}
        put = admin.put("/routes/agent", json={**route, "mode": "passthrough"})
        assert put.status_code == 200, put.text
        assert put.json()["mode"] == "passthrough" and put.json()["source"] == "admin"
        reply = chat(base, "agent")
        assert reply.status_code == 200 and reply.headers["x-turngate-decision"] == "passthrough"
        assert actor.keys[-1] == f"Bearer {UPSTREAM_KEY}"  # the stored key, not the mask

        # A new alias, with a policy; listed by /v1/models.
        new = {"upstream_base_url": route["upstream_base_url"], "candidates": 2,
               "policy": {"intervene_threshold": 0.2, "max_interventions": 1}}
        assert admin.put("/routes/team%2Fbot", json=new).status_code == 200
        assert chat(base, "team/bot").headers["x-turngate-candidates"] == "2"
        assert actor.keys[-1] == "Bearer sk-client"  # no upstream key: the client's own is forwarded
        models = httpx.get(base + "/v1/models", headers={"authorization": "Bearer x"}).json()["data"]
        assert [m["id"] for m in models] == ["agent", "plain", "team/bot"]

        # Deleted: 404 at once; a seed route gets a tombstone, and a PUT brings it back.
        assert admin.delete("/routes/plain").json() == {"alias": "plain", "deleted": True}
        assert chat(base, "plain").status_code == 404
        assert admin.delete("/routes/plain").status_code == 404
        assert admin.put("/routes/plain", json={"upstream_base_url": route["upstream_base_url"],
                                                "mode": "passthrough"}).status_code == 200
        assert chat(base, "plain").status_code == 200

        rows = audit_rows(db_url)
        assert [(r.actor, r.action, r.target) for r in rows] == [
            ("admin", "route.put", "agent"), ("admin", "route.put", "team/bot"), ("admin", "route.delete", "plain"),
            ("admin", "route.put", "plain")]
        first = rows[0]
        assert first.before["mode"] == "rank" and first.after["mode"] == "passthrough"
        assert first.after["upstream_api_key"] == "***" + UPSTREAM_KEY[-4:]
        assert rows[2].before["alias"] == "plain" and rows[2].after is None
        assert UPSTREAM_KEY not in json.dumps([[r.before, r.after] for r in rows])


def test_invalid_routes_are_refused_naming_the_field(db_url, tmp_path):  # noqa: F811
    with gateway(db_url, tmp_path) as (base, _):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        cases = [({"candidate": 3}, "candidate"), ({"candidates": 0}, "candidates"),
                 ({"mode": "best"}, "mode"), ({"policy": {"treshold": 1}}, "policy.treshold"),
                 ({"alias": "other"}, "alias"), ({"upstream_api_key": "***abcd"}, "upstream_api_key"),
                 ({"upstream_api_key": "sk-your-key-here"}, "upstream_api_key"),
                 ({"upstream_base_url": "api.openai.com/v1"}, "upstream_base_url"),
                 ({"upstream_base_url": "http://[::1"}, "upstream_base_url"),
                 ({"upstream_base_url": "http://127.0.0.1:99999/v1"}, "upstream_base_url"),
                 ({"upstream_base_url": "http://127.0.0.1:port/v1"}, "upstream_base_url"),
                 ({"upstream_base_url": "http://api.example/v1\r\nX-Injected: 1"}, "upstream_base_url"),
                 ({"upstream_base_url": "http://api.example/v 1"}, "upstream_base_url"),
                 ({"policy": {"guidance": "a\x00b"}}, None)]
        for body, param in cases:
            reply = admin.put("/routes/agent", json=body)
            assert reply.status_code == 400, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param and (param or "NUL") in error["message"], error
        assert admin.put("/routes/agent", content=b'{"deadline_s": NaN}').status_code == 400
        assert admin.put("/routes/" + "a" * 201, json={}).status_code == 400
        for alias in ("a%0Bb", "a%1Bb", "a%E2%80%A8b"):  # a vertical tab, ESC, a line separator
            reply = admin.put("/routes/" + alias, json={})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "alias", reply.text
        # Nothing changed, nothing audited.
        assert chat(base, "agent").headers["x-turngate-candidates"] == "3"
        assert audit_rows(db_url) == []
        # The last route cannot go.
        assert admin.delete("/routes/plain").status_code == 200
        last = admin.delete("/routes/agent")
        assert last.status_code == 400 and last.json()["error"]["code"] == "last_route"
        assert chat(base, "agent").status_code == 200
        # Without the admin key: 401, nothing listed.
        assert httpx.get(base + "/v1/admin/routes").status_code == 401
        wrong = {"authorization": "Bearer no"}
        assert httpx.put(base + "/v1/admin/routes/x", json={}, headers=wrong).status_code == 401


def test_the_catch_all_route_can_be_put(db_url, tmp_path):  # noqa: F811
    with gateway(db_url, tmp_path) as (base, _):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        url = admin.get("/routes").json()["data"][0]["upstream_base_url"]
        assert chat(base, "anything").status_code == 404
        assert admin.put("/routes/*", json={"upstream_base_url": url, "mode": "passthrough"}).status_code == 200
        assert chat(base, "anything").status_code == 200
        assert "*" not in [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]


def test_a_turn_in_flight_keeps_the_route_it_started_with(tmp_path):
    url = f"sqlite:///{tmp_path}/store.db"
    from service.store.migrate import upgrade

    upgrade(url)
    release = threading.Event()

    async def slow(body, attempt) -> Reply:
        if "slow" in str(body["messages"]):
            await asyncio.to_thread(release.wait, 10)
        return n_replies(body, attempt)

    with gateway(url, tmp_path, responder=slow) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-client", max_retries=0)
        done: list = []
        turn = threading.Thread(target=lambda: done.append(client.chat.completions.with_raw_response.create(
            model="agent", messages=[{"role": "user", "content": "slow"}])))
        turn.start()
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        route = {k: v for k, v in admin.get("/routes").json()["data"][0].items() if k not in ("alias", "source")}
        assert admin.put("/routes/agent", json={**route, "candidates": 1}).status_code == 200
        release.set()
        turn.join(20)
        assert done[0].headers["x-turngate-candidates"] == "3"  # the route it started on
        assert chat(base, "agent").headers["x-turngate-candidates"] == "1"


def test_without_a_database_store_changes_are_refused(tmp_path):
    with gateway(f"sqlite:///{tmp_path}/unused.db", tmp_path, store=False) as (base, _):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        assert [r["alias"] for r in admin.get("/routes").json()["data"]] == ["agent", "plain"]
        reply = admin.put("/routes/agent", json={"mode": "passthrough"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "store_unavailable"


def test_a_stored_route_that_no_longer_validates_is_skipped(db_url, tmp_path):  # noqa: F811
    engine = make_sync_engine(db_url)
    from datetime import UTC, datetime

    with engine.begin() as conn:
        conn.execute(RouteOverride.__table__.insert().values(alias="old", spec={"renamed_field": 1}, deleted=False,
                                                            updated_at=datetime.now(UTC)))
        conn.execute(RouteOverride.__table__.insert().values(alias="agent", spec=None, deleted=True,
                                                            updated_at=datetime.now(UTC)))
        conn.execute(AuditEntry.__table__.insert().values(at=datetime.now(UTC), actor="test", action="route.put",
                                                         target="old"))
    engine.dispose()
    with gateway(db_url, tmp_path) as (base, _):
        listed = httpx.get(base + "/v1/admin/routes", headers=ADMIN_HEADERS).json()["data"]
        assert [r["alias"] for r in listed] == ["plain"]  # agent deleted, old skipped (and logged)


@pytest.mark.parametrize("alias", ["agent"])
def test_the_spec_stored_holds_the_key_for_the_upstream(db_url, tmp_path, alias):  # noqa: F811
    """The key is sent upstream, so it is stored (as the YAML file holds it); only GET and audit mask it."""
    with gateway(db_url, tmp_path) as (base, _):
        admin = httpx.Client(base_url=base + "/v1/admin", headers=ADMIN_HEADERS, timeout=10)
        assert admin.put(f"/routes/{alias}", json={"upstream_api_key": "sk-new-" + "1" * 20}).status_code == 200
        engine = make_sync_engine(db_url)
        with engine.connect() as conn:
            spec = conn.execute(select(RouteOverride.spec).where(RouteOverride.alias == alias)).scalar_one()
        engine.dispose()
        assert spec["upstream_api_key"] == "sk-new-" + "1" * 20
        assert admin.get("/routes").json()["data"][0]["upstream_api_key"] == "***1111"


def turngate(*args: str, key: str | None = ADMIN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNGATE_")}
    if key is not None:
        env["TURNGATE_ADMIN_KEY"] = key
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_routes_commands(tmp_path):
    url = f"sqlite:///{tmp_path}/store.db"
    from service.store.migrate import upgrade

    upgrade(url)
    with gateway(url, tmp_path) as (base, _):
        listed = turngate("routes", "list", "--url", base)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 2 and lines[0].startswith("agent rank N=3 -> http://127.0.0.1:")
        assert f"key=***{UPSTREAM_KEY[-4:]}" in lines[0] and "(config)" in lines[0]
        assert UPSTREAM_KEY not in listed.stdout
        assert lines[1].startswith("plain passthrough N=1") and "key=client" in lines[1]

        actor_url = lines[0].split("-> ")[1].split()[0]
        good = tmp_path / "routes.yaml"
        good.write_text(f"""
routes:
  - alias: agent
    upstream_base_url: {actor_url}
    upstream_api_key: "***{UPSTREAM_KEY[-4:]}"
    candidates: 2
    policy: {{intervene_threshold: 0.3, max_interventions: 1}}
  - alias: team/bot
    upstream_base_url: {actor_url}
    mode: passthrough
""")
        applied = turngate("routes", "apply", str(good), "--url", base)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.splitlines() == [
            f"put agent rank N=2 -> {actor_url} model=agent key=***{UPSTREAM_KEY[-4:]} intervene_threshold=0.3 "
            "max_interventions=1 (admin)",
            f"put team/bot passthrough N=1 -> {actor_url} model=team/bot key=client (admin)"]
        assert chat(base, "agent").headers["x-turngate-candidates"] == "2"
        assert chat(base, "team/bot").headers["x-turngate-decision"] == "passthrough"

        bad = tmp_path / "bad.yaml"
        bad.write_text(f"routes:\n  - alias: agent\n    upstream_base_url: {actor_url}\n    candidats: 5\n")
        failed = turngate("routes", "apply", str(bad), "--url", base)
        assert failed.returncode == 1 and failed.stdout == ""
        assert failed.stderr.strip() == f"turngate: error: {bad}: routes[0]: candidats: Extra inputs are not " \
                                        "permitted; nothing was applied"
        assert chat(base, "agent").headers["x-turngate-candidates"] == "2"

        for args, key, says in [(("routes", "list", "--url", base), "wrong-key", "refused the admin key"),
                                (("routes", "list", "--url", base), None, "set TURNGATE_ADMIN_KEY"),
                                (("routes", "list", "--url", "http://127.0.0.1:9"), ADMIN, "cannot reach the gateway"),
                                (("routes", "apply", str(tmp_path / "none.yaml"), "--url", base), ADMIN,
                                 "No such file")]:
            out = turngate(*args, key=key)
            assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and says in out.stderr, out.stderr
