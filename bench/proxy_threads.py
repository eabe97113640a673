"""Where the proxy's CPU goes, per request: the event loop's thread and the others (the store's
writer, the spool's syncer), user and system time apart, and the cyclic GC's share; a passthrough
route with the store on and the same with `record: off`, alternately.

    python bench/proxy_threads.py [--seconds 8] [--rounds 2] [--concurrency 16] [--http httptools]

Each row runs the lean load generator and fake upstream (bench/_lean_http.py) against the bench
proxy (bench/_stub_proxy.py) and reads every thread's CPU from /proc before and after. `--http`
picks uvicorn's HTTP protocol (default: turngate's one-write protocol, service/api/onewrite.py);
run it with `--http httptools` beside a default run to compare the system time the two cost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _load  # noqa: E402
from bench.overhead import wait_up  # noqa: E402
from service.api import onewrite  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of `pid` ("loop" is the main thread): (user, system) CPU seconds so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out["loop" if task.name == str(pid) else task.name] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def gc_cpu(pid: int, path: Path) -> dict:
    os.kill(pid, signal.SIGUSR1)
    for _ in range(50):
        time.sleep(0.05)
        if path.exists():
            got = json.loads(path.read_text())
            path.unlink()
            return got
    raise RuntimeError("the proxy did not report its GC time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--http", default=onewrite.NAME, help="uvicorn's HTTP protocol for the proxy")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="turngate-threads-"))
    actor_port, proxy_port = free_port(), free_port()
    actor_url = f"http://127.0.0.1:{actor_port}/v1"
    env = _load.passthrough_pair(tmp, actor_url, ROOT)
    gc_file = tmp / "gc.json"
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_lean_http.py"), "--port", str(actor_port),
                          "--latency", "0.05", "--jitter", "0.2"], env=env),
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port", str(proxy_port),
                          "--gc-cpu", str(gc_file), "--http", args.http], env=env),
    ]
    try:
        wait_up(actor_url + "/models")
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz")
        pid, url = procs[1].pid, f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        uvloop.run(_load.load(url, "pass", args.concurrency, 2.0, actor_url))  # warm-up
        print(f"concurrency {args.concurrency}, {args.seconds:g} s a row, {args.rounds} alternating rounds "
              f"(medians), HTTP protocol {args.http}; ms of CPU a request\n")
        print(f"{'route':<12}{'loop user':>10}{'loop sys':>10}{'others user':>12}{'others sys':>11}"
              f"{'all':>8}{'GC':>8}{'GC passes/s':>12}")
        cells: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for route in ("pass", "pass-norec") if rnd % 2 == 0 else ("pass-norec", "pass"):
                cpu0, gc0 = thread_cpu(pid), gc_cpu(pid, gc_file)
                n = uvloop.run(_load.load(url, route, args.concurrency, args.seconds, actor_url))["n"]
                time.sleep(1.0)  # the store's writer commits the row's turns (flush interval 0.5 s)
                cpu1, gc1 = thread_cpu(pid), gc_cpu(pid, gc_file)
                per = {"loop user": 0.0, "loop sys": 0.0, "others user": 0.0, "others sys": 0.0}
                for tid, (user, system) in cpu1.items():
                    user0, system0 = cpu0.get(tid, (0.0, 0.0))
                    who = "loop" if tid == "loop" else "others"
                    per[f"{who} user"] += (user - user0) * 1000 / n
                    per[f"{who} sys"] += (system - system0) * 1000 / n
                per["all"] = sum(per.values())
                per["GC"] = (gc1["cpu_s"] - gc0["cpu_s"]) * 1000 / n
                per["GC passes/s"] = (gc1["passes"] - gc0["passes"]) / (args.seconds + 1.0)
                cells.setdefault(route, []).append(per)
        for route, runs in cells.items():
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{route:<12}{m['loop user']:>10.3f}{m['loop sys']:>10.3f}{m['others user']:>12.3f}"
                  f"{m['others sys']:>11.3f}{m['all']:>8.3f}{m['GC']:>8.4f}{m['GC passes/s']:>12.1f}", flush=True)
    finally:
        _load.stop(procs)


if __name__ == "__main__":
    main()
