"""Turn features per turn (service/critic/features.py) against their budget: 1 ms of CPU per
8-candidate turn, on top of the encoder.

Turns, side by side in one run, interleaved rep by rep:
- tool: function-calling questions with 8 sampled replies (the shared BFCL file when it is found,
  else synthetic calls), structural verdicts given by the gate (its path) or computed here (the
  score API's path);
- agent: the middle turn of a τ-bench conversation (the shared trajectories, else synthetic),
  8 candidates, history features over the whole conversation;
- text: 8 answers of an AlpacaEval prompt (shared best-of-n, else synthetic).

    python bench/critic_features.py [--data ../shared/data] [--turns 200] [--reps 5]

Prints the median CPU time per turn (process time, so a busy neighbour inflates it less than
wall time) and the ratio to the 1 ms budget.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from service.critic import features
from service.critic.onnx_critic import cpu_description

BUDGET_MS = 1.0


def _call(name: str, **args) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def _lines(path: Path, n: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def tool_turns(data: Path, n: int, rng: random.Random) -> list[tuple]:
    rows = _lines(data / "tool-calls" / "bfcl-train.jsonl", n)
    if rows:
        return [(r["messages"], [c["message"] for c in rng.sample(r["candidates"], 8)], r["tools"]) for r in rows]
    tools = [{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}}}}]
    return [([{"role": "user", "content": f"Book {i} rooms in Paris"}],
             [_call("book", city=rng.choice(["Paris", "Rome"]), n=rng.choice([i, i + 1])) for _ in range(8)], tools)
            for i in range(n)]


def agent_turns(data: Path, n: int) -> list[tuple]:
    rows = _lines(data / "trajectories" / "tau-bench-airline-gpt-4o.jsonl", n)
    out = []
    for r in rows:
        msgs = r["messages"]
        idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        i = idx[len(idx) // 2]
        out.append((msgs[:i], [msgs[i]] * 4 + [msgs[idx[-1]]] * 4, None))
    if out:
        return out
    hist = [{"role": "user", "content": "cancel XK42LP"}, _call("get_reservation", id="XK42LP"),
            {"role": "tool", "content": '{"id": "XK42LP", "status": "active"}'}] * 10
    return [(hist, [_call("cancel_reservation", id="XK42LP")] * 8, None)] * n


def text_turns(data: Path, n: int) -> list[tuple]:
    rows = _lines(data / "best-of-n" / "alpaca-eval-bon.jsonl", n)
    if rows:
        return [([{"role": "user", "content": r["instruction"]}],
                 [{"role": "assistant", "content": c["text"]} for c in r["candidates"][:8]], None) for r in rows]
    return [([{"role": "user", "content": "Explain tides."}],
             [{"role": "assistant", "content": "The moon pulls the sea. " * (5 + k)} for k in range(8)], None)] * n


def per_turn_ms(turns: list[tuple], verdicts: bool) -> float:
    started = time.process_time()
    for messages, cands, tools in turns:
        features.compute(messages, cands, tools, verdicts=[True] * len(cands) if verdicts else None)
    return 1000 * (time.process_time() - started) / len(turns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(0)
    cases = {"tool, verdicts given (gate)": (tool_turns(args.data, args.turns, rng), True),
             "tool, verdicts computed (score API)": (tool_turns(args.data, args.turns, rng), False),
             "agent conversation": (agent_turns(args.data, args.turns), True),
             "text answers": (text_turns(args.data, args.turns), True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, (turns, verdicts) in cases.items():
            times[name].append(per_turn_ms(turns, verdicts))
    print(f"turn features, 8 candidates a turn, CPU time per turn; {cpu_description()}; "
          f"{args.reps} reps x {args.turns} turns, median")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<38} {med:7.3f} ms   {med / BUDGET_MS:5.2f}x the {BUDGET_MS:g} ms budget")


if __name__ == "__main__":
    main()
