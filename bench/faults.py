"""The fault suite: turns served through a real turngate process while its neighbours fail.

    python bench/faults.py [--seconds 5] [--concurrency 8] [--faults control,pg-kill,...]

Processes, all on loopback: a fixed-latency fake upstream (bench/_lean_http.py), turngate (the
real app, store and spool, with the critic stubbed to a constant time: bench/_stub_proxy.py) on a
PostgreSQL database this script creates and drops, a private redis-server for the Redis fault, and
this load generator (closed loop, `--concurrency` clients). Each fault gets a fresh turngate
process and `--seconds` of load with the fault in the middle; then the script waits (bounded) for
the store to catch up and counts, per fault:

    sent      requests sent
    failed    requests not answered 200 (refused connections while the process was down, ...)
    answered  turns answered 200 (their x-turngate-turn-id)
    stored    answered turns found in the database
    dups      rows beyond one per answered turn (turns and candidates)

Faults: control (none), pg-kill (the writer's connections killed every 0.3 s), pg-refuse (the
database refuses connections for 5 s), poison (1 request in 4 carries a record-breaking input:
over-long conversation ids, NUL, lone surrogates, malformed history), sigkill (SIGKILL mid-load,
then a restart), sigterm (SIGTERM mid-load, then a restart), redis-down (a rate limit through
Redis, whose server is killed for 3 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.demo.fake_actor import free_port  # noqa: E402 - after the path insert
from service.store.migrate import upgrade  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CANDIDATES = 2

# Hostile bodies (bytes: the lone surrogate can only be sent as a JSON escape).
POISON = [
    json.dumps({"model": "rank", "messages": [{"role": "user", "content": "long id"}],
                "metadata": {"conversation_id": "m" * 300}}).encode(),
    b'{"model": "rank", "messages": [{"role": "user", "content": "nul \\u0000 here"}]}',
    b'{"model": "rank", "messages": [{"role": "user", "content": "lone \\ud800 surrogate"}]}',
    json.dumps({"model": "rank", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": "get_order"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]}).encode(),
    json.dumps({"model": "rank",
                "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}).encode(),
    json.dumps({"model": "rank", "messages": [{"role": "user", "content": "tool nul"}],
                "tools": [{"type": "function", "function": {"name": "get\u0000x", "parameters": {}}}]}).encode(),
]
POISON_HEADERS = {"x-turngate-conversation-id": "h" * 300}


@dataclass
class Row:
    fault: str
    sent: int = 0
    failed: int = 0
    answered: list[str] = field(default_factory=list)
    stored: int = 0
    dups: int = 0
    note: str = ""
    answered_before_fault: int = 0
    failures: Counter = field(default_factory=Counter)  # status code or error name -> count


def admin(sql: str, url: str = ADMIN) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def wait_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


class Harness:
    """One database, one fake upstream; turngate processes started and stopped per fault."""

    def __init__(self, db_url: str, workdir: Path, log=print) -> None:
        self.db_url, self.dir, self.log = db_url, workdir, log
        self.actor_port, self.port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.actor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_lean_http.py"), "--port",
                                       str(self.actor_port), "--latency", "0.02", "--jitter", "0.2"])
        self.proxy: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        wait_up(f"http://127.0.0.1:{self.actor_port}/v1/models")

    def configure(self, name: str, **extra: str) -> None:
        spool = self.dir / name / "spool"
        spool.mkdir(parents=True, exist_ok=True)
        routes = {"routes": [{"alias": "rank", "upstream_base_url": f"http://127.0.0.1:{self.actor_port}/v1",
                              "upstream_model": "fake", "mode": "rank", "candidates": CANDIDATES,
                              "attempt_timeout_s": 5, "deadline_s": 10}]}
        (self.dir / name / "routes.yaml").write_text(yaml.safe_dump(routes))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "TURNGATE_CONFIG": str(self.dir / name / "routes.yaml"),
                    "TURNGATE_DATABASE_URL": self.db_url, "TURNGATE_SPOOL_DIR": str(spool), **extra}
        self.spool = spool

    def start(self) -> None:
        with open(self.dir / "proxy.log", "ab") as out:  # its logs (e.g. one line per request while Redis is away)
            self.proxy = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port",
                                           str(self.port), "--critic-ms", "1"], env=self.env, stdout=out,
                                          stderr=subprocess.STDOUT)
        wait_up(self.base + "/healthz")

    def signal(self, sig: int) -> None:
        assert self.proxy is not None, "start() first"
        self.proxy.send_signal(sig)
        self.proxy.wait(timeout=30)

    def stop(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.signal(signal.SIGTERM)

    def start_redis(self, port: int) -> None:
        self.redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             check=False).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.stop()
        for p in (self.actor, self.redis):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    # -- counting --------------------------------------------------------------------------------
    def count(self, ids: list[str]) -> tuple[int, int]:
        """(answered turns stored, duplicate rows among them)."""
        with psycopg.connect(self.db_url) as conn:
            turns = conn.execute("SELECT count(*), count(DISTINCT id) FROM turns WHERE id = ANY(%s)",
                                 (ids,)).fetchone()
            dupes = conn.execute("SELECT count(*) - count(DISTINCT (turn_id, idx)) FROM candidates "
                                 "WHERE turn_id = ANY(%s)", (ids,)).fetchone()
        assert turns is not None and dupes is not None  # aggregates always return a row
        rows, distinct = turns
        cands = dupes[0]
        return distinct, rows - distinct + cands

    def wait_stored(self, ids: list[str], timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while (got := self.count(ids))[0] < len(set(ids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return got


class Deadline:
    """When the load stops; a fault that takes the process down pushes it past the restart."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def hold(self) -> None:
        self.at = float("inf")

    def extend(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds


async def load(base: str, deadline: Deadline, concurrency: int, row: Row, poison_every: int = 0) -> None:
    """Closed loop: each client sends its next request when the last one is answered (or failed)."""
    normal = json.dumps({"model": "rank", "messages": [{"role": "user", "content": "Book a flight to Lisbon."}]})

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=15, headers={"authorization": "Bearer bench-key",
                                                          "content-type": "application/json"}) as http:
            i = 0
            while time.monotonic() < deadline.at:
                i += 1
                poison = poison_every and (i * concurrency + k) % poison_every == 0
                body = POISON[(i + k) % len(POISON)] if poison else normal.encode()
                headers = POISON_HEADERS if poison and (i + k) % 3 == 0 else None
                row.sent += 1
                try:
                    r = await http.post(base + "/v1/chat/completions", content=body, headers=headers)
                except httpx.HTTPError as e:
                    row.failed += 1
                    row.failures[type(e).__name__] += 1
                    await asyncio.sleep(0.1)  # the process is down: do not spin
                    continue
                if r.status_code == 200:
                    row.answered.append(r.headers["x-turngate-turn-id"])
                else:
                    row.failed += 1
                    row.failures[r.status_code] += 1

    await asyncio.gather(*[client(k) for k in range(concurrency)])


# -- the faults ------------------------------------------------------------------------------------
async def _pg_kill(h: Harness, seconds: float) -> str:
    name = h.db_url.rsplit("/", 1)[1]
    end, n = time.monotonic() + seconds * 0.5, 0
    while time.monotonic() < end:
        await asyncio.to_thread(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        n += 1
        await asyncio.sleep(0.3)
    return f"{n} kills"


async def _pg_refuse(h: Harness, seconds: float) -> str:
    name = h.db_url.rsplit("/", 1)[1]
    await asyncio.to_thread(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await asyncio.to_thread(admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    await asyncio.sleep(5)
    await asyncio.to_thread(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    return "5 s refused"


async def _restart_after(h: Harness, sig: int) -> str:
    t0 = time.monotonic()
    await asyncio.to_thread(h.signal, sig)
    await asyncio.to_thread(h.start)
    return f"down {time.monotonic() - t0:.1f} s"


async def _redis_down(h: Harness, seconds: float) -> str:
    port = int(h.env["TURNGATE_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    assert h.redis is not None, "the harness runs its own Redis"
    h.redis.kill()
    h.redis.wait()
    await asyncio.sleep(3)
    await asyncio.to_thread(h.start_redis, port)
    return "3 s down"


FAULTS = {
    "control": ("none (control)", None),
    "pg-kill": ("PostgreSQL connections killed", _pg_kill),
    "pg-refuse": ("PostgreSQL refusing connections", _pg_refuse),
    "poison": ("poison records, 1 request in 4", None),
    "sigkill": ("SIGKILL mid-load, restart", lambda h, s: _restart_after(h, signal.SIGKILL)),
    "sigterm": ("SIGTERM mid-load, restart", lambda h, s: _restart_after(h, signal.SIGTERM)),
    "redis-down": ("Redis down (rate limit on)", _redis_down),
}


def sync_lag(metrics_text: str) -> str:
    """The journal's fsync lag (what a machine crash could lose), from the histogram: its mean and
    the bucket holding its largest observation."""
    found = re.findall(r'turngate_spool_sync_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', metrics_text)
    total = re.search(r"turngate_spool_sync_lag_seconds_sum ([0-9.e+-]+)", metrics_text)
    count = re.search(r"turngate_spool_sync_lag_seconds_count ([0-9.e+-]+)", metrics_text)
    if not found or not total or not count or float(count[1]) == 0:
        return "no journal fsync observed"
    n = float(count[1])
    top = next(float(le) for le, c in found if float(c) >= n)
    return f"journal fsync lag: mean {float(total[1]) / n * 1000:.0f} ms, max <= {top * 1000:.0f} ms ({int(n)} fsyncs)"


async def run_fault(h: Harness, key: str, seconds: float, concurrency: int) -> Row:
    title, fault = FAULTS[key]
    extra = {}
    if key == "redis-down":
        port = free_port()
        h.start_redis(port)
        extra = {"TURNGATE_REDIS_URL": f"redis://127.0.0.1:{port}/0", "TURNGATE_RATE_LIMIT_PER_MINUTE": "1000000"}
    h.configure(key, **extra)
    await asyncio.to_thread(h.start)
    row = Row(title)
    deadline = Deadline(seconds)
    loader = asyncio.create_task(load(h.base, deadline, concurrency, row, poison_every=4 if key == "poison" else 0))
    if fault is not None:
        deadline.hold()  # the load goes on through the fault (and any restart), and after it
        started = time.monotonic()
        while time.monotonic() - started < seconds * 0.3 or \
                (len(row.answered) < 2 * concurrency and time.monotonic() - started < 15):
            await asyncio.sleep(0.05)  # mid-load: turns flowing, some answered
        row.answered_before_fault = len(row.answered)
        row.note = await fault(h, seconds)
        deadline.extend(seconds * 0.5)
    await loader
    row.stored, row.dups = await asyncio.to_thread(h.wait_stored, row.answered, 30)
    async with httpx.AsyncClient(timeout=5) as http:
        if key == "control":
            row.note = sync_lag((await http.get(h.base + "/metrics")).text)
        if key == "poison":
            health = (await http.get(h.base + "/readyz")).json().get("store", {})
            row.note = f"quarantined {health.get('quarantined')}, db_ok {health.get('db_ok')}"
    await asyncio.to_thread(h.stop)
    left = sorted(p.name for p in h.spool.glob("seg-*"))
    if left:
        row.note += f"; {len(left)} spool segment(s) left"
    if h.redis is not None:
        h.redis.kill()
        h.redis.wait()
        h.redis = None
    return row


def print_table(rows: list[Row]) -> None:
    print(f"{'fault':<36}{'sent':>7}{'failed':>8}{'answered':>10}{'stored':>8}{'lost':>6}{'dups':>6}  note")
    for r in rows:
        answered = len(set(r.answered))
        # What the failures were: a poison body the edge refuses (400) is a right answer, a 5xx is not.
        why = ", ".join(f"{k} x{n}" for k, n in sorted(r.failures.items(), key=str))
        print(f"{r.fault:<36}{r.sent:>7}{r.failed:>8}{answered:>10}{r.stored:>8}{answered - r.stored:>6}"
              f"{r.dups:>6}  {r.note}" + (f"; failed: {why}" if why else ""), flush=True)


async def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="load per fault")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    ap.add_argument("--db-url", help="an existing, migrated PostgreSQL database (default: create and drop one)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.faults.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FAULTS]
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; choose from {list(FAULTS)}")
    name = None
    url = args.db_url
    if url is None:
        name = f"turngate_faults_{uuid.uuid4().hex[:8]}"
        admin(f'CREATE DATABASE "{name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        await asyncio.to_thread(upgrade, url)
    workdir = Path(tempfile.mkdtemp(prefix="turngate-faults-"))
    h = Harness(url, workdir)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    rows: list[Row] = []
    try:
        for key in keys:
            rows.append(await run_fault(h, key, args.seconds, args.concurrency))
    finally:
        h.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if name:
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"\n{args.seconds:.0f} s of load per fault, {args.concurrency} clients, rank N={CANDIDATES}, "
          f"{os.cpu_count()} cores, load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after, "
          f"{time.monotonic() - t0:.0f} s in all")
    print_table(rows)
    return rows


if __name__ == "__main__":
    asyncio.run(main())
