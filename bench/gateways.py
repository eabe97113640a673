"""turngate against LiteLLM's proxy on one apparatus: the same lean fake upstream, the same load
generator (bench/_load.py), alternating rounds, one worker each (and turngate with --workers 2).

Per row, the median over rounds of: throughput, added latency p50/p99 (client-observed latency -
the upstream's own service time for that request, a stream measured to its last chunk), and the
proxy's CPU per request (the proxy process and its children, from /proc, over the row / requests).
turngate runs a passthrough route with its embedded store on (SQLite, every turn recorded).

    python bench/gateways.py [--concurrency 1,16,64] [--modes json,sse] [--rounds 2] [--seconds 4]
                             [--targets turngate,turngate-w2,litellm]

LiteLLM comes from the `bench` extra (pip install -e '.[bench]'); without it its rows are skipped.
It runs with a config pointing at the fake upstream, no database, no telemetry, the local cost map.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _load  # noqa: E402
from bench.overhead import wait_up  # noqa: E402
from service.demo.fake_actor import free_port  # noqa: E402

KEY = "sk-bench-" + "5f0c" * 8
AUTH = {"authorization": f"Bearer {KEY}"}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def start_targets(names: list[str], upstream: str, tmp: Path) -> dict[str, tuple[subprocess.Popen, str, str]]:
    """name -> (process, chat completions URL, health URL)."""
    routes = {"routes": [{"alias": "fake", "upstream_base_url": upstream, "upstream_model": "fake",
                          "mode": "passthrough"}]}
    (tmp / "routes.yaml").write_text(yaml.safe_dump(routes))
    out = {}
    for name in names:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": _load.python_path(ROOT), "TURNGATE_CONFIG": str(tmp / "routes.yaml"),
               "TURNGATE_DATABASE_URL": f"sqlite:///{tmp}/{name}.db", "TURNGATE_SPOOL_DIR": str(tmp / f"spool-{name}")}
        if name == "turngate":
            cmd = [sys.executable, str(ROOT / "bench" / "_stub_proxy.py"), "--port", str(port)]
            health = f"http://127.0.0.1:{port}/healthz"
        elif name == "turngate-w2":
            cmd = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", str(port),
                   "--workers", "2"]
            health = f"http://127.0.0.1:{port}/healthz"
        elif name == "litellm":
            config = {"model_list": [{"model_name": "fake", "litellm_params": {
                "model": "openai/fake", "api_base": upstream, "api_key": "sk-bench"}}],
                "litellm_settings": {"telemetry": False, "set_verbose": False}}
            (tmp / "litellm.yaml").write_text(yaml.safe_dump(config))
            exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
            cmd = [exe, "--config", str(tmp / "litellm.yaml"), "--port", str(port), "--num_workers", "1"]
            env = {k: v for k, v in env.items() if k != "DATABASE_URL"}
            # A master key, as LiteLLM requires to start; every target gets it as the client's bearer.
            env.update(LITELLM_TELEMETRY="False", LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                       LITELLM_MASTER_KEY=KEY)
            health = f"http://127.0.0.1:{port}/health/liveliness"
        else:
            raise SystemExit(f"unknown target {name}")
        with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        out[name] = (proc, f"http://127.0.0.1:{port}/v1/chat/completions", health)
    for name, (proc, _, health) in out.items():
        try:
            wait_up(health, 90)
        except RuntimeError:
            proc.terminate()
            raise SystemExit(f"{name} did not come up; see {tmp / (name + '.log')}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05, help="fake upstream latency, seconds")
    ap.add_argument("--jitter", type=float, default=0.2)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--modes", default="json,sse", help="json: non-streaming; sse: streaming")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0, help="per cell")
    ap.add_argument("--targets", default="turngate,turngate-w2,litellm")
    args = ap.parse_args(argv)
    names = args.targets.split(",")
    if "litellm" in names and version("litellm") == "not installed":
        print("litellm not installed (pip install -e '.[bench]'): its rows left out")
        names.remove("litellm")

    tmp = Path(tempfile.mkdtemp(prefix="turngate-gateways-"))
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    up = subprocess.Popen([sys.executable, str(ROOT / "bench" / "_lean_http.py"), "--port", str(up_port),
                           "--latency", str(args.latency), "--jitter", str(args.jitter)])
    procs = [up]
    try:
        wait_up(upstream + "/models")
        targets = start_targets(names, upstream, tmp)
        procs += [p for p, _, _ in targets.values()]
        print(f"python {platform.python_version()}, turngate {version('turngate')}, litellm {version('litellm')}, "
              f"uvicorn {version('uvicorn')}, httptools {version('httptools')}, {os.cpu_count()} cores")
        print(f"fake upstream {args.latency * 1000:.0f} ms +- {args.jitter:.0%}, {args.rounds} alternating rounds "
              f"x {args.seconds:g} s a cell; medians over rounds\n")
        for _, url, _ in targets.values():  # warm up
            for stream in (False, True):
                uvloop.run(_load.load(url, "fake", 4, 0.5, upstream, stream, AUTH))
        cells: dict[tuple[str, int, str], list[dict]] = {}
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for c in [int(x) for x in args.concurrency.split(",")]:
                for mode in args.modes.split(","):
                    for name in order:
                        proc, url, _ = targets[name]
                        cpu0 = _load.cpu_seconds(proc.pid)
                        r = uvloop.run(_load.load(url, "fake", c, args.seconds, upstream, mode == "sse", AUTH))
                        cpu = (_load.cpu_seconds(proc.pid) - cpu0) * 1000 / max(1, r["n"])
                        cells.setdefault((name, c, mode), []).append(
                            {"rps": r["rps"], "p50": _load.pct(r["added"], .5), "p99": _load.pct(r["added"], .99),
                             "cpu": cpu})
        print("| proxy | conc | mode | req/s | added p50 ms | added p99 ms | proxy CPU/req ms |"
              " p50 vs LiteLLM | CPU vs LiteLLM |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("rps", "p50", "p99", "cpu")}
               for k, v in cells.items()}
        for (name, c, mode), m in med.items():
            ref = med.get(("litellm", c, mode))
            ratios = (f"{m['p50'] / ref['p50']:.2f}x | {m['cpu'] / ref['cpu']:.2f}x"
                      if ref and name != "litellm" else "|")
            print(f"| {name} | {c} | {mode} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['cpu']:.2f} | "
                  f"{ratios} |", flush=True)
    finally:
        _load.stop(procs)


if __name__ == "__main__":
    main()
