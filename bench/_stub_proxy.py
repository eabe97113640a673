"""turngate for bench/overhead.py: the real app and store, the critic stubbed to a constant time."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--critic-ms", type=float, default=2.0)
    ap.add_argument("--shipped-critic", action="store_true", help="the shipped critic (ONNX), not the stub")
    ap.add_argument("--gc-report", help="write the full-GC pauses (ms) here as JSON on exit")
    ap.add_argument("--gc-unfrozen", action="store_true",
                    help="undo the app's start-up gc.freeze(), to measure what it saves")
    args = ap.parse_args()
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
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http=onewrite.NAME)


if __name__ == "__main__":
    main()
