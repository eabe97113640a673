"""A fake LLM critic for tests: an OpenAI-compatible server on loopback that answers the judge's
request with structured scores (or, as a test asks, late, with garbage or with an HTTP error),
keeping every request it got and its Authorization header."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from service.critic import features
from service.critic.base import Assessment
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from tests.conftest import TableCritic

JUDGE_KEY = "sk-judge-" + "5e8a1c" * 5
USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}

_CANDIDATE = re.compile(r"^### Candidate (\d+)\n", re.MULTILINE)


def judged_candidates(body: dict[str, Any]) -> list[str]:
    """The candidates' text as the judge's request numbers them (its last message)."""
    text = body["messages"][-1]["content"]
    parts = _CANDIDATE.split(text)[1:]
    out = [parts[i + 1] for i in range(0, len(parts), 2)]
    out[-1] = out[-1].rsplit("\n\nScore all", 1)[0]
    return out


def answer(entries: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> Reply:
    return Reply([assistant(json.dumps({"candidates": entries}))], usage=usage or USAGE)


class FakeJudge:
    """Scores each candidate by the first key of `table` its text holds (`default` else), with the
    reason "<reason_prefix> <key>"; `reply` (when set) answers instead."""

    def __init__(self, table: dict[str, float] | None = None, default: float = 0.5,
                 reason_prefix: str = "judged") -> None:
        self.table, self.default, self.reason_prefix = table or {}, default, reason_prefix
        self.reply: Callable[[dict[str, Any], int], Reply] | None = None
        self.actor = FakeActor(self._respond)
        self.keys: list[str] = []

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.actor.requests

    def _respond(self, body: dict[str, Any], attempt: int) -> Reply:
        if self.reply is not None:
            return self.reply(body, attempt)
        entries = []
        for i, text in enumerate(judged_candidates(body)):
            key = next((k for k in self.table if k in text), None)
            entries.append({"index": i, "score": self.table[key] if key else self.default,
                            "reason": f"{self.reason_prefix} {key or 'default'}."})
        return answer(entries)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("/chat/completions"):
            self.keys.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await self.actor.app(scope, receive, send)


@contextmanager
def serve_judge(judge: FakeJudge) -> Iterator[str]:
    """The judge's base URL (…/v1)."""
    with serve_in_thread(judge) as url:
        yield url + "/v1"


class FeatureCritic(TableCritic):
    """Scores by the table and explains them with the real turn features (call_support: agreement)."""

    async def assess(self, messages, candidates, tools=None, verdicts=None) -> list[Assessment]:
        scores = await self.score(messages, candidates, tools)
        turn = features.compute(messages, candidates, tools, verdicts=verdicts)
        return [Assessment(s, dict(zip(turn.names, row))) for s, row in zip(scores, turn.rows)]
