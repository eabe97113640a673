"""Shared fixtures: a fake actor on loopback, turngate served by uvicorn in front of it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from service.app import create_app
from service.demo.fake_actor import FakeActor, Reply, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink


class TableCritic:
    """A critic whose scores the test sets: the first key found in the candidate wins."""

    name, version, provider = "table", "test", "none"

    def __init__(self, table: dict[str, float], default: float = 0.5) -> None:
        self.table, self.default = table, default
        self.calls: list[int] = []

    async def score(self, messages, candidates, tools=None) -> list[float]:
        self.calls.append(len(candidates))
        return [self._one(json.dumps(c)) for c in candidates]

    def _one(self, text: str) -> float:
        return next((v for k, v in self.table.items() if k in text), self.default)


class Scripted:
    """A responder the test can change between requests."""

    def __init__(self) -> None:
        self.fn: Callable[[dict[str, Any], int], Reply] = lambda body, i: Reply([{"role": "assistant",
                                                                                  "content": "hi"}])

    def __call__(self, body, attempt):
        return self.fn(body, attempt)


@pytest.fixture
def scripted() -> Scripted:
    return Scripted()


@pytest.fixture
def actor(scripted) -> Iterator[tuple[FakeActor, str]]:
    fake = FakeActor(scripted)
    with serve_in_thread(fake.app) as url:
        yield fake, url + "/v1"


@pytest.fixture
def gateway(actor) -> Callable:
    """gateway(route overrides..., critic=..., settings overrides...) -> (base_url, sink)."""
    _, actor_url = actor

    @contextmanager
    def start(critic=None, settings: dict[str, Any] | None = None, **route: Any):
        route_cfg = RouteSettings(**{"alias": "gpt-test", "upstream_base_url": actor_url,
                                     "upstream_model": "actor-model", "candidates": 4, "mode": "rank",
                                     "attempt_timeout_s": 5, "deadline_s": 10, **route})
        cfg = Settings(routes=[route_cfg], **(settings or {}))
        sink = MemorySink()
        with serve_in_thread(create_app(cfg, critic=critic or TableCritic({}), sink=sink)) as url:
            yield url + "/v1", sink

    return start
