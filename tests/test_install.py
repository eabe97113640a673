"""A plain install works outside the checkout: the built wheel, in a fresh venv, from another folder,
migrates a database, runs the demo and serves.

The venv borrows the test environment's site-packages for turngate's dependencies (a .pth line, so
nothing is downloaded), but not its editable install of turngate: only the wheel's copy can be found.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from service.demo.fake_actor import free_port

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is built from (pyproject.toml and setup.py say how).
PACKAGE_SOURCES = ["pyproject.toml", "setup.py", "README.md", "service", "critic_models", "migrations"]
# Modules of the optional extras, hidden from the installed turngate.
EXTRAS_ONLY = ["openai", "pytest", "torch", "matplotlib", "schemathesis", "playwright", "litellm"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's bin folder, an empty working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy of the package's sources: an in-tree build would reuse the checkout's build/.
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("turngate-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    # Installed before the dependencies are visible: pip would take the editable turngate for this one.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, check=False,
                          env=_env())  # PYTHONPATH's checkout holds a turngate.egg-info pip would take too
    assert done.returncode == 0, done.stderr
    # The dependencies: the test environment's site-packages, added as a plain path (its .pth files,
    # the editable install's finder among them, are not run).
    Path(purelib, "turngate_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # ...except those of the extras (dev, train): a plain install has none of them.
    for module in EXTRAS_ONLY:
        Path(purelib, module).mkdir()
        Path(purelib, module, "__init__.py").write_text(f"raise ImportError('{module} comes with an extra only')\n")
    work = tmp / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TURNGATE_", "PYTHON", "VIRTUAL_ENV", "OTEL_"))}
    return {**env, **extra}


def _run(bin_: Path, work: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_ / "turngate"), *args], cwd=work, env=_env(**env), capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_wheel_is_what_runs(installed):
    bin_, work = installed
    code = "import service, critic_models; print(service.__file__); print(critic_models.__file__)"
    where = subprocess.run([bin_ / "python", "-c", code],
                           cwd=work, env=_env(), capture_output=True, text=True, check=True).stdout.split()
    assert all(str(bin_.parent) in path for path in where), where


def test_version(installed):
    bin_, work = installed
    out = _run(bin_, work, "--version")
    assert out.returncode == 0, out.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.stdout.strip() == f"turngate {version}"


def test_db_upgrade_from_another_folder(installed):
    bin_, work = installed
    db = work / "migrated.db"
    out = _run(bin_, work, "db", "upgrade", "--url", f"sqlite:///{db}")
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        head = conn.execute("select version_num from alembic_version").fetchone()[0]
    assert {"conversations", "turns", "candidates"} <= tables
    assert head == max(p.name for p in (ROOT / "migrations/versions").glob("0*.py")).split("_")[0]


def test_demo_from_another_folder(installed):
    bin_, work = installed
    out = _run(bin_, work, "demo", "--turns", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("decision: ") == 2


def test_serve_from_another_folder(installed):
    bin_, work = installed
    port = free_port()
    proc = subprocess.Popen([str(bin_ / "turngate"), "serve", "--port", str(port)], cwd=work,
                            env=_env(TURNGATE_DATABASE_URL=f"sqlite:///{work / 'served.db'}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert ready is not None, proc.communicate(timeout=10)[0] if proc.poll() is not None else "no answer"
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert (work / "served.db").exists()
        page = httpx.get(f"http://127.0.0.1:{port}/admin", timeout=5)  # package data: the inspector page
        assert page.status_code == 200 and "turn inspector" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
