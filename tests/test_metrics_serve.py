"""`turngate serve --workers 2` as a real process: /metrics sums every worker (multiprocess mode).

The helpers here (a scripted actor, the served process, a traffic mix) are shared with
tests/test_prometheus.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
import yaml
from openai.types.chat import ChatCompletionToolParam

from service.demo.fake_actor import FakeActor, Reply, assistant, free_port, serve_in_thread
from service.store import migrate

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TOOLS: list[ChatCompletionToolParam] = [{"type": "function", "function": {
    "name": "get_order", "description": "Look an order up",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                   "required": ["order_id"]}}}]


def traffic_responder(body: dict, attempt: int) -> Reply:
    """The actor's side of the traffic mix; the last user message says what to do."""
    said = str(body["messages"][-1].get("content"))
    n = int(body.get("n") or 1)
    if "upstream-down" in said:
        return Reply(status=503)
    if "flaky" in said and attempt % 2:
        return Reply(status=500)
    if body.get("tools"):  # one good call, one call to a tool that does not exist, one bad schema
        pool = [assistant(tool_calls=[("get_order", {"order_id": "A1"})]),
                assistant(tool_calls=[("cancel_everything", {})]),
                assistant(tool_calls=[("get_order", {"order_id": 7})])]
        return Reply([pool[(attempt + i) % 3] for i in range(n)])
    return Reply([assistant(f"reply {attempt}.{i}") for i in range(n)])


def route_config(actor_url: str) -> dict:
    """One route per mode, plus adaptive sampling that always stops early. The ranking route asks
    for a score of 1.0 before it accepts a round, so its turns intervene whatever the critic."""
    common = {"upstream_base_url": actor_url, "upstream_model": "actor-model", "attempt_timeout_s": 5,
              "deadline_s": 10, "candidates": 3}
    return {"routes": [
        {"alias": "gated", "mode": "rank", **common,
         "policy": {"intervene_threshold": 1.0, "max_interventions": 1}},
        {"alias": "adaptive", "mode": "rank", **common,
         "policy": {"sampling": "adaptive", "accept_threshold": 0.0, "initial_candidates": 1}},
        {"alias": "watched", "mode": "shadow", **common},
        {"alias": "plain", "mode": "passthrough", **common},
    ]}


@contextmanager
def scripted_actor() -> Iterator[str]:
    with serve_in_thread(FakeActor(traffic_responder).app) as url:
        yield url + "/v1"


@contextmanager
def migrated_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated the way a deployment does before the proxy starts."""
    name = f"turngate_metrics_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        migrate.upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def served_turngate(actor_url: str, tmp: Path, workers: int = 2, env: dict | None = None) -> Iterator[str]:
    """`turngate serve --workers N` in a subprocess, configured for the traffic mix and logging to
    its own PostgreSQL database, as in production; yields its URL."""
    with migrated_postgres() as database_url:
        yield from _serve(actor_url, database_url, tmp, workers, env)


def _serve(actor_url: str, database_url: str, tmp: Path, workers: int, env: dict | None) -> Iterator[str]:
    config = tmp / "turngate.yaml"
    config.write_text(yaml.safe_dump(route_config(actor_url)))
    port = free_port()
    full_env = {**os.environ, "TURNGATE_CONFIG": str(config), "TURNGATE_DATABASE_URL": database_url,
                "TURNGATE_SPOOL_DIR": str(tmp / "spool"), **(env or {})}
    full_env.pop("TURNGATE_REDIS_URL", None)
    if not (env or {}).get("PROMETHEUS_MULTIPROC_DIR"):
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--workers", str(workers), "--log-level", "warning"],
                            cwd=tmp, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, workers, tmp / "serve.log")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, workers: int, log: Path) -> None:
    """Ready once /readyz answers, and answers from every worker (the pids in the metrics)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"turngate serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"turngate serve did not get ready:\n{log.read_text()}")


def drive_traffic(base_url: str, rounds: int = 1) -> dict[str, int]:
    """Send the traffic mix through the real openai client; returns turns sent per route."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0, timeout=20)
    sent = {"gated": 0, "adaptive": 0, "watched": 0, "plain": 0}
    for _ in range(rounds):
        for route in sent:
            client.chat.completions.create(model=route, messages=[{"role": "user", "content": "hello"}])
            client.chat.completions.create(model=route, messages=[{"role": "user", "content": "order A1?"}],
                                           tools=TOOLS)
            sent[route] += 2
        client.chat.completions.create(model="gated", messages=[{"role": "user", "content": "flaky"}])
        sent["gated"] += 1
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "upstream-down"}])
        sent["plain"] += 1
    return sent


_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparseable exposition line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples, metric: str, **labels: str) -> float:
    return sum(v for n, ls, v in samples if n == metric and all(ls.get(k) == w for k, w in labels.items()))


# -- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("serve2")
    with scripted_actor() as actor_url, served_turngate(actor_url, tmp, workers=2) as url:
        yield url, tmp


def test_metrics_sum_over_both_workers(two_workers):
    url, _ = two_workers
    before = parse_metrics(httpx.get(url + "/metrics").text)
    sent = drive_traffic(url, rounds=4)
    # Each scrape lands on one worker or the other; every one must count all the turns.
    for _ in range(12):
        after = parse_metrics(httpx.get(url + "/metrics").text)
        for route, n in sent.items():
            assert total(after, "turngate_turns_total", route=route) - \
                total(before, "turngate_turns_total", route=route) == n
    # The error turns are there too, by decision.
    assert total(after, "turngate_turns_total", route="plain", decision="error") >= 4
    assert total(after, "turngate_upstream_errors_total", route="plain", kind="server_error") >= 4
    assert total(after, "turngate_interventions_total", route="gated") >= 4


def test_critic_info_is_one_gauge_series_per_critic(two_workers):
    url, _ = two_workers
    samples = parse_metrics(httpx.get(url + "/metrics").text)
    info = [(ls, v) for n, ls, v in samples if n == "turngate_critic_info"]
    ready = httpx.get(url + "/readyz").json()["critic"]
    active = [ls for ls, v in info if v == 1]
    # Both workers run the same critic: the livemax gauge gives one series, not one per worker.
    assert active == [{"name": ready["name"], "version": ready["version"], "provider": ready["provider"]}]


def test_serve_makes_its_own_directory_and_removes_it(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with scripted_actor() as actor_url, served_turngate(actor_url, tmp_path, env={"TMPDIR": str(tmpdir)}) as url:
        drive_traffic(url)
        made = list(tmpdir.glob("turngate-metrics-*"))
        assert len(made) == 1 and any(made[0].glob("counter_*.db"))
    assert not list(tmpdir.glob("turngate-metrics-*"))


def test_operator_directory_is_emptied_on_start(tmp_path):
    """An operator-chosen PROMETHEUS_MULTIPROC_DIR is emptied on start; a stale count does not leak in."""
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    # A leftover value file from an earlier run: a counter that would add 1000 turns.
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    stale = MmapedDict(str(prom_dir / "counter_99999.db"))
    stale.write_value(mmap_key("turngate_turns_total", "turngate_turns_total",
                               ["route", "mode", "decision"], ["gated", "rank", "ranked"], "x"), 1000.0, 0.0)
    stale.close()
    with scripted_actor() as actor_url, \
            served_turngate(actor_url, tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}) as url:
        assert not (prom_dir / "counter_99999.db").exists()
        samples = parse_metrics(httpx.get(url + "/metrics").text)
        assert total(samples, "turngate_turns_total") == 0
        drive_traffic(url)
        assert any(prom_dir.glob("*.db"))
    # The operator's directory is kept (it may be a mounted volume), the temp one is not.
    assert prom_dir.is_dir()
