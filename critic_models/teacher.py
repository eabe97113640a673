"""`turngate critic label`: a teacher judge labels logged candidates, offline.

One request per logged turn (context, tools and every candidate: the serving judge's own request,
service.critic.llm_critic.request_body), its scores stored as `candidate_labels` rows under
"judge:<model>@<rubric_version>". The job is:
- resumable: it asks only about turns that labeller has not labelled, and a label written twice is a
  no-op, so a rerun after Ctrl-C (or after failures) carries on where the last one stopped;
- rate-limited (requests started per second) with bounded concurrency (C workers, one request each);
- fault-tolerant: a judge failure on a turn (refused, timed out, garbage) is counted, logged and
  skipped, and the turn stays pending for the next run; it never stops the job.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from service.critic.llm_critic import JudgeError, read_reply, request_body
from service.store.engine import make_sync_engine
from service.store.labels import LoggedTurn, Window, judge_labeler, pending_turns, structural_labels, write_labels

log = logging.getLogger("turngate.label")


@dataclass
class Judge:
    url: str  # an OpenAI-compatible base URL (…/v1): requests go to {url}/chat/completions
    model: str
    api_key: str | None = None
    rubric: str = ""
    rubric_version: str = "1"
    timeout_s: float = 60.0

    @property
    def labeler(self) -> str:
        return judge_labeler(self.model, self.rubric_version)


@dataclass
class Progress:
    total: int = 0
    labelled: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: dict[str, int] = field(default_factory=dict)  # kind -> count

    @property
    def rate(self) -> float:
        return self.labelled / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        return f"labelled {self.labelled}/{self.total} ({self.failed} failed) {self.rate:.1f}/s"


class Pacer:
    """Starts at most `rate` requests a second (evenly spaced); None or 0: no limit."""

    def __init__(self, rate: float | None) -> None:
        self.gap = 1.0 / rate if rate else 0.0
        self.next = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.gap:
            return
        async with self.lock:
            now = time.monotonic()
            wait, self.next = max(0.0, self.next - now), max(now, self.next) + self.gap
        if wait:
            await asyncio.sleep(wait)


def stderr_progress(p: Progress, done: bool = False) -> None:
    sys.stderr.write("\r " + p.line() + ("\n" if done else ""))
    sys.stderr.flush()


async def ask(client: httpx.AsyncClient, judge: Judge, turn: LoggedTurn) -> list[dict]:
    """The label rows for one turn, or JudgeError / httpx.HTTPError."""
    headers = {"authorization": f"Bearer {judge.api_key}"} if judge.api_key else {}
    body = request_body(judge.model, turn.messages, turn.candidates, turn.tools, judge.rubric)
    reply = await client.post(judge.url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                              timeout=judge.timeout_s)
    if reply.status_code >= 400:
        raise JudgeError("error", f"the judge answered {reply.status_code}: {reply.text[:120]!r}")
    try:
        doc = reply.json()
    except ValueError:
        raise JudgeError("invalid", f"the judge's reply is not JSON: {reply.text[:80]!r}") from None
    return [{"turn_id": turn.turn_id, "candidate_idx": turn.indices[i], "labeler": judge.labeler,
             "score": j.score, "reason": j.reason or None}
            for i, j in enumerate(read_reply(doc, len(turn.candidates)))]


async def label_turns(database_url: str, judge: Judge, window: Window, *, limit: int | None = None,
                      rate: float | None = None, concurrency: int = 4,
                      on_progress: Callable[[Progress, bool], None] | None = None) -> Progress:
    """Asks the judge about every pending turn of the window; returns the counts."""
    engine = make_sync_engine(database_url)
    try:
        turns = await asyncio.to_thread(pending_turns, engine, judge.labeler, window, limit)
        progress = Progress(total=len(turns))
        queue: asyncio.Queue[LoggedTurn] = asyncio.Queue()
        for t in turns:
            queue.put_nowait(t)
        pacer = Pacer(rate)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                turn = queue.get_nowait()
                await pacer.wait()
                try:
                    rows = await ask(client, judge, turn)
                except (JudgeError, httpx.HTTPError) as e:
                    kind = type(e).__name__
                    progress.failed += 1
                    progress.failures[kind] = progress.failures.get(kind, 0) + 1
                    log.warning("judge failed on turn %s (%s: %s); it stays for the next run", turn.turn_id, kind, e)
                else:
                    await asyncio.to_thread(write_labels, engine, rows)
                    progress.labelled += 1
                if on_progress:
                    on_progress(progress, False)

        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
        if on_progress:
            on_progress(progress, True)
        return progress
    finally:
        engine.dispose()


def label_structural(database_url: str, window: Window) -> dict[str, int]:
    """Vetoes and outcomes of the window as labels (service.store.labels.structural_labels)."""
    engine = make_sync_engine(database_url)
    try:
        return structural_labels(engine, window)
    finally:
        engine.dispose()
