"""CPU the chat route spends reading a request body: parse, validate, check tool schemas for refs.

Two bodies: the one-message body of bench/overhead.py, and an agent turn (61 messages with 20 tool
calls and results, 10 tools with schemas, about 18 KB). Prints the best of 5 runs per body, in
microseconds of process CPU per request. Runs against whichever `service` package is first on the
path, so a checkout of another commit can be measured the same way:

    python bench/edge.py [--root PATH_TO_A_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def bodies() -> dict[str, bytes]:
    small = {"model": "gpt-test", "messages": [{"role": "user", "content": "Book the cheapest flight to Lisbon."}]}
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "does a thing " * 5, "parameters": {
            "type": "object", "required": ["id"], "properties": {
                "id": {"type": "string", "pattern": "^[A-Z0-9]{6}$"}, "n": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}}}}}} for i in range(10)]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are an agent. " * 20}]
    for i in range(20):
        messages += [
            {"role": "user", "content": "please do the next step " * 10},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
                "name": "tool_1", "arguments": json.dumps({"id": "ABC123", "n": i})}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": "result " * 30}]
    agent = {"model": "gpt-test", "messages": messages, "tools": tools, "temperature": 0.2}
    return {"one message": json.dumps(small).encode(), "agent turn": json.dumps(agent).encode()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args()
    sys.path.insert(0, args.root)
    from service.api import openai as route

    for name, body in bodies().items():
        n = 3000 if len(body) < 1000 else 300
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(n):
                route._parse(body)
            best = min(best, (time.process_time() - started) / n)
        print(f"{name:<12} {len(body):>7,} bytes  {best * 1e6:8.1f} us/request")


if __name__ == "__main__":
    main()
