"""A real Prometheus scrapes `turngate serve --workers 2` under traffic and evaluates every
dashboard query and every alert expression through its HTTP API.

Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`); skipped without them.
The test starts Prometheus itself, with its own config, storage and port: never as a service.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.demo.fake_actor import free_port
from tests.test_metrics_serve import drive_traffic, scripted_actor, served_turngate

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
# Series that only exist after something this test's traffic does not cause: a Redis outage, an
# upstream call retried, a schema the checker cannot use, an LLM critic on a route, a shadow backlog
# full, a route that records only a sample. Their queries are still evaluated (they must parse).
MAY_BE_EMPTY = ("turngate_redis_errors_total", "turngate_upstream_retries_total", "turngate_schema_unchecked_total",
                "turngate_cascade_total", "turngate_llm_critic_", "turngate_shadow_shed_total",
                "turngate_turns_unrecorded_total", "turngate_critic_failures_total")

needs_prometheus = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="prometheus/promtool not installed (Debian package `prometheus`; .ci/run installs it)")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.stem, panel["title"], target["expr"]))
        for var in board["templating"]["list"]:
            if var["type"] == "query":  # label_values() is Grafana's; check its metric exists instead
                out.append((path.stem, f"variable {var['name']}", var["query"].split("(")[1].split(",")[0]))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def as_prometheus(expr: str) -> str:
    """What Grafana would send: its macros and the route variable set to All."""
    return expr.replace("$__rate_interval", "1m").replace('"$route"', '".*"')


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[tuple[str, str, dict]]:
    """(prometheus url, turngate url, turns sent) once Prometheus has scraped the traffic."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("prometheus not installed")
    tmp = tmp_path_factory.mktemp("prom")
    with scripted_actor() as actor_url, served_turngate(actor_url, tmp, workers=2) as turngate_url:
        shutil.copy(ALERTS, tmp / "alerts.yml")
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "turngate",
                                "static_configs": [{"targets": [turngate_url.removeprefix("http://")]}]}],
        }))
        port = free_port()
        log = (tmp / "prometheus.log").open("wb")
        proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--web.enable-lifecycle"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, proc, tmp, "ready")
            _wait(lambda: _value(url, 'up{job="turngate"}') == 1, proc, tmp, "a first scrape",
                  lambda: f"{_targets(url)}\nturngate log:\n{(tmp / 'serve.log').read_text()[-2000:]}")
            sent: dict[str, int] = {}
            for _ in range(3):  # traffic over a few scrapes, so rates have two samples to work with
                for route, n in drive_traffic(turngate_url).items():
                    sent[route] = sent.get(route, 0) + n
                time.sleep(1.2)
            want = sum(sent.values())
            _wait(lambda: _value(url, "sum(turngate_turns_total)") == want, proc, tmp, f"{want} turns scraped",
                  lambda: f"turns: {_value(url, 'sum(turngate_turns_total)')}; {_targets(url)}")
            time.sleep(2.5)  # one more scrape and a rule evaluation after the last turn
            yield url, turngate_url, sent
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def _wait(ok, proc: subprocess.Popen, tmp: Path, what: str, state=lambda: "", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{(tmp / 'prometheus.log').read_text()}")
        try:
            if ok():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}; {state()}\n"
                       f"prometheus log:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")


def _targets(url: str) -> str:
    targets = httpx.get(url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return "; ".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets)


def query(url: str, expr: str) -> dict:
    resp = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}\n-> {body}"
    return body["data"]


def _value(url: str, expr: str) -> float | None:
    result = query(url, expr)["result"]
    return float(result[0]["value"][1]) if result else None


@needs_prometheus
def test_promtool_accepts_the_rule_file():
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


@needs_prometheus
def test_compose_prometheus_config_is_valid():
    out = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                         check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_prometheus
def test_scrape_sees_every_turn(prometheus):
    url, _, sent = prometheus
    for route, n in sent.items():
        assert _value(url, f'sum(turngate_turns_total{{route="{route}"}})') == n


@needs_prometheus
@pytest.mark.parametrize("board, title, expr", dashboard_queries(), ids=lambda v: v if "(" not in v else None)
def test_dashboard_query_returns_series(prometheus, board, title, expr):
    url, _, _ = prometheus
    data = query(url, as_prometheus(expr))
    if not any(m in expr for m in MAY_BE_EMPTY):
        assert data["result"], f"{board} / {title}: no series for {expr}"


@needs_prometheus
@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_is_valid(prometheus, rule):
    url, _, _ = prometheus
    query(url, rule["expr"])


@needs_prometheus
def test_rules_load_and_evaluate_healthy(prometheus):
    url, _, _ = prometheus
    groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


@needs_prometheus
def test_upstream_error_alert_fires_on_the_failing_route(prometheus):
    """The traffic has a third of the passthrough route's turns fail upstream; the others none."""
    url, _, _ = prometheus
    rule = next(r for r in alert_rules() if r["alert"] == "TurngateUpstreamErrorRate")
    firing = {s["metric"]["route"] for s in query(url, rule["expr"])["result"]}
    assert "plain" in firing and "watched" not in firing
    pending = httpx.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert any(a["labels"]["alertname"] == "TurngateUpstreamErrorRate" and a["labels"]["route"] == "plain"
               for a in pending)  # pending: `for: 5m` has not passed yet
