"""Added latency of the proxy, passthrough and rank (N=4), against the same fake upstream.

Three processes: a fake upstream (50 ms +- 20% by default), turngate in front of it (critic stubbed
to a constant time, turn records written by the embedded store), and this load generator. The
upstream and the load generator are lean raw-asyncio code (bench/_lean_http.py) so that the cores
they share with the proxy go to the proxy. Per request:

    overhead = client-observed latency - upstream time - critic time   (from the Server-Timing header)

The baseline printed beside it is the same load sent straight to the fake actor. In rank mode the
turn is compared with its limit, the slowest of its concurrent candidates plus scoring:
ratio = turn latency / (upstream wall time + critic time); serial sampling would show ~N.
`proxy cpu/req` is the proxy process's CPU time over the row divided by its requests.

    python bench/overhead.py [--latency 0.05] [--jitter 0.2] [--concurrency 1,16,64] [--seconds 8]
                             [--pool-shards 16] [--apparatus lean|standard]
                             [--targets direct,pass,rank,shadow] [--shadow-backlog 64]

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

from bench._lean_http import LeanClient  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Book the cheapest flight to Lisbon."}]}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


async def httpx_post(url: str):
    client = httpx.AsyncClient(timeout=30)

    async def post(body: bytes) -> tuple[int, dict[str, str]]:
        resp = await client.post(url, content=body, headers={"content-type": "application/json"})
        return resp.status_code, dict(resp.headers)
    return post, client.aclose


async def lean_post(url: str):
    u = httpx.URL(url)
    client = LeanClient(u.host, u.port or 80)

    async def post(body: bytes) -> tuple[int, dict[str, str]]:
        status, headers, _ = await client.post(u.path, body)
        return status, headers
    return post, client.close


async def load(url: str, model: str | None, concurrency: int, seconds: float, lean: bool = True) -> dict:
    """Closed loop: `concurrency` clients, each sending the next request when its last returns."""
    latencies, overheads, limits = [], [], []
    stop = time.perf_counter() + seconds
    body = json.dumps({**BODY, "model": model or "fake"}).encode()

    async def worker():
        # One client (one connection) per worker: a shared httpx pool is itself the bottleneck at
        # high concurrency (it scans every connection per request) and would be measured instead.
        post, close = await (lean_post if lean else httpx_post)(url)
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                status, headers = await post(body)
                elapsed = (time.perf_counter() - t0) * 1000
                if status != 200:
                    raise RuntimeError(f"{url} answered {status}")
                latencies.append(elapsed)
                if "server-timing" in headers:
                    t = timing(headers["server-timing"])
                    overheads.append(elapsed - t["upstream"] - t["critic"])
                    limits.append(t["upstream"] + t["critic"])
        finally:
            await close()

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    return {"n": len(latencies), "rps": len(latencies) / wall, "latencies": latencies,
            "overheads": overheads, "limits": limits}


def counter(metrics_url: str, name: str) -> float:
    """The sum of a counter's samples on the proxy's /metrics (0 when absent)."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05, help="fake upstream latency, seconds")
    ap.add_argument("--jitter", type=float, default=0.2,
                    help="lean upstream only: latency spread +- this fraction, uniform. With 0, closed-loop "
                         "clients fall into lock-step and reach the proxy in bursts")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--critic-ms", type=float, default=2.0, help="the stub critic's constant time")
    ap.add_argument("--pool-shards", type=int, default=16, help="upstream httpx pools (1 = one shared pool)")
    ap.add_argument("--gc-unfrozen", action="store_true",
                    help="undo the proxy's start-up gc.freeze() (to compare its full-GC pauses)")
    ap.add_argument("--targets", default="direct,pass,rank", help="rows per concurrency: direct,pass,rank,shadow")
    ap.add_argument("--shadow-backlog", type=int, help="TURNGATE_SHADOW_MAX_BACKLOG (default: the setting's)")
    ap.add_argument("--apparatus", choices=("lean", "standard"), default="lean",
                    help="lean: raw-asyncio load generator and upstream (bench/_lean_http.py); "
                         "standard: httpx client and the Starlette fake actor (each ~1 ms CPU/request)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="turngate-bench-"))
    actor_port, proxy_port = free_port(), free_port()
    actor_url = f"http://127.0.0.1:{actor_port}/v1"
    config = {"routes": [
        {"alias": "pass", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough"},
        {"alias": "rank", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "rank",
         "candidates": 4},
        {"alias": "shadow", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "shadow",
         "candidates": 4}]}
    (tmp / "routes.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TURNGATE_CONFIG": str(tmp / "routes.yaml"),
           "TURNGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "TURNGATE_SPOOL_DIR": str(tmp / "spool"),
           "TURNGATE_UPSTREAM_POOL_SHARDS": str(args.pool_shards), "PYTHONPATH": str(ROOT)}
    if args.shadow_backlog is not None:
        env["TURNGATE_SHADOW_MAX_BACKLOG"] = str(args.shadow_backlog)
    targets: dict[str, tuple[str, str, str | None]] = {
        "direct": ("direct upstream", actor_url + "/chat/completions", None)}
    lean = args.apparatus == "lean"
    upstream = [str(ROOT / "bench" / "_lean_http.py")] if lean else ["-m", "service.demo.fake_actor"]
    procs = [
        subprocess.Popen([sys.executable, *upstream, "--port", str(actor_port), "--latency", str(args.latency),
                          *(["--jitter", str(args.jitter)] if lean else [])], env=env),
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port", str(proxy_port),
                          "--critic-ms", str(args.critic_ms), "--gc-report", str(tmp / "gc.json"),
                          *(["--gc-unfrozen"] if args.gc_unfrozen else [])], env=env),
    ]
    try:
        wait_up(actor_url + "/models")
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz")
        proxy = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        metrics_url = f"http://127.0.0.1:{proxy_port}/metrics"
        targets.update(pass_=("turngate passthrough", proxy, "pass"), rank=("turngate rank N=4", proxy, "rank"),
                       shadow=("turngate shadow N=4", proxy, "shadow"))
        rows = [targets["pass_" if t == "pass" else t] for t in args.targets.split(",")]
        uvloop.run(load(proxy, "rank", 4, 1.0, lean))  # warm up connections and code paths
        print(f"fake upstream latency {args.latency * 1000:.0f} ms +- {args.jitter:.0%}, "
              f"stub critic {args.critic_ms:.1f} ms, "
              f"{args.pool_shards} upstream pool(s), {args.seconds:.0f} s per row, {os.cpu_count()} cores, "
              f"{args.apparatus} apparatus\n")
        print(f"{'target':<22}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'ovh p50':>9}{'ovh p99':>9}{'lat/limit':>10}{'proxy cpu/req ms':>18}")
        for c in [int(x) for x in args.concurrency.split(",")]:
            for name, url, model in rows:
                shed0 = counter(metrics_url, "turngate_shadow_shed_total")
                cpu0 = cpu_seconds(procs[1].pid)
                r = uvloop.run(load(url, model, c, args.seconds, lean))
                cpu = (cpu_seconds(procs[1].pid) - cpu0) * 1000 / r["n"]
                shed = counter(metrics_url, "turngate_shadow_shed_total") - shed0
                lat = r["latencies"]
                row = f"{name:<22}{c:>5}{r['rps']:>9.0f}{pct(lat, .5):>9.2f}{pct(lat, .99):>9.2f}"
                if r["overheads"]:
                    ratio = statistics.median(a / b for a, b in zip(lat, r["limits"]))
                    row += (f"{pct(r['overheads'], .5):>9.2f}{pct(r['overheads'], .99):>9.2f}{ratio:>10.3f}"
                            f"{cpu:>18.2f}")
                if model == "shadow":
                    row += f"   shed {shed / r['n']:.0%}"
                print(row, flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    if (tmp / "gc.json").exists():
        pauses = json.loads((tmp / "gc.json").read_text())
        if pauses:
            print(f"\nproxy full-GC passes: {len(pauses)}, median {statistics.median(pauses):.1f} ms, "
                  f"max {max(pauses):.1f} ms" + (" (start-up gc.freeze() undone)" if args.gc_unfrozen else ""))


if __name__ == "__main__":
    main()
