"""turngate for bench/overhead.py: the real app and store, the critic stubbed to a constant time."""

from __future__ import annotations

import argparse
import asyncio
import time

import uvicorn

from service.app import create_app


class ConstantTimeCritic:
    name, version, provider = "stub", "0", "none"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def score(self, messages, candidates, tools=None) -> list[float]:
        # Burns its time on a worker thread, as the ONNX critic does, not on the event loop.
        await asyncio.to_thread(time.sleep, self.seconds)
        return [0.5] * len(candidates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--critic-ms", type=float, default=2.0)
    args = ap.parse_args()
    app = create_app(critic=ConstantTimeCritic(args.critic_ms / 1000))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
