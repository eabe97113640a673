"""CPU of a round's candidate calls when the client's body holds what orjson cannot write (integers
past 64 bits, lone surrogates: a client may send both), against the one call of a single candidate.

    python bench/hostile_body.py [--calls 1,4,8] [--repeats 3]

The body is tests/test_upstream_encoding.py's: 3.7 MB, 170,000 integers of 10**20 and a lone
surrogate. N concurrent `UpstreamClient.complete` calls share one body, as a round's candidate calls
do, against bench/_lean_http.py's upstream in a process of its own; the bench's own process CPU per
round is printed (median of the repeats), with its ratio to one call. It uses only the upstream
client's interface, so the same command under another checkout's PYTHONPATH measures that checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: another checkout's `service` is measured when it is there

from bench.overhead import wait_up  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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
