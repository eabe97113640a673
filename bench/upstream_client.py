"""CPU per upstream call: httpx's AsyncClient, httpcore's pool (which turngate used until issue 18),
turngate's own transport (service.upstream.transport: asyncio protocol + httptools) and turngate's
whole call path over it (`_post`: the wire noting and the one retry, service.upstream.client).

All send the same chat completion request, one at a time, to the same fake actor (a separate
process, zero latency); the figure is this process's CPU time per call, so the actor's own cost
is not in it.

    python bench/upstream_client.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpcore
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.demo.fake_actor import free_port  # noqa: E402
from service.upstream.client import UpstreamClient, make_pools  # noqa: E402

BODY = {"model": "fake", "messages": [{"role": "user", "content": "Book the cheapest flight to Lisbon."}]}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def per_call_us(call, calls: int) -> float:
    for _ in range(100):  # warm the connection and code paths
        await call()
    before = cpu()
    for _ in range(calls):
        await call()
    return (cpu() - before) / calls * 1e6


async def run(url: str, calls: int, repeats: int) -> None:
    content = json.dumps(BODY, separators=(",", ":")).encode()
    headers = [(b"host", url.split("/")[2].encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(content)).encode())]
    results: dict[str, list[float]] = {"httpx.AsyncClient": [], "httpcore pool": [], "turngate transport": [],
                                       "turngate _post": []}
    upstream = UpstreamClient(make_pools())
    plain = make_pools()
    own_headers = [(b"content-type", b"application/json")]  # the transport adds host and content-length
    async with httpx.AsyncClient() as client, httpcore.AsyncConnectionPool() as pool:
        async def via_httpx():
            json.loads((await client.post(url, content=content, headers={"content-type": "application/json"})).content)

        async def via_httpcore():
            json.loads((await pool.request("POST", url, headers=headers, content=content)).content)

        async def via_transport():
            resp = await plain.request(b"POST", url, own_headers, content)
            json.loads(await resp.aread())

        async def via_turngate():
            json.loads((await upstream._post("bench", url, own_headers, content))[0].content)

        for _ in range(repeats):  # interleaved, so drifting machine load hits all alike
            results["httpx.AsyncClient"].append(await per_call_us(via_httpx, calls))
            results["httpcore pool"].append(await per_call_us(via_httpcore, calls))
            results["turngate transport"].append(await per_call_us(via_transport, calls))
            results["turngate _post"].append(await per_call_us(via_turngate, calls))
    await upstream.aclose()
    await plain.aclose()
    base = statistics.median(results["httpx.AsyncClient"])
    print(f"{'client':<22}{'CPU us/call (median)':>22}{'vs httpx':>10}")
    for name, values in results.items():
        print(f"{name:<22}{statistics.median(values):>22.0f}{statistics.median(values) / base:>10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    actor = subprocess.Popen([sys.executable, "-m", "service.demo.fake_actor", "--port", str(port),
                              "--latency", "0"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        print(f"{args.calls} sequential calls x {args.repeats} repeats to a zero-latency fake actor\n")
        asyncio.run(run(url, args.calls, args.repeats))
    finally:
        actor.terminate()
        actor.wait(timeout=10)


if __name__ == "__main__":
    main()
