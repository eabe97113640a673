"""The critic as a client of the service sees it: POST /v1/critic/score with N candidates of T
tokens each, to a `turngate serve` started here on the bundle and provider asked for, against
raw onnxruntime (the limit: the same bundle and provider, the same pairs pre-tokenized, one
``session.run`` in this process), interleaved request by request; then the service alone under
``--concurrency`` clients at once.

    python bench/critic_http.py [--bundle DIR] [--provider cpu|cuda] [--n 8] [--tokens 256]
                                [--requests 300] [--concurrency 16] [--seconds 5]

The HTTP round trip holds what a turn's scoring costs in the service: the request parsed and
validated, tokenization, the turn features, the micro-batcher, the encoder run, the head, the
reasons, the reply. Every pair is cut to T tokens (the bundle's max_length is set to T), as
bench/critic.py does. Without --bundle: the shipped critic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import onnxruntime as ort
import tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._load import cpu_seconds, python_path, stop  # noqa: E402
from bench.critic import pct, turn  # noqa: E402
from bench.overhead import wait_up  # noqa: E402
from service.critic import render  # noqa: E402
from service.critic.bundle import INPUT_NAMES, OUTPUT_NAME, read_bundle  # noqa: E402
from service.critic.onnx_critic import CPU, CUDA, cpu_description  # noqa: E402
from service.critic.registry import shipped_bundle  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

# A declared tool makes each request a tool turn, scored by the tool head; the service's copy of the
# bundle weights the encoder there, so that it runs (a head that gives it weight 0 skips it).
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "Finds an order by its id.",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                                                          "required": ["id"]}}}]


def body(n: int, seed: int) -> dict:
    messages, candidates = turn(n, seed)
    return {"messages": messages, "candidates": candidates, "tools": TOOLS}


async def throughput(url: str, bodies: list[dict], concurrency: int, seconds: float) -> tuple[int, float, list[float]]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await client.post(url, json=bodies[i % len(bodies)])
                r.raise_for_status()
                latencies.append(1000 * (time.perf_counter() - t))
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return len(latencies), time.perf_counter() - started, latencies


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=8, help="candidates per request")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per (context, candidate) pair")
    ap.add_argument("--requests", type=int, default=300, help="sequential requests (after 20 to warm)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="the concurrent phase")
    args = ap.parse_args(argv)

    path = args.bundle or shipped_bundle()
    if path is None:
        sys.exit("no --bundle and no shipped critic (critic_models/default/)")
    bundle = read_bundle(path)
    providers = [CUDA, CPU] if args.provider == "cuda" else [CPU]
    session = ort.InferenceSession(str(bundle.model_path), providers=providers)
    tok = tokenizers.Tokenizer.from_file(str(bundle.tokenizer_path))
    bodies = [body(args.n, seed) for seed in range(16)]
    feeds = [render.encode_batch(tok, b["messages"], b["candidates"], b["tools"], args.tokens) for b in bodies]
    assert all(f["input_ids"].shape == (args.n, args.tokens) for f in feeds)

    tmp = Path(tempfile.mkdtemp(prefix="turngate-critic-http-"))
    port = free_port()
    env = {**os.environ, "TURNGATE_CRITIC": str(bundle.path), "TURNGATE_CRITIC_PROVIDERS": args.provider,
           "TURNGATE_DATABASE_URL": f"sqlite:///{tmp}/bench.db", "TURNGATE_SPOOL_DIR": str(tmp / "spool"),
           "TURNGATE_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "PYTHONPATH": python_path(ROOT)}
    # The service serves a copy: max_length = T (what it cuts to), and a tool head that reads the
    # encoder (the shipped head gives it weight 0 and the service would skip it), as raw onnxruntime does.
    copy = tmp / "bundle"
    copy.mkdir()
    for f in bundle.path.iterdir():
        if f.is_file() and f.name not in ("critic.json", "head.json"):
            (copy / f.name).symlink_to(f)
    (copy / "critic.json").write_text(json.dumps({**bundle.manifest, "max_length": args.tokens}))
    if (bundle.path / "head.json").is_file():
        head = json.loads((bundle.path / "head.json").read_text())
        tool = head["heads"]["tool"]
        at = tool["features"].index("encoder")
        tool["weights"][at] = tool["weights"][at] or 1e-12
        (copy / "head.json").write_text(json.dumps(head))
    env["TURNGATE_CRITIC"] = str(copy)
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/readyz", 120)  # 503 until the critic is loaded and warm
        ready = httpx.get(base + "/readyz", timeout=10).json()
        url = base + "/v1/critic/score"
        http: list[float] = []
        raw: list[float] = []
        with httpx.Client(timeout=60) as client:
            for i in range(20):  # warm: connection, code paths, the provider's kernels for this shape
                client.post(url, json=bodies[i % 16]).raise_for_status()
                session.run([OUTPUT_NAME], {k: feeds[i % 16][k] for k in INPUT_NAMES})
            got = client.post(url, json=bodies[0]).json()
            cpu0 = cpu_seconds(server.pid)
            for i in range(args.requests):
                t = time.perf_counter()
                client.post(url, json=bodies[i % 16]).raise_for_status()
                http.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                session.run([OUTPUT_NAME], {k: feeds[i % 16][k] for k in INPUT_NAMES})
                raw.append(1000 * (time.perf_counter() - t))
            cpu = 1000 * (cpu_seconds(server.pid) - cpu0) / args.requests
        done, wall, lat = asyncio.run(throughput(url, bodies, args.concurrency, args.seconds))
    finally:
        stop([server])

    print(f"# bench/critic_http.py {' '.join(sys.argv[1:] if argv is None else argv) or '(defaults)'}")
    print(f"machine: {cpu_description()}, onnxruntime {ort.__version__}")
    print(f"bundle: {bundle.name} {bundle.version} ({bundle.precision}); service critic: "
          f"{got['critic']['provider']} (readyz: {json.dumps(ready.get('critic', ready))[:200]}); "
          f"raw session: {session.get_providers()[0]}")
    print(f"{args.n} candidates x {args.tokens} tokens, {args.requests} sequential requests interleaved with "
          "raw runs\n")
    print("| path | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    print(f"| POST /v1/critic/score (HTTP round trip) | {statistics.median(http):.2f} | {pct(http, 0.99):.2f} |")
    print(f"| raw onnxruntime session.run | {statistics.median(raw):.2f} | {pct(raw, 0.99):.2f} |")
    print(f"\nservice / raw (p50): {statistics.median(http) / statistics.median(raw):.2f}; "
          f"service CPU per request {cpu:.2f} ms")
    print(f"{args.concurrency} clients at once for {args.seconds:g} s: {done / wall:.1f} requests/s, "
          f"p50 {statistics.median(lat):.2f} ms, p99 {pct(lat, 0.99):.2f} ms")


if __name__ == "__main__":
    main()
