"""Time to first token through turngate: passthrough streams against gated (rank) streams.

A fake upstream that streams slowly (its first word after --first, then one word every --chunk-delay)
behind turngate (the real app and store, the critic stubbed to 2 ms: bench/_stub_proxy.py). Each
row: sequential streamed requests with the openai client, the median time to the first content
delta (TTFT) and to the end of the stream. `--turngate-src DIR` runs turngate from another source
tree (an older checkout, for a before/after comparison); the fake upstream is always this tree's.

    python bench/ttft.py [--first 0.3] [--words 40] [--chunk-delay 0.05] [--repeats 5]
                         [--turngate-src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _load  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

USER = [{"role": "user", "content": "Tell me a long story."}]


def wait_up(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


async def one(client: openai.AsyncOpenAI, model: str) -> tuple[float, float]:
    started = time.perf_counter()
    first: float | None = None
    stream = await client.chat.completions.create(model=model, messages=cast(Any, USER), stream=True)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (total if first is None else first), total  # no content at all: the first byte is the last


async def measure(base_url: str, model: str, repeats: int) -> tuple[float, float]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0) as client:
        await one(client, model)  # warm up
        runs = [await one(client, model) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=float, default=0.3, help="the upstream's time to its first word (s)")
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--chunk-delay", type=float, default=0.05, help="between the upstream's words (s)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--turngate-src", type=Path, default=ROOT)
    args = ap.parse_args()

    src = args.turngate_src.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="turngate-ttft-"))
    actor_port, proxy_port = free_port(), free_port()
    actor_url = f"http://127.0.0.1:{actor_port}/v1"
    config = {"routes": [
        {"alias": "pass", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "passthrough"},
        {"alias": "rank", "upstream_base_url": actor_url, "upstream_model": "fake", "mode": "rank", "candidates": 4}]}
    (tmp / "routes.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TURNGATE_CONFIG": str(tmp / "routes.yaml"),
           "TURNGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "TURNGATE_SPOOL_DIR": str(tmp / "spool")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "service.demo.fake_actor", "--port", str(actor_port),
                          "--latency", str(args.first), "--words", str(args.words),
                          "--chunk-delay", str(args.chunk_delay)], env={**env, "PYTHONPATH": str(ROOT)}),
        subprocess.Popen([sys.executable, str(src / "bench" / "_stub_proxy.py"), "--port", str(proxy_port)],
                         env={**env, "PYTHONPATH": str(src)}, cwd=src),
    ]
    try:
        wait_up(actor_url + "/models")
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz")
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "?"
        print(f"upstream: first word after {args.first * 1000:.0f} ms, {args.words} words "
              f"{args.chunk_delay * 1000:.0f} ms apart; turngate from {src} ({commit}); "
              f"median of {args.repeats} sequential streams\n")
        print(f"{'target':<24}{'TTFT ms':>10}{'total ms':>10}")
        proxy = f"http://127.0.0.1:{proxy_port}/v1"
        for name, url, model in (("direct upstream", actor_url, "fake"), ("turngate passthrough", proxy, "pass"),
                                 ("turngate rank N=4", proxy, "rank")):
            ttft, total = asyncio.run(measure(url, model, args.repeats))
            print(f"{name:<24}{ttft * 1000:>10.0f}{total * 1000:>10.0f}", flush=True)
    finally:
        _load.stop(procs)


if __name__ == "__main__":
    main()
