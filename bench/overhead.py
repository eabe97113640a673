"""Added latency of the proxy, passthrough and rank (N=4), against the same fake upstream.

Three processes: a fake upstream (50 ms +- 20% by default), turngate in front of it (critic stubbed
to a constant time, turn records written by the embedded store), and this load generator. The
upstream and the load generator are lean raw-asyncio code (bench/_lean_http.py) so that the cores
they share with the proxy go to the proxy. Per request (bench/_load.py):

    added = client-observed latency - the upstream's own service time - critic time

The upstream's service time is measured inside the fake upstream, from the request fully read to
the reply written (in a rank turn, the longest of its N calls); the critic time comes from the
proxy's Server-Timing header (0 in passthrough). `st added` is the same from Server-Timing alone
(latency - its `upstream` - its `critic`): what a client of a real upstream can compute.
The baseline printed beside it is the same load sent straight to the fake actor.
`proxy cpu/req` is the proxy process's CPU time over the row divided by its requests (its worker
processes' too, under `--workers`). Rank rows add `/slowest p50` and `p99`: each turn's latency over
its slowest candidate call's service time (1.0: the turn cost no more than waiting for its N
candidates).
The standard apparatus has no service times: only `st added` there.
`rank-agent` is rank on agent turns: an airline agent's conversation of about 300 tokens before
the user's message (bench/_load.AGENT_CONTEXT), and upstream replies that differ from call to call
(bench/_lean_http.VARIED_REPLIES: tool calls with other arguments, texts of other lengths), as with
a real actor: a critic that reads the encoder scores several long rows a turn. `rank`'s candidates
are four copies of one short reply to one short message: one row of about 25 tokens a turn.
With `--shipped-critic`, rank rows add `critic rows/turn`: the encoder rows the critic ran a turn
(the sum of turngate_critic_batch_size over the row's turns; identical candidates are scored once;
0 with a head that reads no encoder, as the shipped one since a6cee4009e51). `TURNGATE_CRITIC`
names another bundle.

    python bench/overhead.py [--latency 0.05] [--jitter 0.2] [--concurrency 1,16,64] [--seconds 8] [--rounds 1]
                             [--apparatus lean|standard]
                             [--targets direct,pass,pass-norec,rank,rank-agent,shadow] [--shadow-backlog 64]
                             [--shipped-critic] [--workers 1] [--tools] [--database sqlite|postgres]

`--tools` declares a tool in every request: the critic then scores tool turns (their features and
head). Without it the turns are text turns. The shipped head stopped reading the encoder on text
turns at stop 28 and on tool turns at a6cee4009e51; figures from before ran it there.
`--database postgres` writes the turns to a new database on the local PostgreSQL (127.0.0.1:5432,
user postgres; dropped at the end) instead of the embedded SQLite file, and adds `db cpu/req`: the
CPU of every `postgres` process of the machine over the row, per request (the database's own work,
which a production deployment spends on another host).
`shadow` is the shadow route (N=4: the client gets candidate 0, the rest is sampled and scored in
the background); `--shadow-backlog` sets TURNGATE_SHADOW_MAX_BACKLOG for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import uvloop
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _load  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

AGENT_ROW = "rank N=4, agent turns"
BODY = {"messages": [{"role": "user", "content": "Book the cheapest flight to Lisbon."}]}


pct, timing, cpu_seconds = _load.pct, _load.timing, _load.cpu_seconds


async def httpx_load(url: str, model: str | None, concurrency: int, seconds: float) -> dict:
    """The standard apparatus: closed loop over httpx, added latency from Server-Timing alone."""
    latencies, st_added = [], []
    stop = time.perf_counter() + seconds
    body = json.dumps({**BODY, "model": model or "fake"}).encode()

    async def worker():
        client = httpx.AsyncClient(timeout=30)  # one client (connection) per worker
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                elapsed = (time.perf_counter() - t0) * 1000
                if resp.status_code != 200:
                    raise RuntimeError(f"{url} answered {resp.status_code}")
                latencies.append(elapsed)
                if "server-timing" in resp.headers:
                    t = timing(resp.headers["server-timing"])
                    st_added.append(elapsed - t["upstream"] - t["critic"])
        finally:
            await client.aclose()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return {"n": len(latencies), "rps": len(latencies) / (time.perf_counter() - started),
            "latencies": latencies, "added": [], "st_added": st_added, "missing": 0}


def counter(metrics_url: str, name: str) -> float:
    """The sum of a counter's samples on the proxy's /metrics (0 when absent)."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def store_added(with_store: list[dict] | None, without: list[dict] | None, concurrency: int) -> None:
    """What the store adds to the proxy's CPU a request, round by round (each round's two rows ran
    back to back, so a pair shares the machine's state of the moment), and the median of those."""
    if not with_store or not without:
        return
    added = [w["cpu"] / wo["cpu"] - 1 for w, wo in zip(with_store, without)]
    print(f"\nconcurrency {concurrency}: the store adds {statistics.median(added):.0%} to the proxy's CPU a request "
          f"(passthrough / no store - 1, median of the rounds' pairs: {', '.join(f'{a:.0%}' for a in added)})")


def store_drained(readyz: str, workers: int = 1, within_s: float = 60) -> None:
    """Waits until the proxy's store has written every turn it holds (queue empty, nothing behind).
    Each worker answers for its own store, and a probe reaches whichever worker accepts it: with N
    workers, 8N answers in a row must say so (a worker missed by all of them: e^-8, 0.03%)."""
    deadline, drained = time.monotonic() + within_s, 0
    while time.monotonic() < deadline:
        store = httpx.get(readyz, timeout=10).json().get("store") or {}  # a new connection each time
        if store.get("queue") == 0 and store.get("behind_s") == 0:
            drained += 1
            if drained >= (1 if workers == 1 else 8 * workers):
                return
            continue
        drained = 0
        time.sleep(0.05)
    raise RuntimeError("the proxy's store did not catch up")


def wait_up(url: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05, help="fake upstream latency, seconds")
    ap.add_argument("--jitter", type=float, default=0.2,
                    help="lean upstream only: latency spread +- this fraction, uniform. With 0, closed-loop "
                         "clients fall into lock-step and reach the proxy in bursts")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; each cell is their median")
    ap.add_argument("--critic-ms", type=float, default=2.0, help="the stub critic's constant time")
    ap.add_argument("--shipped-critic", action="store_true",
                    help="rank and shadow with the shipped critic (ONNX on this CPU) instead of the stub")
    ap.add_argument("--workers", type=int, default=1,
                    help="proxy worker processes: more than 1 runs `turngate serve --workers N` (needs "
                         "--shipped-critic: the stub critic lives in the bench's own process)")
    ap.add_argument("--gc-unfrozen", action="store_true",
                    help="undo the proxy's start-up gc.freeze() (to compare its full-GC pauses)")
    ap.add_argument("--tools", action="store_true",
                    help="every request declares a tool: tool turns, scored by the tool head (lean apparatus)")
    ap.add_argument("--targets", default="direct,pass,rank",
                    help="rows per concurrency: direct,pass,pass-norec (passthrough, store off),rank,"
                         "rank-agent (rank on agent turns, lean apparatus),shadow")
    ap.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                    help="where the proxy's store writes: the embedded SQLite file, or a new database on the "
                         "local PostgreSQL (adds the database server's CPU per request)")
    ap.add_argument("--shadow-backlog", type=int, help="TURNGATE_SHADOW_MAX_BACKLOG (default: the setting's)")
    ap.add_argument("--apparatus", choices=("lean", "standard"), default="lean",
                    help="lean: raw-asyncio load generator and upstream (bench/_lean_http.py); "
                         "standard: httpx client and the Starlette fake actor (each ~1 ms CPU/request)")
    args = ap.parse_args(argv)
    if args.workers > 1 and not args.shipped_critic:
        ap.error("--workers needs --shipped-critic")
    if (args.tools or "rank-agent" in args.targets) and args.apparatus != "lean":
        ap.error("--tools and rank-agent need the lean apparatus")
    extra = {"tools": [{"type": "function", "function": {
        "name": "book_flight", "description": "Books the flight.", "parameters": {
            "type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}}]} if args.tools else None

    tmp = Path(tempfile.mkdtemp(prefix="turngate-bench-"))
    actor_port, proxy_port = free_port(), free_port()
    actor_url = f"http://127.0.0.1:{actor_port}/v1"
    config = {"routes": [
        {"alias": "pass", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough"},
        # The same without the store (record: off): the difference is what the store costs.
        {"alias": "pass-norec", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough",
         "record": "off"},
        {"alias": "rank", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "rank",
         "candidates": 4},
        {"alias": "shadow", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "shadow",
         "candidates": 4}]}
    (tmp / "routes.yaml").write_text(yaml.safe_dump(config))
    pg = _load.PgDatabase() if args.database == "postgres" else None
    env = {**os.environ, "TURNGATE_CONFIG": str(tmp / "routes.yaml"),
           "TURNGATE_DATABASE_URL": pg.url if pg else f"sqlite:///{tmp}/bench.db",
           "TURNGATE_SPOOL_DIR": str(tmp / "spool"),
           "PYTHONPATH": _load.python_path(ROOT)}
    if args.shadow_backlog is not None:
        env["TURNGATE_SHADOW_MAX_BACKLOG"] = str(args.shadow_backlog)
    targets: dict[str, tuple[str, str, str | None]] = {
        "direct": ("direct upstream", actor_url + "/chat/completions", None)}
    lean = args.apparatus == "lean"
    upstream = [str(ROOT / "bench" / "_lean_http.py")] if lean else ["-m", "service.demo.fake_actor"]
    procs = [
        subprocess.Popen([sys.executable, *upstream, "--port", str(actor_port), "--latency", str(args.latency),
                          *(["--jitter", str(args.jitter)] if lean else [])], env=env),
        subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(proxy_port), "--workers",
                          str(args.workers), "--log-level", "warning"], env=env) if args.workers > 1 else
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port", str(proxy_port),
                          "--critic-ms", str(args.critic_ms), "--gc-report", str(tmp / "gc.json"),
                          *(["--shipped-critic"] if args.shipped_critic else []),
                          *(["--gc-unfrozen"] if args.gc_unfrozen else [])], env=env),
    ]
    try:
        wait_up(actor_url + "/models")
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz")
        proxy = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        metrics_url = f"http://127.0.0.1:{proxy_port}/metrics"
        targets.update(pass_=("turngate passthrough", proxy, "pass"),
                       **{"pass-norec": ("passthrough, no store", proxy, "pass-norec")},
                       rank=("turngate rank N=4", proxy, "rank"),
                       **{"rank-agent": (AGENT_ROW, proxy, "rank")},
                       shadow=("turngate shadow N=4", proxy, "shadow"))
        rows = [targets["pass_" if t == "pass" else t] for t in args.targets.split(",")]

        def run(name: str, url: str, model: str | None, c: int, seconds: float) -> dict:
            if lean:
                return uvloop.run(_load.load(url, model or "fake", c, seconds, actor_url, extra=extra,
                                             context=_load.AGENT_CONTEXT if name == AGENT_ROW else None))
            return uvloop.run(httpx_load(url, model, c, seconds))
        run("", proxy, "rank", 4, min(1.0, args.seconds))  # warm up connections and code paths
        print(f"fake upstream latency {args.latency * 1000:.0f} ms +- {args.jitter:.0%}, "
              + (f"the critic {os.environ.get('TURNGATE_CRITIC') or 'shipped'}, " if args.shipped_critic
                 else f"stub critic {args.critic_ms:.1f} ms, ")
              + f"{args.seconds:g} s per row, {args.rounds} round(s) (medians), "
              f"{os.cpu_count()} cores, " + (f"{args.workers} proxy workers, " if args.workers > 1 else "") +
              f"{args.apparatus} apparatus, store: {args.database}"
              + (", a tool declared in every request" if args.tools else "") + "\n")
        print(f"{'target':<22}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'added p50':>10}{'added p99':>10}{'st added p50':>13}{'st added p99':>13}{'proxy cpu/req ms':>18}"
              + (f"{'db cpu/req ms':>15}" if pg else "")
              + (f"{'/slowest p50':>13}{'/slowest p99':>13}" if any(r[2] == "rank" for r in rows) else "")
              + (f"{'critic rows/turn':>18}" if args.shipped_critic else ""))
        concs = [int(x) for x in args.concurrency.split(",")]
        cells: dict[tuple[int, str], list[dict]] = {}
        for rnd in range(args.rounds):  # alternating order: drift and noise land on every target alike
            for c in concs:
                for name, url, model in (rows if rnd % 2 == 0 else rows[::-1]):
                    shed0 = counter(metrics_url, "turngate_shadow_shed_total")
                    cpu0, db0 = cpu_seconds(procs[1].pid), _load.postgres_cpu_seconds() if pg else 0.0
                    rows0 = counter(metrics_url, "turngate_critic_batch_size_sum")
                    r = run(name, url, model, c, args.seconds)
                    if model is not None:  # the row's CPU includes writing its turns, not the next row's
                        store_drained(f"http://127.0.0.1:{proxy_port}/readyz", args.workers)
                    cpu = (cpu_seconds(procs[1].pid) - cpu0) * 1000 / r["n"]
                    db = ((_load.postgres_cpu_seconds() - db0) * 1000 / r["n"]) if pg else float("nan")
                    shed = counter(metrics_url, "turngate_shadow_shed_total") - shed0
                    critic_rows = (counter(metrics_url, "turngate_critic_batch_size_sum") - rows0) / r["n"]
                    lat = r["latencies"]
                    cells.setdefault((c, name), []).append({
                        "rps": r["rps"], "p50": pct(lat, .5), "p99": pct(lat, .99),
                        "a50": pct(r["added"], .5), "a99": pct(r["added"], .99), "s50": pct(r["st_added"], .5),
                        "s99": pct(r["st_added"], .99), "cpu": cpu, "db": db, "shed": shed / r["n"],
                        "rows": critic_rows,
                        "r50": pct(r.get("over_slowest", []), .5), "r99": pct(r.get("over_slowest", []), .99)})
        for c in concs:
            for name, _, model in rows:
                m = {k: statistics.median(cell[k] for cell in cells[(c, name)]) for k in cells[(c, name)][0]}
                row = (f"{name:<22}{c:>5}{m['rps']:>9.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}"
                       f"{m['a50']:>10.2f}{m['a99']:>10.2f}")
                if model is not None:  # direct: the apparatus's own added latency only
                    row += f"{m['s50']:>13.2f}{m['s99']:>13.2f}{m['cpu']:>18.2f}"
                    row += f"{m['db']:>15.2f}" if pg else ""
                if model == "rank":
                    row += f"{m['r50']:>13.2f}{m['r99']:>13.2f}"
                    row += f"{m['rows']:>18.2f}" if args.shipped_critic else ""
                if model == "shadow":
                    row += f"   shed {m['shed']:.0%}"
                print(row, flush=True)
        for c in concs:
            store_added(cells.get((c, "turngate passthrough")), cells.get((c, "passthrough, no store")), c)
    finally:
        _load.stop(procs)
        if pg:
            pg.drop()
    if (tmp / "gc.json").exists():
        pauses = json.loads((tmp / "gc.json").read_text())
        if pauses:
            print(f"\nproxy full-GC passes: {len(pauses)}, median {statistics.median(pauses):.1f} ms, "
                  f"max {max(pauses):.1f} ms" + (" (start-up gc.freeze() undone)" if args.gc_unfrozen else ""))


if __name__ == "__main__":
    main()
