"""The two-replica harness (no tests here): real `turngate serve` processes on their own ports,
sharing one fresh PostgreSQL database and Redis, in front of one fake actor on loopback, each
started with a small critic bundle. Fixtures: `replicas` (a pair with Redis, for a module) and
`make_replicas` (a set with the options a test needs: Redis or the poll alone, more replicas later).

    def test_something(replicas):
        a, b = replicas.a, replicas.b
        replicas.admin(a).put("/routes/agent", json={...})
        chat(b, "agent") ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from service.demo.fake_actor import FakeActor, Reply, assistant, free_port, serve_in_thread
from tests.test_critic_serving_bundles import build_bundle
from tests.test_store_support import make_pg_db, sql  # noqa: F401 - fixture

ADMIN_KEY = "adm-replicas-" + "4e8b1d" * 5
CLIENT_KEY = "sk-client-replicas"
REDIS_URL = "redis://127.0.0.1:6379/0"
READY_S = 120.0


def redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def n_replies(body: dict[str, Any], attempt: int) -> Reply:
    """n distinct text replies: the x-turngate-candidates header counts what the route asked for."""
    return Reply([assistant(f"reply {attempt}.{i}") for i in range(int(body.get("n") or 1))])


def seed_config(actor_url: str) -> dict[str, Any]:
    """The YAML routes every replica starts with."""
    common = {"upstream_base_url": actor_url, "upstream_model": "actor-model", "attempt_timeout_s": 5,
              "deadline_s": 10}
    return {"routes": [{"alias": "agent", "mode": "rank", "candidates": 3, **common},
                       {"alias": "plain", "mode": "passthrough", **common}]}


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen
    log: Path
    cwd: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ReplicaSet:
    tmp: Path
    database_url: str
    actor: FakeActor
    actor_url: str  # .../v1
    env: dict[str, str]  # every replica's TURNGATE_* (and the rest of its environment)
    replicas: list[Replica] = field(default_factory=list)
    bundles: dict[str, Path] = field(default_factory=dict)  # name -> a small critic bundle, built once

    @property
    def a(self) -> Replica:
        return self.replicas[0]

    @property
    def b(self) -> Replica:
        return self.replicas[1]

    def bundle(self, name: str, version: str, seed: int = 0) -> Path:
        if name not in self.bundles:
            self.bundles[name] = build_bundle(self.tmp / "bundles" / name, version=version, seed=seed)
        return self.bundles[name]

    def start(self, count: int = 1, cwd: Path | None = None, **env: str) -> list[Replica]:
        """`count` more replicas, started together; returns them once each answers /readyz."""
        started = []
        for _ in range(count):
            port = free_port()
            where = cwd or self.tmp
            where.mkdir(parents=True, exist_ok=True)
            log = self.tmp / f"replica-{port}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "info"],
                cwd=where, env={**self.env, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            started.append(Replica(f"http://127.0.0.1:{port}", proc, log, where))
        self.replicas += started
        for replica in started:
            _wait_ready(replica)
        return started

    def admin(self, replica: Replica) -> httpx.Client:
        return httpx.Client(base_url=replica.url + "/v1/admin", timeout=30,
                            headers={"authorization": f"Bearer {ADMIN_KEY}"})

    def chat(self, replica: Replica, model: str, content: str = "hello") -> httpx.Response:
        return httpx.post(replica.url + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {CLIENT_KEY}"},
                          json={"model": model, "messages": [{"role": "user", "content": content}]})

    def sql(self, query: str) -> list[Any]:
        """Rows of `query` on the shared database (to check what was stored and audited)."""
        return sql(self.database_url, query)

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGINT)
        for replica in self.replicas:
            try:
                replica.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            raise RuntimeError(f"turngate serve exited with {replica.proc.returncode}:\n{replica.output()}")
        try:
            if httpx.get(replica.url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"turngate serve did not get ready:\n{replica.output()}")


def wait_for(check: Callable[[], Any], limit_s: float = 2.0, every_s: float = 0.02) -> float:
    """Seconds until `check()` is truthy; fails past `limit_s` (the control plane's promise is 2 s)."""
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            raise AssertionError(f"not within {limit_s} s: {check}")
        time.sleep(every_s)


@contextmanager
def replica_set(tmp: Path, database_url: str, *, count: int = 2, use_redis: bool = True,
                responder=n_replies, **env: str) -> Iterator[ReplicaSet]:
    """`count` replicas on `database_url` (migrated), with Redis or the poll alone; stopped at the end."""
    actor = FakeActor(responder)
    with ExitStack() as stack:
        actor_url = stack.enter_context(serve_in_thread(actor.app)) + "/v1"
        config = tmp / "turngate.yaml"
        config.write_text(yaml.safe_dump(seed_config(actor_url)))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TURNGATE_", "PROMETHEUS_MULTIPROC"))}
        full_env = {**base, "TURNGATE_CONFIG": str(config), "TURNGATE_DATABASE_URL": database_url,
                    "TURNGATE_ADMIN_KEY": ADMIN_KEY, "TURNGATE_SPOOL_DIR": str(tmp / "spool"),
                    "TURNGATE_CRITIC_PROVIDERS": "CPUExecutionProvider", **env}
        if use_redis:
            full_env["TURNGATE_REDIS_URL"] = REDIS_URL
        pair = ReplicaSet(tmp, database_url, actor, actor_url, full_env)
        pair.env["TURNGATE_CRITIC"] = str(pair.bundle("v1", version="1", seed=1))
        stack.callback(pair.stop)
        pair.start(count)
        yield pair


@pytest.fixture(scope="module")
def make_replicas(make_pg_db, tmp_path_factory) -> Iterator[Callable[..., Any]]:  # noqa: F811
    """make_replicas(count=2, use_redis=True, **env) -> a started ReplicaSet on a fresh database."""
    with ExitStack() as stack:
        def make(count: int = 2, use_redis: bool = True, **env: str) -> ReplicaSet:
            if use_redis and not redis_up():
                pytest.skip("redis not reachable on 127.0.0.1:6379")
            tmp = tmp_path_factory.mktemp("replicas")
            return stack.enter_context(replica_set(tmp, make_pg_db(), count=count, use_redis=use_redis, **env))
        yield make


@pytest.fixture(scope="module")
def replicas(make_replicas) -> ReplicaSet:
    """Two replicas sharing PostgreSQL and Redis, for the whole module."""
    return make_replicas()
