"""Encoder scores started while a turn's other candidates are still out.

A rank turn waits for its slowest candidate. The cross-encoder reads each candidate against the
conversation alone, so the candidates already in can be encoded in the meantime, and only what the
last call brought stays on the turn's critical path. The turn features (agreement compares the
candidates) and the head still wait for the whole round: ``OnnxCritic.assess`` takes the encodings
started here and encodes the rest. Identical candidates share one encoding, as within a turn.

Only while the critic keeps up: when turns already queue for a run (``busy``), an early row
would wait behind them anyway, and encoding each candidate apart would give up what a whole round
shares (its context tokenized once, its rows in one run); those candidates are left to ``assess``.

Built and used on the event loop; the encodings run where the critic's always do (tokenizer pool,
micro-batcher, inference pool). ``close`` at the end of the round cancels those still queued, so
a turn that failed or was abandoned costs no more inference.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

Message = dict[str, Any]
Encode = Callable[[list[Message], list[Message], list[dict[str, Any]] | None], Awaitable[np.ndarray]]


def candidate_key(candidate: Message) -> str:
    """Equal for candidates the encoder reads the same (key order aside)."""
    return json.dumps(candidate, sort_keys=True, default=str)


class EarlyEncoder:
    """The encodings of one round's candidates, started as each call comes back."""

    def __init__(self, encode: Encode, messages: list[Message], tools: list[dict[str, Any]] | None,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self._encode, self._messages, self._tools, self._busy = encode, messages, tools, busy
        self._started: dict[str, asyncio.Future[np.ndarray]] = {}
        self._closed = False

    def add(self, candidate: Message) -> None:
        """Starts encoding ``candidate`` unless an identical one already is, or the critic is busy."""
        key = candidate_key(candidate)
        if self._closed or key in self._started or self._busy():
            return
        self._started[key] = asyncio.ensure_future(self._encode(self._messages, [candidate], self._tools))

    def call_done(self, task: asyncio.Future) -> None:
        """A done-callback for an upstream call's task: encodes the samples it returned."""
        if task.cancelled() or task.exception() is not None:
            return
        for sample in task.result():
            self.add(sample.message)

    def started(self, keys: list[str]) -> dict[str, asyncio.Future[np.ndarray]]:
        """The encodings under way or done for these keys (one row of probabilities each)."""
        return {k: self._started[k] for k in keys if k in self._started}

    def close(self) -> None:
        """Cancels what has not run; marks failures seen (the turn already fell back on them)."""
        self._closed = True
        for fut in self._started.values():
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()
