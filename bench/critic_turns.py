"""The critic's share of rank turns, apart from HTTP: concurrent turns each wait for N simulated
candidate calls (asyncio sleeps, 50 ms +- 20%) and then score them with a real critic
(``OnnxCritic.assess``, the gate's call), per thread setting (service/critic/threads.py).
Interleaved round by round; medians.

    python bench/critic_turns.py [--bundle DIR] [--concurrency 16] [--seconds 4] [--rounds 3]
                                 [--candidates 4] [--distinct 1]

Columns: turns/s; the process's CPU per turn (all threads: event loop, tokenizer pool,
onnxruntime); `critic wait`: from the slowest call's return to the scores (what the critic adds to
a turn's latency). Every turn is the bench's own (bench/_load.py): one user message with a unique
id; `--distinct` of its candidates differ (the lean upstream sends identical ones: 1).
Thread settings: `2thr` = one run over 2 intra-op threads (the default on 2 cores), `1thr` = one
thread and one run at a time, `1thr x2` = one thread a run, two runs side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.critic.onnx_critic import OnnxCritic, cpu_description  # noqa: E402
from service.critic.registry import shipped_bundle  # noqa: E402
from service.critic.threads import CriticThreads  # noqa: E402

CONFIGS = {"2thr": CriticThreads(2, 1, 2), "1thr": CriticThreads(1, 1, 2), "1thr x2": CriticThreads(1, 2, 2)}


async def drive(critic: OnnxCritic, concurrency: int, seconds: float, n: int,
                distinct: int) -> tuple[float, float, float, float]:
    rng = random.Random(0)
    waits: list[float] = []
    turn_ids = iter(range(1, 10**9))
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            msgs = [{"role": "user", "content": f"Book the cheapest flight to Lisbon. bench-id {next(turn_ids)}"}]
            cands = [{"role": "assistant", "content": "ok" if i >= distinct else f"ok {i}"} for i in range(n)]
            await asyncio.gather(*(asyncio.sleep(0.05 * rng.uniform(0.8, 1.2)) for _ in cands))
            t0 = time.perf_counter()
            await critic.assess(msgs, cands)
            waits.append((time.perf_counter() - t0) * 1000)

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    waits.sort()
    return len(waits) / wall, cpu * 1000 / len(waits), statistics.median(waits), waits[int(.99 * len(waits))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=None, help="default: the shipped critic")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--distinct", type=int, default=1, help="how many of a turn's candidates differ")
    args = ap.parse_args()
    bundle = args.bundle or shipped_bundle()
    if bundle is None:
        raise SystemExit("no --bundle and no shipped critic_models/default")
    critics = {k: OnnxCritic.load(bundle, "CPUExecutionProvider", threads=v) for k, v in CONFIGS.items()}
    for critic in critics.values():
        critic.encoder_unread = frozenset()  # the bench's text turns read the encoder, as tool and agent turns do
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for name, critic in critics.items():
                results.setdefault(name, []).append(uvloop.run(drive(
                    critic, args.concurrency, args.seconds, args.candidates, args.distinct)))
    finally:
        for critic in critics.values():
            critic.close()
    print(f"# {bundle}; {cpu_description()}; {args.concurrency} concurrent turns of {args.candidates} candidates "
          f"({args.distinct} distinct), {args.seconds:g} s x {args.rounds} rounds, medians\n")
    print(f"{'threads':<10}{'turns/s':>9}{'cpu/turn ms':>13}{'critic wait p50':>17}{'p99':>8}")
    for name, rows in results.items():
        m = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"{name:<10}{m[0]:>9.0f}{m[1]:>13.2f}{m[2]:>17.2f}{m[3]:>8.2f}")


if __name__ == "__main__":
    main()
