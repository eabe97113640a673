"""CPU of a round's candidate calls when the client's body holds what orjson cannot write (integers
past 64 bits, lone surrogates: a client may send both), against the one call of a single candidate;
and how long the chat route's parse of a body of tiny values holds the event loop up.

    python bench/hostile_body.py [--calls 1,4,8] [--repeats 3] [--values 1300000]

The body is tests/test_upstream_encoding.py's: 3.7 MB, 170,000 integers of 10**20 and a lone
surrogate. N concurrent `UpstreamClient.complete` calls share one body, as a round's candidate calls
do, against bench/_lean_http.py's upstream in a process of its own; the bench's own process CPU per
round is printed (median of the repeats), with its ratio to one call. It uses only the upstream
client's interface, so the same command under another checkout's PYTHONPATH measures that checkout.

The parse: a body of --values zeros in an unknown field (1,300,000: 3.9 MB, under the 4 MB request
cap), parsed as the chat route parses a body over 256 KiB (on a worker thread) while the loop
sleeps 1 ms over and over; the worst lateness of those wake-ups is what every other request waited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: another checkout's `service` is measured when it is there

from bench.overhead import wait_up  # noqa: E402
from service.api import openai  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402
from service.settings import RouteSettings  # noqa: E402
from service.upstream.client import UpstreamClient, make_pools  # noqa: E402


def body() -> dict:
    """A new round's body (nothing of it written yet)."""
    return {"model": "m", "messages": [{"role": "user", "content": "hi \ud800 there"}],
            "metadata": {"id": 10 ** 30}, "x_pad": [10 ** 20] * 170_000}


async def round_cpu(route: RouteSettings, calls: int) -> float:
    upstream = UpstreamClient(make_pools())
    sent = body()
    started = time.process_time()
    try:
        await asyncio.gather(*[upstream.complete(route, sent, 1, None, 30.0) for _ in range(calls)])
    finally:
        await upstream.aclose()
    return time.process_time() - started


async def parse_lag(raw: bytes) -> tuple[float, float]:
    """(seconds the parse took, the loop's worst lateness meanwhile)."""
    lags: list[float] = []

    async def probe() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - started - 0.001)

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await asyncio.to_thread(openai._parse, raw, False)
    took = time.perf_counter() - started
    await asyncio.sleep(0.01)
    prober.cancel()
    return took, max(lags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--values", type=int, default=1_300_000)
    args = ap.parse_args()
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": [0] * args.values}).encode()
    runs = [asyncio.run(parse_lag(raw)) for _ in range(args.repeats)]
    print(f"parse of a {len(raw) / 1e6:.1f} MB body of {args.values:,} values: "
          f"{statistics.median(t for t, _ in runs) * 1000:.0f} ms, the loop's worst lag "
          f"{statistics.median(lag for _, lag in runs) * 1000:.0f} ms (medians)", flush=True)
    port = free_port()
    actor = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_lean_http.py"), "--port", str(port),
                              "--latency", "0"])
    try:
        wait_up(f"http://127.0.0.1:{port}/v1/models")
        route = RouteSettings(alias="r", upstream_base_url=f"http://127.0.0.1:{port}/v1", upstream_model="m")
        base = None
        for n in map(int, args.calls.split(",")):
            ms = statistics.median(asyncio.run(round_cpu(route, n)) for _ in range(args.repeats)) * 1000
            base = base or ms
            print(f"{n} call(s) sharing the body: {ms:6.0f} ms of CPU a round ({ms / base:.1f}x one call)", flush=True)
    finally:
        actor.kill()
        actor.wait()


if __name__ == "__main__":
    main()
