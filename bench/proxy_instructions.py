"""Instructions per request in the proxy, counted by valgrind's callgrind: a measure of the request
path's CPU work that does not move with the machine's load (timings here drift by a third within a
session; bench/overhead.py's figures need a quiet machine and alternating rounds).

    python bench/proxy_instructions.py [--requests 400] [--concurrency 16] [--targets pass,pass-norec]
                                       [--by-object]

The proxy (bench/_stub_proxy.py: the real app and store) runs under callgrind, with the lean fake
upstream and load generator beside it (bench/_lean_http.py). Instrumentation is switched on after a
warm-up and covers every thread of the proxy (the store's writer included) until the target's
requests are answered and the store has written them. Under valgrind the proxy runs ~50x slower,
so the upstream's latency is scaled up to keep as many requests in flight per loop wake-up as at
full speed. Counts are deterministic for the same code and load shape; compare two checkouts by
running this command in each. `--by-object` also splits each target's count by the shared object
the instructions ran in (the interpreter, libc, SQLite, orjson, ...; callgrind_annotate's exclusive
counts), with the difference between the first two targets: what the store costs, by library. The
proxy runs with PYTHONMALLOC=malloc (valgrind needs it), so the interpreter's allocations count in
libc. Needs valgrind (Debian's package).
"""

from __future__ import annotations

import argparse
import re
import shutil
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
from service.demo.fake_actor import free_port  # noqa: E402


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def total_instructions(out_dir: Path, keep: Path | None, target: str) -> int:
    """The sum of the `totals:` lines of every dump callgrind wrote since the last call; the dumps
    are moved to `keep` (for callgrind_annotate) or deleted."""
    total = 0
    for i, f in enumerate(sorted(out_dir.glob("callgrind.out*"))):
        m = re.search(rb"^totals:\s+(\d+)", f.read_bytes(), re.M)
        total += int(m.group(1)) if m else 0
        if keep is not None:
            shutil.move(f, keep / f"callgrind.{target}.{i}")
        else:
            f.unlink()
    return total


async def requests(url: str, model: str, n: int, concurrency: int, upstream: str) -> int:
    """Sends n requests (`concurrency` at a time, each client its next when its last returned)."""
    done = 0
    while done < n:  # _load.load runs for a time; repeat short runs until n are answered
        r = await _load.load(url, model, concurrency, 2.0, upstream)
        done += r["n"]
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="counted requests per target (at least)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--targets", default="pass,pass-norec", help="routes of bench/overhead.py: pass, pass-norec")
    ap.add_argument("--keep", type=Path, help="keep each target's callgrind dump in this folder "
                                              "(callgrind_annotate reads it: C functions, SQLite's included)")
    ap.add_argument("--by-object", action="store_true", help="split each count by shared object (libpython, libc, "
                                                                "libsqlite3, ...)")
    ap.add_argument("--latency", type=float, default=1.0,
                    help="fake upstream latency, seconds (scaled for valgrind's slowdown)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")

    tmp = Path(tempfile.mkdtemp(prefix="turngate-instr-"))
    keep = args.keep or (tmp / "kept" if args.by_object else None)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    counted: dict[str, int] = {}
    actor_port, proxy_port = free_port(), free_port()
    actor_url = f"http://127.0.0.1:{actor_port}/v1"
    env = {**_load.passthrough_pair(tmp, actor_url, ROOT), "PYTHONMALLOC": "malloc"}
    out = tmp / "callgrind"
    out.mkdir()
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "_lean_http.py"), "--port", str(actor_port),
                          "--latency", str(args.latency), "--jitter", "0.2"], env=env),
        subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--quiet",
                          f"--callgrind-out-file={out}/callgrind.out.%p",
                          sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port", str(proxy_port)],
                         env=env),
    ]
    try:
        wait_up(actor_url + "/models")
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz", within_s=900)
        proxy = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        pid = procs[1].pid
        print(f"fake upstream {args.latency * 1000:.0f} ms +- 20%, concurrency {args.concurrency}, "
              f"valgrind {subprocess.run(['valgrind', '--version'], capture_output=True, text=True).stdout.strip()}")
        for target in args.targets.split(","):
            uvloop.run(requests(proxy, target, args.concurrency * 4, args.concurrency, actor_url))  # warm-up
            time.sleep(2)  # the store writes the warm-up's turns before counting starts
            callgrind(pid, "-z")
            callgrind(pid, "-i", "on")
            n = uvloop.run(requests(proxy, target, args.requests, args.concurrency, actor_url))
            time.sleep(2)  # the store's writer commits the counted turns (flush interval 0.5 s)
            callgrind(pid, "-i", "off")
            callgrind(pid, "-d")
            ir = total_instructions(out, keep, target)
            counted[target] = n
            print(f"{target:<12} {n:>6} requests  {ir / n / 1e6:8.3f} M instructions/request", flush=True)
    finally:
        _load.stop(procs)
    if args.by_object and keep is not None:
        print_by_object(keep, counted)


def by_object(dumps: list[Path]) -> dict[str, int]:
    """Exclusive instructions per shared object over callgrind dumps (callgrind_annotate's function
    lines end in "[/path/to/object]")."""
    totals: dict[str, int] = {}
    for dump in dumps:
        run = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True)
        if run.returncode:  # a dump of a thread that ran nothing counted: no events to annotate
            continue
        text = run.stdout
        for m in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+\S.*?(?:\[([^\]]+)\])?\s*$", text, re.M):
            if "PROGRAM TOTALS" in m.group(0):
                continue
            obj = Path(m.group(2)).name if m.group(2) else "(inlined, no object named)"
            totals[obj] = totals.get(obj, 0) + int(m.group(1).replace(",", ""))
    return totals


def print_by_object(keep: Path, counted: dict[str, int]) -> None:
    targets = list(counted)
    per = {t: {o: ir / counted[t] for o, ir in by_object(sorted(keep.glob(f"callgrind.{t}.*"))).items()}
           for t in targets}
    objects = sorted({o for t in targets for o in per[t]}, key=lambda o: -per[targets[0]].get(o, 0))
    head = "".join(f"{t:>14}" for t in targets) + (f"{targets[0] + ' - ' + targets[1]:>24}" if len(targets) > 1 else "")
    print(f"\ninstructions/request by shared object\n{'object':<44}{head}")
    for o in objects:
        values = [per[t].get(o, 0) for t in targets]
        if max(values) < 1000:
            continue
        diff = f"{values[0] - values[1]:>24,.0f}" if len(values) > 1 else ""
        print(f"{o[:43]:<44}" + "".join(f"{v:>14,.0f}" for v in values) + diff)


if __name__ == "__main__":
    main()
