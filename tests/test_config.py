"""Strict configuration: unknown keys refused, the policy from the environment, placeholder
secrets refused, and every CLI failure one line with its fix (through the real CLI process)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

from service.app import create_app
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings, SettingsError
from service.store.base import MemorySink
from tests.conftest import TableCritic
from tests.test_store_support import make_pg_db  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
STRONG = secrets.token_hex(24)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment: no TURNGATE_* from the caller's shell; setenv(NAME=value, ...)."""
    for name in [n for n in os.environ if n.upper().startswith("TURNGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    def setenv(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return setenv


def config(tmp_path: Path, text: str, name: str = "turngate.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, key, place, suggestion", [
    ("mod: passthrough\n", "mod", "at the top level", "mode"),
    ("routes:\n  - alias: agent\n    mod: passthrough\n", "mod", "in routes[agent]", "mode"),
    ("routes:\n  - alias: agent\n    policy:\n      intervene_treshold: 0.4\n", "intervene_treshold",
     "in routes[agent].policy", "intervene_threshold"),
    ("policy:\n  max_intervention: 2\n", "max_intervention", "in policy", "max_interventions"),
])
def test_unknown_yaml_key_is_refused_naming_key_place_file_and_match(env, tmp_path, text, key, place, suggestion):
    path = config(tmp_path, text)
    env(TURNGATE_CONFIG=path)
    with pytest.raises(SettingsError) as refused:
        Settings()
    message = str(refused.value)
    assert message == f"{path}: unknown key '{key}' {place} (did you mean {suggestion}?)"


def test_unknown_keys_given_in_code_are_refused_too():
    with pytest.raises(ValidationError, match="mod"):
        RouteSettings(alias="agent", mod="passthrough")
    with pytest.raises(ValidationError, match="intervene_treshold"):
        Settings(routes=[{"alias": "agent", "policy": {"intervene_treshold": 0.4}}])


def test_unknown_variable_is_warned_with_its_match_and_service_links_are_not(env, caplog):
    env(TURNGATE_INTERVENE_TRESHOLD="0.4", TURNGATE_SERVICE_HOST="10.0.0.1", TURNGATE_PORT="tcp://10.0.0.1:80",
        TURNGATE_PORT_80_TCP_ADDR="10.0.0.1", TURNGATE_INTERVENE_THRESHOLD="0.4")
    with caplog.at_level(logging.WARNING, logger="turngate.settings"):
        Settings()
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [("TURNGATE_INTERVENE_TRESHOLD is not a turngate setting, ignored "
                         "(did you mean TURNGATE_INTERVENE_THRESHOLD?)")]


# -- the policy from the environment ----------------------------------------------------------------


RISKY = "cancel_reservation now"


def test_default_route_policy_from_the_environment_gates_turns(env, actor, scripted):
    """TURNGATE_INTERVENE_THRESHOLD & co. shape the route built from the environment."""
    fake, actor_url = actor
    scripted.fn = lambda body, i: Reply([assistant(RISKY)])
    env(TURNGATE_UPSTREAM_BASE_URL=actor_url, TURNGATE_UPSTREAM_MODEL="gpt-test", TURNGATE_CANDIDATES="2",
        TURNGATE_INTERVENE_THRESHOLD="0.5", TURNGATE_MAX_INTERVENTIONS="1", TURNGATE_ON_EXHAUSTED="block",
        TURNGATE_BLOCK_MESSAGE="A human will take it from here.", TURNGATE_GUIDANCE="Confirm first.")
    settings = Settings()
    with serve_in_thread(create_app(settings, critic=TableCritic({RISKY: 0.1}), sink=MemorySink())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": "Cancel ABC123."}])
    assert raw.headers["x-turngate-decision"] == "blocked"
    assert raw.parse().choices[0].message.content == "A human will take it from here."
    assert len(fake.requests) == 4  # two rounds of two: the intervention ran
    assert "Confirm first." in fake.requests[2]["messages"][-1]["content"]


def test_environment_policy_overrides_the_files_field_by_field(env, tmp_path):
    env(TURNGATE_CONFIG=config(tmp_path, "policy:\n  max_interventions: 2\n  intervene_threshold: 0.3\n"),
        TURNGATE_INTERVENE_THRESHOLD="0.45")
    policy = Settings().routes[0].policy
    assert (policy.max_interventions, policy.intervene_threshold) == (2, 0.45)


def test_environment_policy_is_validated_like_a_routes(env):
    env(TURNGATE_ACCEPT_THRESHOLD="0.4", TURNGATE_INTERVENE_THRESHOLD="0.5")
    with pytest.raises(ValidationError, match=r"accept_threshold \(0.4\) must not be below"):
        Settings()


def test_default_route_settings_beside_declared_routes_are_refused(env, tmp_path, monkeypatch):
    """They would be silently ignored: the routes carry their own."""
    path = config(tmp_path, "routes:\n  - alias: agent\n")
    env(TURNGATE_CONFIG=path, TURNGATE_INTERVENE_THRESHOLD="0.4", TURNGATE_CANDIDATES="2")
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith(
        f"{path} declares routes, so TURNGATE_CANDIDATES (candidates), TURNGATE_INTERVENE_THRESHOLD "
        "(policy.intervene_threshold) would be ignored")
    # Routes given in code are the code's decision: the environment's defaults do not stop it.
    monkeypatch.delenv("TURNGATE_CONFIG")
    assert [r.alias for r in Settings(routes=[RouteSettings(alias="demo")]).routes] == ["demo"]


# -- placeholder secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, value, why", [
    ("TURNGATE_ADMIN_KEY", "change-me", "is a placeholder"),
    ("TURNGATE_ADMIN_KEY", "CHANGE-ME", "is a placeholder"),
    ("TURNGATE_ADMIN_KEY", "my-secret-admin-key", "is a placeholder"),
    ("TURNGATE_ADMIN_KEY", "Pa55-w0rd!", "is shorter than 16 characters"),
    ("TURNGATE_ADMIN_KEY", "abababababababababab", "is a placeholder"),
    ("TURNGATE_ADMIN_KEY", "abcabcabcabcabcabcabc", "has fewer than 6 distinct characters"),
    ("TURNGATE_API_KEYS", "sk-test", "is a placeholder"),
    ("TURNGATE_UPSTREAM_API_KEY", "sk-...", "is a placeholder"),
    ("TURNGATE_UPSTREAM_API_KEY", "sk-xxxxxxxxxxxxxxxxxxxxxxxx", "is a placeholder"),
    ("TURNGATE_UPSTREAM_API_KEY", "replace-me-with-your-key", "is a placeholder"),
])
def test_weak_secret_from_the_environment_is_refused_unnamed(env, name, value, why):
    env(**{name: value})
    with pytest.raises(SettingsError) as refused:
        Settings()
    message = str(refused.value)
    assert message.startswith(f"{name} {why}: replace it with real secrets")
    assert "TURNGATE_DEV=1" in message
    assert value not in message  # never echoed: it may be a real, merely short, key


def test_weak_secrets_in_the_file_are_named_by_key_and_file(env, tmp_path):
    path = config(tmp_path, f"admin_key: {STRONG}\napi_keys: [{STRONG}, short]\n"
                            "routes:\n  - alias: agent\n    upstream_api_key: CHANGE-ME\n")
    env(TURNGATE_CONFIG=path)
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value).startswith(f"api_keys (key 2) in {path} is shorter than 16 characters; "
                                         f"routes[agent].upstream_api_key in {path} is a placeholder: replace them")


def test_real_secrets_are_accepted(env):
    upstream = "sk-proj-" + secrets.token_urlsafe(60)
    env(TURNGATE_ADMIN_KEY=STRONG, TURNGATE_API_KEYS=f"{secrets.token_hex(16)},{secrets.token_urlsafe(24)}",
        TURNGATE_UPSTREAM_API_KEY=upstream, TURNGATE_DATABASE_URL="postgresql://turngate:turngate@db:5432/turngate")
    settings = Settings()
    assert settings.admin_key.get_secret_value() == STRONG
    assert settings.routes[0].upstream_api_key.get_secret_value() == upstream


def test_an_empty_secret_is_unset_not_weak(env):
    """An empty admin key turns the admin API off and an empty upstream key forwards the client's."""
    env(TURNGATE_ADMIN_KEY="", TURNGATE_UPSTREAM_API_KEY="")
    settings = Settings()
    assert not settings.admin_key and not settings.routes[0].upstream_api_key


def test_development_flag_accepts_weak_secrets_with_a_warning(env, caplog):
    env(TURNGATE_ADMIN_KEY="change-me", TURNGATE_DEV="1")
    with caplog.at_level(logging.WARNING, logger="turngate.settings"):
        assert Settings().admin_key.get_secret_value() == "change-me"
    assert [r.getMessage() for r in caplog.records] == [
        "TURNGATE_DEV is set, so weak secrets are accepted: TURNGATE_ADMIN_KEY is a placeholder"]


# -- the CLI: one line with the fix -----------------------------------------------------------------


def cli(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    """`turngate ARGS` in a subprocess, from tmp_path, with only the given TURNGATE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("TURNGATE_")}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], check=False, cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**clean, "PYTHONPATH": str(ROOT), **env})


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("turngate: error: ")
    return lines[0]


def test_db_upgrade_on_an_unreachable_server(tmp_path):
    line = one_error_line(cli(tmp_path, "db", "upgrade", "--url", "postgresql://postgres@127.0.0.1:1/turngate"))
    assert "cannot reach the database" in line and "port 1" in line
    assert "start it, or fix the host and port in --url or TURNGATE_DATABASE_URL" in line


def test_db_upgrade_on_a_database_that_does_not_exist(tmp_path, make_pg_db):  # noqa: F811
    name = f"turngate_missing_{secrets.token_hex(4)}"
    line = one_error_line(cli(tmp_path, "db", "upgrade", "--url", f"postgresql://postgres@127.0.0.1:5432/{name}"))
    assert f'database "{name}" does not exist' in line and f"createdb {name}" in line


def test_export_from_a_database_never_migrated(tmp_path, make_pg_db):  # noqa: F811
    url = make_pg_db(migrate=False)
    line = one_error_line(cli(tmp_path, "export", "--out", "-", "--url", url))
    assert "no turngate tables" in line and "turngate db upgrade" in line


@pytest.mark.parametrize("case", ["config missing", "config not yaml", "config unknown key", "bad value",
                                  "bad critic", "placeholder secret", "spool not writable", "unsupported url"])
def test_serve_refuses_a_configuration_that_cannot_work_in_one_line(tmp_path, case):
    (tmp_path / "a-file").write_text("")
    env, expected = {
        "config missing": ({"TURNGATE_CONFIG": "nowhere.yaml"},
                           "TURNGATE_CONFIG=nowhere.yaml: no such file; fix the path or unset TURNGATE_CONFIG"),
        "config not yaml": ({"TURNGATE_CONFIG": config(tmp_path, "routes: [\n", "broken.yaml")},
                            "not valid YAML at line 2, column 1"),
        "config unknown key": ({"TURNGATE_CONFIG": config(tmp_path, "mod: passthrough\n")},
                               "unknown key 'mod' at the top level (did you mean mode?)"),
        "bad value": ({"TURNGATE_CANDIDATES": "four"},
                      "TURNGATE_CANDIDATES (candidates): Input should be a valid integer"),
        "bad critic": ({"TURNGATE_CRITIC": "no-bundle"}, "/no-bundle: not a folder: point TURNGATE_CRITIC"),
        "placeholder secret": ({"TURNGATE_ADMIN_KEY": "change-me"}, "TURNGATE_ADMIN_KEY is a placeholder"),
        "spool not writable": ({"TURNGATE_SPOOL_DIR": str(tmp_path / "a-file" / "spool")},
                               "cannot write in"),
        "unsupported url": ({"TURNGATE_DATABASE_URL": "mysql://u@db/turngate"},
                            "unsupported database URL 'mysql://u@db/turngate'"),
    }[case]
    started = time.monotonic()
    line = one_error_line(cli(tmp_path, "serve", "--port", "1", **env))
    assert expected in line
    assert time.monotonic() - started < 30  # refused before any worker started


def test_serve_refuses_a_database_behind_this_release(tmp_path, make_pg_db):  # noqa: F811
    url = make_pg_db(migrate=False)
    line = one_error_line(cli(tmp_path, "serve", "--port", "1", TURNGATE_DATABASE_URL=url))
    assert "no turngate tables yet: run `turngate db upgrade`" in line


def test_critic_score_with_a_bad_bundle(tmp_path):
    (tmp_path / "req.json").write_text('{"messages": [{"role": "user", "content": "hi"}], '
                                       '"candidates": [{"role": "assistant", "content": "hello"}]}')
    line = one_error_line(cli(tmp_path, "critic", "score", "req.json", "--bundle", str(tmp_path)))
    assert f"critic bundle {tmp_path}: missing" in line


def test_debug_shows_the_traceback(tmp_path):
    for result in (cli(tmp_path, "--debug", "export", "--out", "-", TURNGATE_CONFIG="nowhere.yaml"),
                   cli(tmp_path, "export", "--out", "-", TURNGATE_CONFIG="nowhere.yaml", TURNGATE_DEBUG="1")):
        assert result.returncode != 0
        assert "Traceback" in result.stderr and "SettingsError" in result.stderr


def test_serve_on_an_unreachable_database_warns_once_and_serves(tmp_path, free_port):
    """The spool is there for database outages: a replica started during one serves, and says so."""
    log = tmp_path / "serve.log"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("TURNGATE_")}
    env = {**clean, "PYTHONPATH": str(ROOT), "TURNGATE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/turngate"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(free_port),
                                 "--log-level", "warning"], cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"not serving after 90 s:\n{log.read_text()}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    warnings = [line for line in log.read_text().splitlines() if line.startswith("turngate: warning: ")]
    assert len(warnings) == 1 and "cannot reach the database" in warnings[0]
    assert "turns go to the spool until the database answers" in warnings[0]
    assert "Traceback" not in log.read_text()


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
