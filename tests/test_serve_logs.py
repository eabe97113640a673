"""`turngate serve` sets up logging: plain or JSON lines at the configured level, and one start-up
line with the effective configuration, secrets masked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service import config_summary
from service.demo.fake_actor import free_port
from service.settings import Settings

SECRET = "sk-route-" + "5f1c9a" * 6


def serve(tmp_path: Path, *args: str, **env: str) -> tuple[str, str]:
    """Runs `turngate serve` until it is ready, sends one request, stops it; returns (request id, output)."""
    config = tmp_path / "turngate.yaml"
    config.write_text(f"""
routes:
  - alias: agent
    upstream_base_url: http://127.0.0.1:9/v1
    upstream_api_key: {SECRET}
    candidates: 3
  - alias: "*"
    mode: passthrough
""")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TURNGATE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
        env={**base, "TURNGATE_CONFIG": str(config), "TURNGATE_DATABASE_URL": f"sqlite:///{tmp_path}/t.db",
             "TURNGATE_SPOOL_DIR": str(tmp_path / "spool"), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    request_id = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                request_id = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).headers.get("x-request-id", "")
                break
            except httpx.TransportError:
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    return request_id, out


def test_json_lines_with_the_effective_configuration(tmp_path):
    _, out = serve(tmp_path, TURNGATE_LOG_FORMAT="json")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([line for line in out.splitlines() if line.strip()]), out
    (ready,) = [line for line in lines if line["message"].startswith("turngate ready")]
    assert ready["level"] == "info" and ready["logger"] == "turngate"
    config = ready["config"]
    agent, catch_all = config["routes"]
    assert agent == {**agent, "alias": "agent", "mode": "rank", "candidates": 3, "upstream_key": "route",
                     "upstream": "http://127.0.0.1:9/v1", "model": "agent"}
    assert catch_all == {**catch_all, "alias": "*", "mode": "passthrough", "candidates": 1,
                         "upstream_key": "client", "model": "(as asked)"}
    assert config["critic"]["name"] and config["critic"]["version"] and config["critic"]["provider"]
    assert config["database"]["kind"] == "sqlite"
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines, same format
    assert SECRET not in out


def test_plain_lines_and_the_level_setting(tmp_path):
    _, out = serve(tmp_path)
    (ready,) = [line for line in out.splitlines() if "turngate ready" in line]
    assert " INFO turngate: turngate ready: routes=[agent rank N=3 -> http://127.0.0.1:9/v1" in ready
    assert "critic=" in ready and "database=sqlite" in ready
    assert SECRET not in out
    _, quiet = serve(tmp_path, "--log-level", "warning")
    assert "turngate ready" not in quiet and " INFO " not in quiet


def test_secrets_in_urls_and_keys_are_masked():
    settings = Settings(database_url="postgresql://turngate:hunter2-db-pass@db.internal:5432/turngate",
                        redis_url="redis://:hunter2-redis-pass@cache:6379/0", api_keys="k1-" + "a" * 30,
                        upstream_api_key=SECRET, upstream_base_url="https://user:hunter2-up@llm.example/v1")
    critic = type("C", (), {"name": "c", "version": "1", "provider": "CPUExecutionProvider"})()
    summary = config_summary.effective(settings, critic)
    text = json.dumps(summary) + config_summary.one_line(summary)
    for secret in ("hunter2", SECRET, "k1-"):
        assert secret not in text
    assert summary["database"] == {"kind": "postgresql", "url": "postgresql://turngate:***@db.internal:5432/turngate"}
    assert summary["redis"] == "redis://:***@cache:6379/0"
    assert summary["routes"][0]["upstream"] == "https://user:***@llm.example/v1"
    assert summary["client_keys"] == 1
