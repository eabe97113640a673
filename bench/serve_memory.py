"""Memory and start time of `turngate serve` on its embedded defaults (SQLite file, the shipped
critic): the memory of its process tree (the server and its workers) once it serves, and the
seconds from the command to a ready /readyz.

    python bench/serve_memory.py [--workers 1,2] [--repeats 3] [--tree PATH]

Each row starts `turngate serve --workers N` in a new folder, waits for /readyz to say ready and
for the tree's memory to settle (every worker has loaded its critic), reads every process's
resident memory (RSS, which counts the pages the processes share once each) and proportional
memory (PSS, which splits them) from /proc, and stops it. `--tree PATH` runs another checkout
too (its `service` package first on PYTHONPATH: a git worktree of an older commit, say),
alternately with this one, so that a before-and-after shares the machine's state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _load  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

SERVE = "import sys; from service.cli import main; sys.argv[0] = 'turngate'; main()"


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def memory_mb(pid: int) -> tuple[float, float, int]:
    """(RSS, PSS) of the tree in MB, and its process count."""
    rss = pss = 0
    pids = tree_pids(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue  # gone meanwhile
    return rss / 1024, pss / 1024, len(pids)


def one_start(tree: Path, workers: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="turngate-serve-mem-"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": _load.python_path(tree), "TURNGATE_DATABASE_URL": f"sqlite:///{folder}/t.db",
           "TURNGATE_SPOOL_DIR": str(folder / "spool"), "TURNGATE_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", str(port), "--workers", str(workers)],
                            cwd=folder, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        ready_at = time.perf_counter() - started
        # Workers load their critics one by one behind a shared socket: wait until the tree stops growing.
        last = memory_mb(proc.pid)
        while True:
            time.sleep(1.0)
            now = memory_mb(proc.pid)
            if now[2] == last[2] and abs(now[0] - last[0]) < 0.01 * last[0]:
                break
            last = now
        return {"rss": now[0], "pss": now[1], "ready_s": ready_at}
    finally:
        _load.stop([proc], timeout=20)


def _wait_ready(url: str, proc: subprocess.Popen, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"turngate serve exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=1)
            if r.status_code == 200 and r.json().get("status") == "ready":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} was not ready within {within_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2", help="worker counts, one row each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", type=Path, help="another checkout to run alternately with this one")
    args = ap.parse_args()
    trees = [("this", ROOT)] + ([("other", args.tree.resolve())] if args.tree else [])
    print(f"turngate serve on its embedded defaults, {os.cpu_count()} cores, medians of {args.repeats} "
          f"start(s); MB over the process tree")
    for name, tree in trees:
        print(f"  {name}: {tree}")
    print(f"\n{'tree':<7}{'workers':>8}{'RSS MB':>9}{'PSS MB':>9}{'ready s':>9}")
    for workers in (int(w) for w in args.workers.split(",")):
        cells: dict[str, list[dict[str, float]]] = {}
        for rep in range(args.repeats):
            for name, tree in trees if rep % 2 == 0 else trees[::-1]:
                cells.setdefault(name, []).append(one_start(tree, workers))
        for name, runs in cells.items():
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name:<7}{workers:>8}{m['rss']:>9.0f}{m['pss']:>9.0f}{m['ready_s']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
