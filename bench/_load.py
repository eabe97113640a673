"""Closed-loop load for bench/overhead.py and bench/gateways.py, with the added latency of what sits
between the client and the lean upstream (bench/_lean_http.py) measured per request:

    added = client-observed latency - the upstream's own service time for that request
            (- critic time from Server-Timing, where the proxy reports one)

Each request carries a bench id in its message; the upstream keeps its service time under it (the
longest of the calls that carried it), fetched after the run from GET /bench/service-ms.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import httpx

from bench._lean_http import LeanClient

_IDS = itertools.count(1)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children so far (Linux /proc)."""
    return sum(stat_cpu_seconds(Path(f"/proc/{p}/stat")) for p in [pid, *children(pid)])


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU time in a /proc stat file (a process's or a thread's); 0 once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """User + system CPU time so far of every process of the machine named `postgres` (the server,
    its backends and background workers)."""
    return sum(stat_cpu_seconds(stat) for stat in Path("/proc").glob("[0-9]*/stat") if _named(stat, "postgres"))


def _named(stat: Path, name: str) -> bool:
    try:
        return (stat.parent / "comm").read_text().strip() == name
    except (FileNotFoundError, ProcessLookupError):
        return False


class PgDatabase:
    """A new database on the local PostgreSQL, migrated to the head of the schema; `drop()` removes it."""

    ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

    def __init__(self) -> None:
        from service.store.migrate import upgrade

        self.name = f"turngate_bench_{os.getpid()}_{int(time.time())}"
        self.url = f"postgresql://postgres@127.0.0.1:5432/{self.name}"
        self._admin(f'CREATE DATABASE "{self.name}"')
        upgrade(self.url)

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.ADMIN, autocommit=True) as conn:
            conn.execute(sql)


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for k in kids:
            out += [k, *children(k)]
    return out


async def service_times(upstream: str) -> dict[str, float]:
    u = httpx.URL(upstream)
    client = LeanClient(u.host, u.port or 80)
    try:
        return json.loads(await client.get("/bench/service-ms"))
    finally:
        await client.close()


# An agent's conversation before the user's next message, about 300 tokens for the critic's
# tokenizer: with it a rank turn's critic rows are near the shipped critic's 256-token window,
# as in production, instead of one short sentence. `bench-varied` asks the lean upstream for
# distinct replies (bench/_lean_http.VARIED_REPLIES).
AGENT_CONTEXT = [
    {"role": "system", "content": "You are a travel agent for Skyway Airlines (bench-varied). Help the user "
     "search, book, change and cancel flights. Before any booking, change or cancellation, list the details "
     "and obtain the user's explicit confirmation (yes). Use only the tools given; never invent fares, "
     "times or flight numbers. One tool call at a time. Payment: only methods on the user's profile."},
    {"role": "user", "content": "Hi, I'm Maria Santos, user id maria_santos_1187. I need to fly to Portugal "
     "next month for a conference."},
    {"role": "assistant", "content": "Hello Maria. I can help with that. Which city in Portugal, from where, "
     "and on which date would you like to travel?"},
    {"role": "user", "content": "From Boston to Lisbon on May 14, one way, economy. The conference starts on "
     "the 15th so I'd rather land the same day."},
    {"role": "assistant", "content": "Thank you. I searched direct and one-stop flights from Boston (BOS) to "
     "Lisbon (LIS) on May 14 in economy: TAP TP218 at 9:40, arriving 20:55, $412; United UA966 at 18:05 via "
     "Newark, arriving 09:10 on May 15, $455; Delta DL254 at 21:30, arriving 09:45 on May 15, $498. "
     "Only the TAP flight lands on May 14."},
    {"role": "user", "content": "Great, the TAP one then. Use the Visa on my profile please."},
]


async def load(url: str, model: str, concurrency: int, seconds: float, upstream: str,
               stream: bool = False, headers: dict[str, str] | None = None, extra: dict | None = None,
               context: list[dict] | None = None) -> dict:
    """`concurrency` clients, each sending the next request when its last returned (whole: a stream
    to its last chunk). `upstream`: the lean upstream's base URL, for its service times. `extra`:
    more fields of every request body (`tools`, say). `context`: messages before the user's (see
    AGENT_CONTEXT)."""
    u = httpx.URL(url)
    await service_times(upstream)  # clear what an earlier row left
    done: list[tuple[str, float, float | None, float | None]] = []  # id, latency, critic, Server-Timing upstream
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        client = LeanClient(u.host, u.port or 80, headers)  # one connection per client
        try:
            while time.perf_counter() < stop:
                rid = str(next(_IDS))
                body = json.dumps({"model": model, "stream": stream, "messages": [*(context or ()),
                    {"role": "user", "content": f"Book the cheapest flight to Lisbon. bench-id {rid}"}],
                    **(extra or {})}).encode()
                t0 = time.perf_counter()
                status, got, payload = await client.post(u.path, body)
                elapsed = (time.perf_counter() - t0) * 1000
                if status != 200 or (stream and b"[DONE]" not in payload):
                    raise RuntimeError(f"{url} answered {status}: {payload[:200]!r}")
                t = timing(got["server-timing"]) if "server-timing" in got else {}
                done.append((rid, elapsed, t.get("critic"), t.get("upstream")))
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    service = await service_times(upstream)
    added = [lat - service[rid] - (critic or 0.0) for rid, lat, critic, _ in done if rid in service]
    st_added = [lat - up - (critic or 0.0) for _, lat, critic, up in done if up is not None]
    # Latency over the slowest call's service time: what a rank turn costs against waiting for its
    # N candidates alone (critic included).
    slowest = [lat / service[rid] for rid, lat, _, _ in done if service.get(rid)]
    return {"n": len(done), "rps": len(done) / wall, "latencies": [d[1] for d in done], "added": added,
            "st_added": st_added, "over_slowest": slowest, "missing": len(done) - len(added)}


def python_path(root: Path) -> str:
    """PYTHONPATH for a bench's child process: the tree under test first, then the caller's own
    (a machine whose packages sit beside the interpreter's, as on a lent GPU machine)."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)


def passthrough_pair(tmp: Path, actor_url: str, root: Path) -> dict[str, str]:
    """The environment of a bench proxy with two passthrough routes to the fake upstream, `pass`
    (store on) and `pass-norec` (`record: off`), its config, store and spool under `tmp`."""
    (tmp / "routes.yaml").write_text(json.dumps({"routes": [
        {"alias": "pass", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough"},
        {"alias": "pass-norec", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough",
         "record": "off"}]}))  # JSON is YAML
    return {**os.environ, "TURNGATE_CONFIG": str(tmp / "routes.yaml"),
            "TURNGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "TURNGATE_SPOOL_DIR": str(tmp / "spool"),
            "PYTHONPATH": python_path(root)}


def stop(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """Ends a bench's helper processes: all asked to stop at once, any still running after
    `timeout` killed."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
