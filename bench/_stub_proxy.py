"""turngate for bench/overhead.py: the real app and store, the critic stubbed to a constant time."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import time
from contextlib import asynccontextmanager

import uvicorn

from service.api import onewrite
from service.app import create_app


class ConstantTimeCritic:
    name, version, provider = "stub", "0", "none"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def score(self, messages, candidates, tools=None) -> list[float]:
        # Burns its time on a worker thread, as the ONNX critic does, not on the event loop.
        await asyncio.to_thread(time.sleep, self.seconds)
        return [0.5] * len(candidates)


def record_full_gc_pauses(out: list[float]) -> None:
    """Appends the duration (ms) of every full (generation 2) cyclic-GC pass to `out`."""
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            out.append((time.perf_counter() - started[0]) * 1000)
    gc.callbacks.append(callback)


def record_gc_cpu(path: str) -> None:
    """The CPU (thread time) spent in cyclic-GC passes and their count, every generation, written to
    `path` as JSON on each SIGUSR1 (bench/proxy_threads.py reads it before and after a row)."""
    spent = {"cpu_s": 0.0, "passes": 0}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.thread_time()]
        elif started:
            spent["cpu_s"] += time.thread_time() - started[0]
            spent["passes"] += 1

    def dump(*_) -> None:
        with open(path, "w") as fh:
            json.dump(spent, fh)
    gc.callbacks.append(callback)
    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--critic-ms", type=float, default=2.0)
    ap.add_argument("--shipped-critic", action="store_true", help="the shipped critic (ONNX), not the stub")
    ap.add_argument("--gc-report", help="write the full-GC pauses (ms) here as JSON on exit")
    ap.add_argument("--gc-unfrozen", action="store_true",
                    help="undo the app's start-up gc.freeze(), to measure what it saves")
    ap.add_argument("--gc-cpu", help="write the GC's CPU so far to this file on SIGUSR1 (JSON)")
    ap.add_argument("--http", default=onewrite.NAME, help="uvicorn's HTTP protocol (default: turngate's)")
    args = ap.parse_args()
    if args.gc_cpu:
        record_gc_cpu(args.gc_cpu)
    app = create_app(critic=None if args.shipped_critic else ConstantTimeCritic(args.critic_ms / 1000))
    pauses: list[float] = []
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a):
        async with inner(a) as state:  # the app's start-up, its own gc.collect() included, is done
            if args.gc_unfrozen:
                gc.unfreeze()
            record_full_gc_pauses(pauses)
            yield state
            if args.gc_report:  # here, not after uvicorn.run: uvicorn re-raises SIGTERM on exit
                with open(args.gc_report, "w") as fh:
                    json.dump(pauses, fh)
    app.router.lifespan_context = lifespan
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http=args.http)


if __name__ == "__main__":
    main()
