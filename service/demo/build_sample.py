"""Builds service/demo/sample.jsonl from the shared τ-bench trajectories (run once, by a developer).

Each demo turn is one τ-bench airline task with several trials: the context is the successful
trial's conversation up to its first write action, and the candidates are what each trial did at
that step (its first write action, or its reply there). One candidate per turn is marked
`synthetic`: a real candidate with its arguments cut off, to show the structural veto.

    python -m service.demo.build_sample ../shared/data/trajectories/tau-bench-airline-gpt-4o.jsonl
"""

from __future__ import annotations

import copy
import json
import sys
from collections import defaultdict
from pathlib import Path

from service.gate.actions import is_write
from service.gate.actions import matches_gold as call_matches_gold

TASKS = ("7", "11", "5", "1")
OUT = Path(__file__).with_name("sample.jsonl")


def first_write(messages: list[dict]) -> int | None:
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") or []
        if m["role"] == "assistant" and calls and all(is_write(c["function"]["name"]) for c in calls):
            return i
    return None


def matches_gold(message: dict, gold: list[dict]) -> bool:
    return any(call_matches_gold(call, gold) for call in message.get("tool_calls") or [])


def tool_defs(rows: list[dict]) -> list[dict]:
    keys: dict[str, set] = defaultdict(set)
    for r in rows:
        for m in r["messages"]:
            for c in m.get("tool_calls") or []:
                keys[c["function"]["name"]].update(json.loads(c["function"]["arguments"]))
    return [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {} for k in sorted(ks)}, "additionalProperties": False}}}
        for name, ks in sorted(keys.items())]


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    tools = tool_defs(rows)
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task_id"]].append(r)
    with OUT.open("w") as out:
        for task in TASKS:
            trials = by_task[task]
            good = next(t for t in trials if t["reward"] == 1.0)
            at = first_write(good["messages"])
            candidates: list[dict] = []
            for t in trials:
                i = first_write(t["messages"])
                msg = t["messages"][i if i is not None else min(at or 0, len(t["messages"]) - 1)]
                if msg["role"] != "assistant" or any(c["message"] == msg for c in candidates):
                    continue
                candidates.append({"message": msg, "trial": t["trial"], "reward": t["reward"],
                                   "gold": matches_gold(msg, t["gold_actions"]), "synthetic": False})
            broken = copy.deepcopy(next(c for c in candidates if c["message"].get("tool_calls")))
            args = broken["message"]["tool_calls"][0]["function"]["arguments"]
            broken["message"]["tool_calls"][0]["function"]["arguments"] = args[: len(args) // 2]
            broken.update(gold=False, synthetic=True, reward=None)
            candidates.insert(1, broken)
            out.write(json.dumps({"task_id": task, "source": good["source"], "messages": good["messages"][:at],
                                  "tools": tools, "candidates": candidates}) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
