"""Where the critic's CPU time goes: raw onnxruntime, the service's session options.

Two tables for a bundle (default: the shipped critic_models/default):
- kernel time per operator type for one N x T batch (onnxruntime's own profiler), share and ms
  per run;
- cost per sequence against the batch size at each length: what merging turns into bigger runs
  buys (the micro-batcher's cap).

    python bench/critic_profile.py [--bundle DIR] [--n 8] [--tokens 256] [--lengths 128,256]
                                   [--batches 1,2,4,8,16,32,64]

Inputs are random token ids, no padding: the cost depends on the shape only. Medians; the machine
may be shared, so rerun when a number looks off.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.critic.onnx_critic import cores, cpu_description, session_options

ROOT = Path(__file__).resolve().parents[1]


def feed(n: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(1000, 20000, (n, length), dtype=np.int64),
            "attention_mask": np.ones((n, length), np.int64),
            "token_type_ids": np.zeros((n, length), np.int64)}


def median_ms(sess: ort.InferenceSession, inputs: dict[str, np.ndarray], reps: int) -> float:
    sess.run(None, inputs)  # warm this shape
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def operator_times(model: Path, inputs: dict[str, np.ndarray], reps: int) -> tuple[float, dict[str, float]]:
    """(median ms per run, kernel microseconds per run by operator type)."""
    opts = session_options(cores())
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "critic")
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        ms = median_ms(sess, inputs, reps)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    runs = reps + 1  # the warm-up run is profiled too
    return ms, {op: us / runs for op, us in per_op.items()}


def main(argv: list[str] | None = None) -> None:
    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "critic_models" / "default")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--lengths", type=ints, default=[128, 256])
    ap.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    model = args.bundle / "model.onnx"
    print(f"# bench/critic_profile.py: {model}; {cpu_description()}, onnxruntime {ort.__version__}")

    ms, per_op = operator_times(model, feed(args.n, args.tokens, rng), args.reps)
    total = sum(per_op.values())
    print(f"\n{args.n} x {args.tokens} tokens: p50 {ms:.1f} ms per run\n")
    print("| operator | share of kernel time | ms per run |\n|---|---:|---:|")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        if us / total >= 0.001:
            print(f"| {op} | {us / total:.1%} | {us / 1000:.3g} |")

    sess = ort.InferenceSession(str(model), session_options(cores()), providers=["CPUExecutionProvider"])
    print("\n| tokens | batch | ms per run | ms per sequence |\n|---:|---:|---:|---:|")
    for length in args.lengths:
        for n in args.batches:
            run_ms = median_ms(sess, feed(n, length, rng), max(3, args.reps * 8 // n))
            print(f"| {length} | {n} | {run_ms:.3g} | {run_ms / n:.3g} |")


if __name__ == "__main__":
    main()
