"""Helpers for the turn inspector's tests: a gateway with a database store and an admin key in front
of the fake actor, a critic that explains its scores, and turns served through the openai SDK."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

from service.app import create_app
from service.critic.base import Assessment
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.sink import StoreSink
from tests.conftest import TableCritic

ADMIN = "sk-admin-inspector-test"
CLIENT_A = "sk-client-a"
CLIENT_B = "sk-client-b"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
N = 3
# The fake actor's i-th choice says "answer i"; the critic scores them by this table.
SCORES = {"answer 0": 0.2, "answer 1": 0.9, "answer 2": 0.55}


def key_id(key: str) -> str:
    """The id a static client key's turns are filed under (service.api.deps.client_key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ExplainingCritic(TableCritic):
    """Scores by the table, with features and contributions, as the shipped critic gives them."""

    async def assess(self, messages, candidates, tools=None, verdicts=None) -> list[Assessment]:
        scores = await self.score(messages, candidates, tools)
        return [Assessment(s, features={"length": float(len(str(c.get("content")))), "agreement": 1 / len(scores)},
                           contributions={"length": round(s - 0.5, 3), "agreement": -0.125})
                for s, c in zip(scores, candidates)]


def numbered_choices(body: dict[str, Any], attempt: int) -> Reply:
    """n choices, "answer 0" .. "answer n-1", unless the last user message asks to be echoed."""
    last = body["messages"][-1].get("content")
    if isinstance(last, str) and last.startswith("echo:"):
        return Reply([assistant(last[5:])] * int(body.get("n") or 1))
    return Reply([assistant(f"answer {i}") for i in range(int(body.get("n") or 1))])


@contextmanager
def store_gateway(actor_url: str, db_url: str, spool: Path) -> Iterator[tuple[str, StoreSink]]:
    """turngate under uvicorn with a store on db_url: route `gpt-test` ranks N candidates, route
    `gpt-pass` passes through. Yields (base URL without /v1, the sink)."""
    routes = [RouteSettings(alias="gpt-test", upstream_base_url=actor_url, upstream_model="actor-model",
                            candidates=N, mode="rank", upstream_supports_n=True, attempt_timeout_s=5,
                            deadline_s=10),
              RouteSettings(alias="gpt-pass", upstream_base_url=actor_url, upstream_model="actor-model",
                            candidates=1, mode="passthrough", attempt_timeout_s=5, deadline_s=10)]
    settings = Settings(routes=routes, api_keys=[CLIENT_A, CLIENT_B], admin_key=ADMIN)
    sink = StoreSink(db_url, spool, flush_interval_s=0.05)
    with serve_in_thread(create_app(settings, critic=ExplainingCritic(SCORES), sink=sink)) as base:
        yield base, sink


def chat(base: str, content: str, *, key: str = CLIENT_A, model: str = "gpt-test",
         tools: list[dict] | None = None, metadata: dict | None = None) -> str:
    """Serves one turn through the openai SDK; returns its turn id."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = tools
    if metadata:
        extra["metadata"] = metadata
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        **extra)
    return raw.headers["x-turngate-turn-id"]


def wait_stored(base: str, turn_id: str, timeout_s: float = 10.0) -> dict:
    """The turn as the admin API shows it, once the writer has put it in the database."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = httpx.get(f"{base}/v1/admin/turns/{turn_id}", headers=ADMIN_HEADERS)
        if got.status_code == 200:
            return got.json()
        assert got.status_code == 404, got.text
        assert time.monotonic() < deadline, f"turn {turn_id} never reached the store"
        time.sleep(0.05)
