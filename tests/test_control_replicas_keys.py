"""Two `turngate serve` processes sharing PostgreSQL and Redis, for client keys: a key issued on one
works on the other; its rpm limit and its token budget hold across both; revoked on one, it is
refused by both within 2 s. The harness is tests/test_replicas_support.py."""

from __future__ import annotations

import httpx
import pytest

from tests.test_replicas_support import ReplicaSet, make_replicas, wait_for  # noqa: F401 - fixtures
from tests.test_store_support import make_pg_db  # noqa: F401 - fixture

LIMIT_S = 2.0
PLAIN_TURN_TOKENS = 15  # the fake actor's usage for one passthrough call: 10 prompt + 5 completion


@pytest.fixture(scope="module")
def pair(make_replicas) -> ReplicaSet:  # noqa: F811
    return make_replicas(TURNGATE_KEY_HASH_SECRET="replicas-hash-" + "9c1f" * 8)


def chat(pair: ReplicaSet, replica, key: str, model: str = "plain") -> httpx.Response:
    return httpx.post(replica.url + "/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hello"}]})


def issue(pair: ReplicaSet, replica, **fields) -> dict:
    reply = pair.admin(replica).post("/keys", json={"name": "agent", **fields})
    assert reply.status_code == 201, reply.text
    return reply.json()


def spent(pair: ReplicaSet, replica, key_id: str) -> int | None:
    return pair.admin(replica).get(f"/keys/{key_id}").json()["spend"]["tokens"]


def test_a_key_issued_on_one_replica_works_on_the_other_and_revoked_fails_on_both(pair):
    a, b = pair.a, pair.b
    created = issue(pair, a)
    wait_for(lambda: chat(pair, b, created["key"]).status_code == 200, LIMIT_S)
    assert chat(pair, a, created["key"]).status_code == 200
    assert chat(pair, b, "sk-stranger").status_code == 401  # issuing a key turned client keys on, on B too

    assert pair.admin(b).delete(f"/keys/{created['id']}").status_code == 200
    took = max(wait_for(lambda r=r: chat(pair, r, created["key"]).status_code == 401, LIMIT_S) for r in (a, b))
    assert took < LIMIT_S
    assert chat(pair, a, created["key"]).json()["error"]["code"] == "invalid_api_key"
    assert [row.action for row in pair.sql("SELECT action FROM audit_log WHERE target = "
                                           f"'{created['id']}' ORDER BY id")] == ["key.create", "key.revoke"]


def test_a_keys_rpm_holds_across_both_replicas(pair):
    a, b = pair.a, pair.b
    created = issue(pair, a, rpm=4)
    wait_for(lambda: chat(pair, b, created["key"]).status_code == 200, LIMIT_S)  # request 1, on B
    statuses = [chat(pair, r, created["key"]).status_code for r in (a, b, a, b, a)]
    assert statuses == [200, 200, 200, 429, 429]  # 4 in the minute, whichever replica served them
    other = issue(pair, b)
    wait_for(lambda: chat(pair, a, other["key"]).status_code == 200, LIMIT_S)  # another key is not limited


def test_a_keys_budget_holds_across_both_replicas(pair):
    a, b = pair.a, pair.b
    created = issue(pair, b, budget_tokens=3 * PLAIN_TURN_TOKENS, budget_period="day")
    key, key_id = created["key"], created["id"]
    wait_for(lambda: chat(pair, a, key).status_code == 200, LIMIT_S)  # turn 1, on A
    # Spend is charged after each reply; both replicas read the same Redis counters.
    wait_for(lambda: spent(pair, b, key_id) == PLAIN_TURN_TOKENS, LIMIT_S)
    assert chat(pair, b, key).status_code == 200  # turn 2, on B
    wait_for(lambda: spent(pair, a, key_id) == 2 * PLAIN_TURN_TOKENS, LIMIT_S)
    assert chat(pair, a, key).status_code == 200  # turn 3 spends the rest
    wait_for(lambda: spent(pair, b, key_id) == 3 * PLAIN_TURN_TOKENS, LIMIT_S)
    for replica in (a, b):
        refused = chat(pair, replica, key)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert refused.json()["error"]["type"] == "insufficient_quota"
    # Raising the budget on one replica lets the key go on, on both.
    assert pair.admin(a).patch(f"/keys/{key_id}", json={"budget_tokens": 10 * PLAIN_TURN_TOKENS}).status_code == 200
    for replica in (b, a):
        wait_for(lambda r=replica: chat(pair, r, key).status_code == 200, LIMIT_S)
