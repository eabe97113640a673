"""Client keys issued through the admin API, end to end: real uvicorn servers, the openai SDK for
chat, httpx for the admin API, the real store on SQLite and PostgreSQL, and the real Redis.

What a user sees: a created key works at once and on every replica; its secret is never shown or
stored again; a revoked or expired key gets 401 everywhere within 2 s; a key limited to some
routes sees only them; a key's rpm holds across replicas; TURNGATE_API_KEYS keeps working."""

# ruff: noqa: F811 - the fixtures are imported from tests.test_store_support

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import select, text

from service.app import create_app
from service.demo.fake_actor import serve_in_thread
from service.limits.ratelimit import MemoryLimiter, RedisLimiter
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from service.store.engine import make_sync_engine
from service.store.models import ApiKey, AuditEntry
from service.store.sink import StoreSink
from tests.conftest import TableCritic
from tests.test_store_support import db_url, make_pg_db, pg_admin, shared_pg_db  # noqa: F401 - fixtures

ADMIN = "adm-7f3c9a1e5b2d4f60a8c1"
HASH_SECRET = "hs-0b8e2f6a9c4d1e7f3a5b"
STATIC = "sk-static-client-4d2a9f"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _route(alias: str, actor_url: str) -> RouteSettings:
    return RouteSettings(alias=alias, upstream_base_url=actor_url, upstream_model="actor-model", candidates=2,
                         mode="rank", attempt_timeout_s=5, deadline_s=10)


@contextmanager
def replica(actor_url: str, db: str, spool: Path, **settings: Any) -> Iterator[str]:
    """One turngate server on the shared database; its base URL (no /v1)."""
    cfg = Settings(routes=[_route("gpt-test", actor_url), _route("gpt-other", actor_url)],
                   **{"admin_key": ADMIN, "key_hash_secret": HASH_SECRET, **settings})
    sink = StoreSink(db, spool, flush_interval_s=0.2)
    with serve_in_thread(create_app(cfg, critic=TableCritic({}), sink=sink)) as url:
        yield url


@pytest.fixture
def gateway(actor, db_url, tmp_path) -> Callable:
    """gateway(**settings) -> a context manager yielding one replica's base URL."""
    count = iter(range(100))
    return lambda **settings: replica(actor[1], db_url, tmp_path / f"spool{next(count)}", **settings)


def admin(base: str, method: str, path: str = "", key: str | None = ADMIN, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{base}/v1/admin/keys{path}", headers=headers, timeout=10, **kw)


def create(base: str, **body: Any) -> dict[str, Any]:
    resp = admin(base, "POST", json={"name": "agent-1", **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


def client(base: str, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key or "", max_retries=0)


def chat(base: str, key: str | None, model: str = "gpt-test") -> str | None:
    return client(base, key).chat.completions.create(model=model, messages=USER).choices[0].message.content


def status_of(base: str, key: str | None, model: str = "gpt-test") -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + "/v1/chat/completions", headers=headers, timeout=10,
                      json={"model": model, "messages": USER}).status_code


def within(limit_s: float, ready: Callable[[], bool]) -> float:
    """Seconds until `ready()` held; fails past `limit_s`."""
    t0 = time.monotonic()
    while not ready():
        assert time.monotonic() - t0 < limit_s, f"not within {limit_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def db_rows(url: str, query) -> list[Any]:
    engine = make_sync_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(query).all())
    finally:
        engine.dispose()


# -- issuing, and the secret -------------------------------------------------------------------------

def test_a_created_key_works_for_chat_and_its_secret_is_never_shown_or_stored_again(gateway, db_url):
    with gateway() as base:
        created = create(base, name="billing-agent", routes=["gpt-test"], rpm=100, tpm=5000, budget_tokens=10**6,
                         budget_period="month")
        key = created["key"]
        assert key.startswith("tg-") and len(key) > 40 and created["prefix"] == key[:10]
        assert created["id"].startswith("key_") and len(created["id"]) == 20
        assert {k: created[k] for k in ("name", "routes", "rpm", "tpm", "budget_tokens", "budget_period",
                                        "revoked", "revoked_at", "expires_at")} == {
            "name": "billing-agent", "routes": ["gpt-test"], "rpm": 100, "tpm": 5000, "budget_tokens": 10**6,
            "budget_period": "month", "revoked": False, "revoked_at": None, "expires_at": None}

        assert chat(base, key) == "hi"

        listed, one = admin(base, "GET"), admin(base, "GET", f"/{created['id']}")
        assert listed.status_code == one.status_code == 200
        assert [k["id"] for k in listed.json()["data"]] == [created["id"]]
        assert one.json()["prefix"] == created["prefix"] and "key" not in one.json()
        for body in (listed.text, one.text):
            assert key not in body and key[10:] not in body and "secret_hash" not in body

    (row,) = db_rows(db_url, select(ApiKey))
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert row.secret_hash not in (key, digest)  # no bare digest someone reading the table could test guesses on
    assert row.secret_hash == hmac.new(HASH_SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
    assert all(key[10:] not in str(value) for value in row)
    (audit,) = db_rows(db_url, select(AuditEntry))
    assert (audit.actor, audit.action, audit.target) == ("admin", "key.create", created["id"])
    assert audit.after["name"] == "billing-agent" and key[10:] not in json.dumps(audit.after)
    assert row.secret_hash not in json.dumps(audit.after)


def test_issuing_the_first_key_turns_client_keys_on(gateway):
    with gateway() as base:
        assert chat(base, "anything-goes") == "hi" and status_of(base, None) == 200  # no keys: open, as before
        created = create(base)
        assert status_of(base, "anything-goes") == 401 and status_of(base, None) == 401
        with pytest.raises(openai.AuthenticationError) as info:
            chat(base, "tg-guessed")
        assert info.value.code == "invalid_api_key"
        assert chat(base, created["key"]) == "hi"
        # The models and the critic are behind the same keys.
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
        # Revoking the last issued key does not open the gateway again.
        assert admin(base, "DELETE", f"/{created['id']}").status_code == 200
        assert status_of(base, created["key"]) == 401
        assert status_of(base, "anything-goes") == 401 and status_of(base, None) == 401


def test_the_key_list_pages_newest_first_and_filters_revoked(gateway):
    with gateway() as base:
        made = [create(base, name=f"agent-{i}")["id"] for i in range(5)]
        assert admin(base, "DELETE", f"/{made[1]}").status_code == 200
        seen, cursor, pages = [], None, 0
        while True:
            resp = admin(base, "GET", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [k["id"] for k in page["data"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == made[::-1] and pages == 3  # every key once, newest first, revoked ones included
        live = admin(base, "GET", params={"revoked": "false"}).json()
        assert [k["id"] for k in live["data"]] == [k for k in made[::-1] if k != made[1]]
        assert live["next_cursor"] is None
        assert [k["id"] for k in admin(base, "GET", params={"revoked": "true"}).json()["data"]] == [made[1]]
        for params, param in [({"cursor": "not-ours"}, "cursor"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit")]:
            resp = admin(base, "GET", params=params)
            assert resp.status_code == 400, (params, resp.text)
            assert resp.json()["error"]["param"] == param


def test_the_static_key_list_still_works_beside_issued_keys(gateway):
    with gateway(api_keys=[STATIC]) as base:
        assert chat(base, STATIC) == "hi"
        assert status_of(base, "sk-unknown") == 401 and status_of(base, None) == 401
        created = create(base)
        assert chat(base, STATIC) == "hi" and chat(base, created["key"]) == "hi"
        admin(base, "DELETE", f"/{created['id']}")
        assert status_of(base, created["key"]) == 401 and status_of(base, "sk-unknown") == 401
        assert chat(base, STATIC) == "hi"


def test_an_issued_key_is_never_sent_to_the_upstream(gateway, actor):
    with gateway() as base:
        key = create(base)["key"]
        client(base, key).embeddings.create(model="gpt-test", input="hello")
    endpoint, _, headers = actor[0].forwarded[-1]
    assert endpoint == "embeddings" and "authorization" not in headers


# -- the admin API's guard and validation --------------------------------------------------------------

def test_every_keys_endpoint_needs_the_admin_key(gateway):
    with gateway(api_keys=[STATIC]) as base:
        created = create(base)
        calls = [("POST", "", {"json": {"name": "x"}}), ("GET", "", {}), ("GET", f"/{created['id']}", {}),
                 ("PATCH", f"/{created['id']}", {"json": {"rpm": 1}}), ("DELETE", f"/{created['id']}", {})]
        for key in (None, "wrong-admin-key", STATIC, created["key"]):
            for method, path, kw in calls:
                resp = admin(base, method, path, key=key, **kw)
                assert resp.status_code == 401, (method, path, key, resp.text)
                assert resp.json()["error"]["code"] == "invalid_api_key"
        listed = admin(base, "GET").json()["data"]
        assert [(k["id"], k["rpm"], k["revoked"]) for k in listed] == [(created["id"], None, False)]


@pytest.mark.parametrize("body, param", [
    ({"name": ""}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "nul\x00byte"}, "name"),
    ({}, "name"),
    ({"name": "a", "rpm": 0}, "rpm"),
    ({"name": "a", "rpm": -5}, "rpm"),
    ({"name": "a", "rpm": "5"}, "rpm"),
    ({"name": "a", "rpm": True}, "rpm"),
    ({"name": "a", "rpm": 2**31}, "rpm"),
    ({"name": "a", "tpm": 1.5}, "tpm"),
    ({"name": "a", "budget_tokens": 0, "budget_period": "day"}, "budget_tokens"),
    ({"name": "a", "budget_period": "day"}, None),
    ({"name": "a", "budget_tokens": 1000}, None),
    ({"name": "a", "budget_tokens": 1000, "budget_period": "week"}, "budget_period"),
    ({"name": "a", "routes": "gpt-test"}, "routes"),
    ({"name": "a", "routes": [1]}, "routes"),
    ({"name": "a", "routes": []}, "routes"),
    ({"name": "a", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "a", "expires_at": "2099-01-01T00:00:00"}, "expires_at"),
    ({"name": "a", "expires_at": "9999-12-31T23:00:00-05:00"}, "expires_at"),
    ({"name": "a", "expires_at": "soon"}, "expires_at"),
    ({"name": "a", "secret": "tg-mine"}, "secret"),
])
def test_invalid_fields_are_400_in_the_envelope(gateway, body, param):
    with gateway() as base:
        resp = admin(base, "POST", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert param is None or (error["param"] or "").startswith(param), error
        if param is None:
            assert "budget_tokens" in error["message"] and "budget_period" in error["message"]
        assert admin(base, "GET").json()["data"] == []


def test_the_largest_values_and_any_text_are_stored_as_given(gateway):
    with gateway() as base:
        body = {"name": "agent \u00e9\u4e2d\U0001f600 'quoted' \"x\"", "routes": ["gpt-test", "*", "\u00e9" * 200],
                "rpm": 2**31 - 1, "tpm": 2**31 - 1, "budget_tokens": 2**63 - 1, "budget_period": "day",
                "expires_at": "9999-12-30T23:59:59.999999+05:00"}
        created = create(base, **body)
        shown = admin(base, "GET", f"/{created['id']}").json()
        for field in ("name", "routes", "rpm", "tpm", "budget_tokens", "budget_period"):
            assert shown[field] == body[field], field
        assert datetime.fromisoformat(shown["expires_at"]) == datetime.fromisoformat(body["expires_at"])
        assert chat(base, created["key"]) == "hi"


def test_patch_changes_the_fields_given_and_null_clears(gateway, db_url):
    with gateway() as base:
        created = create(base, rpm=5, budget_tokens=100, budget_period="day", routes=["gpt-test"])
        path = f"/{created['id']}"
        changed = admin(base, "PATCH", path, json={"name": "renamed", "routes": None, "tpm": 7})
        assert changed.status_code == 200, changed.text
        assert {k: changed.json()[k] for k in ("name", "routes", "rpm", "tpm", "budget_tokens")} == {
            "name": "renamed", "routes": None, "rpm": 5, "tpm": 7, "budget_tokens": 100}
        assert changed.json()["updated_at"] > created["updated_at"]
        cleared = admin(base, "PATCH", path, json={"budget_tokens": None}).json()
        assert cleared["budget_tokens"] is None and cleared["budget_period"] is None  # the period went with it
        for bad in ({"name": None}, {"budget_period": "month"}, {"rpm": 0}, {"expires_at": "2001-01-01T00:00Z"}):
            resp = admin(base, "PATCH", path, json=bad)
            assert resp.status_code == 400 and resp.json()["error"]["message"], (bad, resp.text)
        assert admin(base, "PATCH", "/key_0000000000000000", json={"rpm": 1}).status_code == 404
        assert admin(base, "GET", path).json()["name"] == "renamed"
    actions = [(a.action, a.target) for a in db_rows(db_url, select(AuditEntry).order_by(AuditEntry.id))]
    assert actions == [("key.create", created["id"]), ("key.update", created["id"]), ("key.update", created["id"])]
    update = db_rows(db_url, select(AuditEntry).order_by(AuditEntry.id))[1]
    assert (update.before["name"], update.after["name"]) == ("agent-1", "renamed")


def test_without_the_hash_secret_creating_a_key_says_what_to_set(gateway):
    with gateway(key_hash_secret=None) as base:
        resp = admin(base, "POST", json={"name": "a"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "key_hash_secret_unset"
        assert "TURNGATE_KEY_HASH_SECRET" in resp.json()["error"]["message"]
        assert admin(base, "GET").json()["data"] == []


def test_without_a_database_the_keys_api_is_503(actor):
    cfg = Settings(routes=[_route("gpt-test", actor[1])], admin_key=ADMIN, key_hash_secret=HASH_SECRET)
    with serve_in_thread(create_app(cfg, critic=TableCritic({}), sink=MemorySink())) as base:
        for method in ("POST", "GET"):
            resp = admin(base, method, json={"name": "a"} if method == "POST" else None)
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable"
        assert chat(base, "anything") == "hi"


# -- revocation and expiry, on every replica -----------------------------------------------------------

def test_a_revoked_key_gets_401_on_another_replica_within_2_s(actor, db_url, tmp_path):
    with replica(actor[1], db_url, tmp_path / "a") as a, replica(actor[1], db_url, tmp_path / "b") as b:
        created = create(a)
        key, path = created["key"], f"/{created['id']}"
        within(2.0, lambda: status_of(b, key) == 200)  # issued on one, served by the other
        assert chat(b, key) == "hi"

        revoked = admin(a, "DELETE", path)
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert status_of(a, key) == 401  # the replica that revoked it: at once
        within(2.0, lambda: status_of(b, key) == 401)
        with pytest.raises(openai.AuthenticationError) as info:
            chat(b, key)
        assert info.value.code == "invalid_api_key" and "revoked" in info.value.message

        shown = admin(b, "GET", path).json()
        assert shown["revoked"] is True and shown["revoked_at"] is not None and shown["prefix"] == key[:10]
        for method, kw in (("DELETE", {}), ("PATCH", {"json": {"rpm": 3}})):
            again = admin(b, method, path, **kw)
            assert again.status_code == 404 and again.json()["error"]["code"] == "key_not_found"
        for unknown in ("/key_0123456789abcdef", "/nope", "/%00"):
            resp = admin(a, "DELETE", unknown)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "key_not_found", resp.text


def test_an_expired_key_gets_401(gateway):
    with gateway() as base:
        lasting = create(base, name="lasting")
        soon = datetime.now(UTC) + timedelta(seconds=2)
        created = create(base, name="short-lived", expires_at=soon.isoformat())
        assert datetime.fromisoformat(created["expires_at"]) == soon
        assert chat(base, created["key"]) == "hi"
        time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
        with pytest.raises(openai.AuthenticationError) as info:
            chat(base, created["key"])
        assert "expired" in info.value.message
        assert chat(base, lasting["key"]) == "hi"
        # Given a new expiry, it works again.
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert admin(base, "PATCH", f"/{created['id']}", json={"expires_at": later}).status_code == 200
        assert chat(base, created["key"]) == "hi"


# -- allowed routes ------------------------------------------------------------------------------------

def test_a_key_limited_to_some_routes_sees_and_uses_only_them(gateway):
    with gateway() as base:
        limited = create(base, routes=["gpt-test"])
        other = create(base, name="every-route")
        sdk = client(base, limited["key"])
        assert sdk.chat.completions.create(model="gpt-test", messages=USER).choices[0].message.content == "hi"
        with pytest.raises(openai.NotFoundError) as info:
            sdk.chat.completions.create(model="gpt-other", messages=USER)
        assert info.value.code == "model_not_found"
        assert info.value.body["message"] == "The model `gpt-other` does not exist or you do not have access to it."
        with pytest.raises(openai.NotFoundError) as info:
            sdk.embeddings.create(model="gpt-other", input="x")
        assert info.value.code == "model_not_found"
        assert [m.id for m in sdk.models.list()] == ["gpt-test"]
        assert sdk.models.retrieve("gpt-test").id == "gpt-test"
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("gpt-other")
        assert sorted(m.id for m in client(base, other["key"]).models.list()) == ["gpt-other", "gpt-test"]
        assert chat(base, other["key"], model="gpt-other") == "hi"
        # Every route again once the list is cleared.
        admin(base, "PATCH", f"/{limited['id']}", json={"routes": None})
        assert chat(base, limited["key"], model="gpt-other") == "hi"


# -- requests per minute -------------------------------------------------------------------------------

def test_a_keys_rpm_is_enforced_in_process_without_a_global_limit(gateway):
    with gateway() as base:
        limited, free = create(base, rpm=2), create(base, name="free")
        chat(base, limited["key"]), chat(base, limited["key"])
        with pytest.raises(openai.RateLimitError) as info:
            chat(base, limited["key"])
        assert info.value.code == "rate_limit_exceeded" and 0 < int(info.value.response.headers["retry-after"]) <= 120
        for _ in range(4):
            assert chat(base, free["key"]) == "hi"  # no global limit: a key without rpm is not limited


def test_a_keys_rpm_overrides_the_global_limit(gateway):
    with gateway(rate_limit_per_minute=1, api_keys=[STATIC]) as base:
        generous = create(base, rpm=3)
        assert [chat(base, generous["key"]) for _ in range(3)] == ["hi"] * 3
        assert status_of(base, generous["key"]) == 429
        chat(base, STATIC)
        assert status_of(base, STATIC) == 429  # the global limit still governs the static keys


@pytest.mark.skipif(not _redis_up(), reason="redis not reachable")
def test_a_keys_rpm_holds_across_replicas_through_redis(actor, db_url, tmp_path):
    with replica(actor[1], db_url, tmp_path / "a", redis_url=REDIS_URL) as a, \
            replica(actor[1], db_url, tmp_path / "b", redis_url=REDIS_URL) as b:
        created = create(a, rpm=3)
        within(2.0, lambda: status_of(b, "tg-not-a-key") == 401)  # b knows keys are on now
        try:
            within(2.0, lambda: status_of(b, created["key"]) == 200)  # b knows this key: one request spent
            assert chat(a, created["key"]) == "hi" and chat(b, created["key"]) == "hi"
            assert status_of(a, created["key"]) == 429 and status_of(b, created["key"]) == 429
        finally:
            store = redis.Redis.from_url(REDIS_URL)
            counters = store.keys(f"turngate:rl:{created['id']}:*")
            assert counters and store.delete(*counters) >= 1


def test_an_issued_keys_token_budget_is_enforced(gateway):
    """The budget set through the admin API reaches the spend check (service.limits.spend)."""
    with gateway() as base:
        created = create(base, budget_tokens=1, budget_period="day")
        assert chat(base, created["key"]) == "hi"  # a turn in flight is never cut; its bill lands after it
        within(5.0, lambda: status_of(base, created["key"]) == 429)
        with pytest.raises(openai.RateLimitError) as info:
            chat(base, created["key"])
        assert info.value.code == "budget_exceeded"
        admin(base, "PATCH", f"/{created['id']}", json={"budget_tokens": None})
        within(2.0, lambda: status_of(base, created["key"]) == 200)


# -- the sliding window ---------------------------------------------------------------------------------

async def _slide(limiter, monkeypatch) -> None:
    start = 60.0 * 29_000_000  # a bucket boundary
    clock = [start + 50]
    monkeypatch.setattr("service.limits.ratelimit.time.time", lambda: clock[0])
    assert [(await limiter.hit("k", 4)).allowed for _ in range(5)] == [True] * 4 + [False]
    clock[0] = start + 60  # a new minute: a fixed window would let 4 more through at once
    refused = await limiter.hit("k", 4)
    assert not refused.allowed and refused.retry_after_s == 15  # the last minute's 4 weigh 3 by then
    clock[0] = start + 75
    assert [(await limiter.hit("k", 4)).allowed for _ in range(2)] == [True, False]


async def test_the_window_slides_in_process(monkeypatch):
    await _slide(MemoryLimiter(), monkeypatch)


@pytest.mark.skipif(not _redis_up(), reason="redis not reachable")
async def test_the_window_slides_in_redis(monkeypatch):
    prefix = f"turngate:test-keys:{uuid.uuid4().hex}"
    limiter = RedisLimiter(REDIS_URL, prefix=prefix)
    try:
        await _slide(limiter, monkeypatch)
    finally:
        await limiter.redis.delete(*await limiter.redis.keys(f"{prefix}:*"))
        await limiter.close()


# -- the command line ------------------------------------------------------------------------------------

def _turngate(*args: str, admin_key: str | None = ADMIN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    if admin_key:
        env["TURNGATE_ADMIN_KEY"] = admin_key
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=ROOT)


def test_the_cli_creates_lists_and_revokes_keys(gateway, db_url):
    with gateway() as base:
        made = _turngate("keys", "create", "ci-bot", "--routes", "gpt-test", "--rpm", "9", "--budget-tokens", "500",
                         "--budget-period", "day", "--expires-at", "2099-01-01T00:00:00", "--url", base)
        assert made.returncode == 0, made.stderr
        (line,) = made.stdout.splitlines()
        key_id, secret = line.split()[:2]
        assert key_id.startswith("key_") and secret.startswith("tg-") and "'ci-bot'" in line
        assert "routes=gpt-test" in line and "rpm=9" in line and "budget=500/day" in line and "2099" in line
        assert "shown only this once" in made.stderr
        assert chat(base, secret) == "hi"

        listed = _turngate("keys", "list", "--url", base)
        assert listed.returncode == 0 and listed.stdout.splitlines() == [
            f"{key_id}  {secret[:10]}...  live  'ci-bot'  routes=gpt-test  rpm=9  budget=500/day  "
            "expires=2099-01-01T00:00:00Z"]
        assert secret[10:] not in listed.stdout

        revoked = _turngate("keys", "revoke", key_id, "--url", base)
        assert revoked.returncode == 0 and revoked.stdout.split()[:3] == [key_id, f"{secret[:10]}...", "revoked"]
        assert status_of(base, secret) == 401

        for args, admin_key, says in [
            (("keys", "revoke", key_id, "--url", base), ADMIN, "404"),
            (("keys", "list", "--url", base), "wrong-admin-key", "invalid admin key"),
            (("keys", "list", "--url", base), None, "set TURNGATE_ADMIN_KEY"),
            (("keys", "create", "x", "--rpm", "0", "--url", base), ADMIN, "rpm"),
            (("keys", "list", "--url", "http://127.0.0.1:9"), ADMIN, "cannot reach turngate"),
        ]:
            failed = _turngate(*args, admin_key=admin_key)
            assert failed.returncode == 1 and failed.stdout == "", (args, failed.stdout)
            (err,) = failed.stderr.splitlines()
            assert err.startswith("turngate: error: ") and says in err, (args, err)
    assert db_rows(db_url, text("select count(*) from api_keys"))[0][0] == 1


def test_a_replica_that_cannot_read_its_keys_refuses_rather_than_opens(actor, make_pg_db, tmp_path):
    """A replica started while the database is away cannot tell issued keys (or whether keys are
    required): it answers 503 to every key but the static ones until it has read them."""
    url = make_pg_db()
    name = url.rsplit("/", 1)[1]
    with replica(actor[1], url, tmp_path / "a") as a:
        created = create(a)
    pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        with replica(actor[1], url, tmp_path / "b", api_keys=[STATIC]) as b:
            for key in (created["key"], "sk-stranger", None):
                headers = {"authorization": f"Bearer {key}"} if key else {}
                resp = httpx.get(b + "/v1/models", headers=headers, timeout=10)
                assert resp.status_code == 503 and resp.json()["error"]["code"] == "keys_unavailable"
            assert chat(b, STATIC) == "hi"  # the static keys need no database
            ready = httpx.get(b + "/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["keys"] == {"loaded": False}
            pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            within(5.0, lambda: status_of(b, created["key"]) == 200)
            assert status_of(b, "sk-stranger") == 401
            assert httpx.get(b + "/readyz", timeout=10).json()["keys"] == {"loaded": True}
    finally:
        pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
