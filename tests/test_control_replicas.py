"""Two `turngate serve` processes sharing PostgreSQL and Redis: a route's policy put on one governs
the other's next turn, a route deleted on one is gone on the other, a critic activated on one is
active on the other (and on a replica started later), each within 2 s; the audit log holds it all.
The harness is tests/test_replicas_support.py."""

from __future__ import annotations

import random
import statistics
import time

import httpx
import pytest

from tests.test_replicas_support import ReplicaSet, make_replicas, replicas, wait_for  # noqa: F401 - fixtures
from tests.test_store_support import make_pg_db  # noqa: F401 - fixture

LIMIT_S = 2.0


def _route(pair: ReplicaSet, alias: str) -> dict:
    listed = pair.admin(pair.a).get("/routes").json()["data"]
    return next({k: v for k, v in r.items() if k not in ("alias", "source")} for r in listed if r["alias"] == alias)


def test_a_policy_put_on_one_replica_governs_the_others_next_turn(replicas):  # noqa: F811
    a, b = replicas.a, replicas.b
    assert replicas.chat(b, "agent").headers["x-turngate-candidates"] == "3"
    route = _route(replicas, "agent")
    assert replicas.admin(a).put("/routes/agent", json={**route, "candidates": 2}).status_code == 200
    wait_for(lambda: replicas.chat(b, "agent").headers["x-turngate-candidates"] == "2", LIMIT_S)
    assert replicas.admin(a).put("/routes/agent", json={**route, "mode": "passthrough"}).status_code == 200
    wait_for(lambda: replicas.chat(b, "agent").headers["x-turngate-decision"] == "passthrough", LIMIT_S)
    # A new alias put on B serves on A.
    assert replicas.chat(a, "fresh").status_code == 404
    assert replicas.admin(b).put("/routes/fresh", json={**route, "candidates": 4}).status_code == 200
    wait_for(lambda: replicas.chat(a, "fresh").headers.get("x-turngate-candidates") == "4", LIMIT_S)
    assert [r["alias"] for r in replicas.admin(a).get("/routes").json()["data"]] == ["agent", "plain", "fresh"]


def test_a_route_deleted_on_one_replica_is_404_on_the_other(replicas):  # noqa: F811
    a, b = replicas.a, replicas.b
    route = _route(replicas, "plain")
    assert replicas.admin(a).put("/routes/doomed", json=route).status_code == 200
    wait_for(lambda: replicas.chat(b, "doomed").status_code == 200, LIMIT_S)
    assert replicas.admin(a).delete("/routes/doomed").status_code == 200
    wait_for(lambda: replicas.chat(b, "doomed").status_code == 404, LIMIT_S)
    assert replicas.chat(b, "doomed").json()["error"]["code"] == "model_not_found"
    assert replicas.admin(b).delete("/routes/doomed").status_code == 404


def test_a_critic_activated_on_one_replica_is_active_on_the_other(replicas):  # noqa: F811
    a, b = replicas.a, replicas.b
    assert replicas.admin(b).get("/critic").json()["critic"]["version"] == "1"
    v2 = replicas.bundle("v2", version="2", seed=2)
    reply = replicas.admin(a).post("/critic/activate", json={"path": str(v2)})
    assert reply.status_code == 200, reply.text
    wait_for(lambda: replicas.admin(b).get("/critic").json()["critic"]["version"] == "2", LIMIT_S)
    seen = replicas.admin(b).get("/critic").json()["activation"]
    assert seen == {**seen, "path": str(v2), "name": "tiny-critic", "version": "2", "applied": True, "error": None}

    # A replica started now follows the activation record, whatever its TURNGATE_CRITIC says.
    (c,) = replicas.start()
    try:
        assert replicas.admin(c).get("/critic").json()["critic"]["version"] == "2"
    finally:
        c.proc.terminate()
        c.proc.wait(30)
        replicas.replicas.remove(c)


def test_a_bundle_one_replica_cannot_load_leaves_it_on_its_critic_and_says_so(replicas, tmp_path):  # noqa: F811
    """A relative path resolves in each replica's working directory: a replica started in another
    folder cannot find the bundle A activates."""
    a = replicas.a
    (a.cwd / "only-on-a").symlink_to(replicas.bundle("v3", version="3", seed=3))
    (c,) = replicas.start(cwd=tmp_path / "elsewhere")
    try:
        before = replicas.admin(c).get("/critic").json()["critic"]["version"]
        assert replicas.admin(a).post("/critic/activate", json={"path": "only-on-a"}).status_code == 200
        assert replicas.admin(a).get("/critic").json()["critic"]["version"] == "3"

        def gave_up() -> bool:
            activation = replicas.admin(c).get("/critic").json()["activation"]
            return activation["path"] == "only-on-a" and activation["applied"] is False
        wait_for(gave_up, LIMIT_S)
        body = replicas.admin(c).get("/critic").json()
        assert body["critic"]["version"] == before and "only-on-a" in body["activation"]["error"]
        ready = httpx.get(c.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["critic_activation_failed"]["path"] == "only-on-a"
        assert replicas.chat(c, "plain").status_code == 200  # still serving, on its own critic
        assert "cannot be loaded here" in c.output()
    finally:
        c.proc.terminate()
        c.proc.wait(30)
        replicas.replicas.remove(c)


def test_the_audit_log_holds_every_change(replicas):  # noqa: F811
    a, b = replicas.a, replicas.b
    route = _route(replicas, "plain")
    assert replicas.admin(a).put("/routes/audited", json=route).status_code == 200
    wait_for(lambda: replicas.chat(b, "audited").status_code == 200, LIMIT_S)
    assert replicas.admin(b).delete("/routes/audited").status_code == 200
    v1 = replicas.bundles["v1"]
    b_ran = replicas.admin(b).get("/critic").json()["critic"]
    assert replicas.admin(b).post("/critic/activate", json={"path": str(v1)}).status_code == 200
    rows = replicas.sql("SELECT actor, action, target, before, after FROM audit_log ORDER BY id DESC LIMIT 3")[::-1]
    assert [(r.actor, r.action, r.target) for r in rows] == [
        ("admin", "route.put", "audited"), ("admin", "route.delete", "audited"), ("admin", "critic.activate", str(v1))]
    put, deleted, activated = rows
    assert put.before is None and put.after == {**route, "alias": "audited"}
    assert deleted.before == put.after and deleted.after is None
    assert activated.after == {"path": str(v1), "name": "tiny-critic", "version": "1"}
    assert (activated.before["name"], activated.before["version"]) == (b_ran["name"], b_ran["version"])
    wait_for(lambda: replicas.admin(a).get("/critic").json()["critic"]["version"] == "1", LIMIT_S)


def _propagation(pair: ReplicaSet, rounds: int) -> list[float]:
    """Seconds from a PUT answered on A to B listing the change (what B serves from then on)."""
    route = _route(pair, "plain")
    rng = random.Random(0)
    times = []
    for i in range(rounds):
        reply = pair.admin(pair.a).put("/routes/timed", json={**route, "candidates": 1 + i % 8})
        assert reply.status_code == 200
        want = reply.json()["candidates"]

        def seen(want: int = want) -> bool:
            listed = pair.admin(pair.b).get("/routes").json()["data"]
            return any(r["alias"] == "timed" and r["candidates"] == want for r in listed)
        times.append(wait_for(seen, LIMIT_S, every_s=0.005))
        time.sleep(rng.uniform(0.05, 1.0))  # not in step with the poll
    return times


def _summary(times: list[float]) -> str:
    return (f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
            f"over {len(times)} changes")


def test_propagation_time_with_redis(replicas):  # noqa: F811
    times = _propagation(replicas, 10)
    print(f"\npropagation with redis: {_summary(times)}")
    assert max(times) < LIMIT_S and statistics.median(times) < 0.5


@pytest.mark.parametrize("poll_s", ["1.0"])
def test_propagation_time_with_the_poll_alone(make_replicas, poll_s):  # noqa: F811
    pair = make_replicas(use_redis=False, TURNGATE_CONTROL_POLL_S=poll_s)
    times = _propagation(pair, 10)
    print(f"\npropagation by the poll alone ({poll_s} s): {_summary(times)}")
    assert max(times) < LIMIT_S
