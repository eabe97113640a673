"""Merges the critic inputs of concurrent turns into one inference run, and splits the results.

Small runs waste the device: on 2 CPU cores 8 sequences of 64 tokens cost 2.5 ms each in one run
and 4.2 ms one at a time. A turn's rows are padded to the widest row of the merged batch;
attention ignores the padding, so a turn's scores do not depend on what it was batched with.
A run holds at most ``max_batch`` rows and, when ``max_tokens`` is set, at most that many padded
tokens (rows x widest row): on a CPU, runs of 4,096 tokens and more cost up to 35% more per
sequence than runs of 512-2,048 (``bench/critic_profile.py``), so a larger turn is split.

Waiting is bounded from the OLDEST waiting turn: a turn on an idle critic waits at most
``max_wait_s`` for company, and a turn that queued behind a busy run has already waited longer
than that, so backlogged turns are dispatched at once, up to the caps. It waits only for turns
announced with ``expect()`` (the caller is tokenizing them): with none on the way a lone turn
runs at once instead of paying the wait. One dispatch per free inference worker: while all
workers are busy, turns accumulate into the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.telemetry import metrics

Feed = dict[str, np.ndarray]
RunFn = Callable[[Feed], np.ndarray]  # blocking: one inference run, a float per row


@dataclass
class _Job:
    feed: Feed
    rows: int
    width: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class _LoopState:
    """The queue and collector of one event loop (the CLI and tests may use several in turn)."""

    def __init__(self, workers: int) -> None:
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.slots = asyncio.Semaphore(workers)
        self.collector: asyncio.Task | None = None
        self.carry: _Job | None = None  # a job that did not fit the previous batch
        self.expected = 0  # turns announced by expect() and not yet submitted
        self.runs: set[asyncio.Task] = set()


class MicroBatcher:
    def __init__(self, run: RunFn, executor: Executor, workers: int, *, pad_ids: dict[str, int],
                 max_batch: int = 64, max_tokens: int | None = None, max_wait_s: float = 0.002) -> None:
        self._run, self._executor, self._workers = run, executor, workers
        self._pad = pad_ids
        self.max_batch, self.max_tokens, self.max_wait_s = max_batch, max_tokens, max_wait_s
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()
        self._closed = False

    def expect(self) -> Callable[[], None]:
        """Announces a turn about to be submitted (call from the loop, before tokenizing it), so
        that a batch being gathered waits for it; returns the callback that withdraws the notice,
        to call once it is submitted or given up."""
        state = self._state(asyncio.get_running_loop())
        state.expected += 1
        done = False

        def withdraw() -> None:
            nonlocal done
            if not done:
                done, state.expected = True, state.expected - 1
        return withdraw

    def fits(self, rows: int, width: int) -> bool:
        """Whether ``rows`` rows padded to ``width`` tokens stay within the caps of one run."""
        return rows <= self.max_batch and (self.max_tokens is None or rows * width <= self.max_tokens)

    async def submit(self, feed: Feed) -> np.ndarray:
        """Scores for the rows of ``feed``; a feed over the caps is run in slices that fit (one
        row at least, however wide)."""
        if self._closed:
            raise RuntimeError("critic is closed")
        rows, width = feed["input_ids"].shape
        if rows == 0:
            return np.zeros(0, dtype=np.float32)
        if not self.fits(rows, width):
            step = min(self.max_batch, max(1, self.max_tokens // width)) if self.max_tokens else self.max_batch
            parts = [self.submit({k: v[i:i + step] for k, v in feed.items()}) for i in range(0, rows, step)]
            return np.concatenate(await asyncio.gather(*parts))
        loop = asyncio.get_running_loop()
        state = self._state(loop)
        job = _Job(feed, rows, width, loop.create_future())
        state.queue.put_nowait(job)
        return await job.future

    def _state(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState(self._workers)
        if state.collector is None or state.collector.done():
            state.collector = loop.create_task(self._collect(state), name="critic-batcher")
        return state

    async def _next(self, state: _LoopState, timeout: float | None) -> _Job | None:
        while True:
            if state.carry is not None:
                job, state.carry = state.carry, None
            elif timeout is None:
                job = await state.queue.get()
            elif not state.queue.empty():
                job = state.queue.get_nowait()
            elif timeout <= 0 or state.expected == 0:  # nobody is coming: do not wait
                return None
            else:
                try:
                    job = await asyncio.wait_for(state.queue.get(), timeout)
                except TimeoutError:
                    return None
            if not job.future.done():  # a cancelled turn (client gone) costs no inference
                return job

    async def _collect(self, state: _LoopState) -> None:
        try:
            await self._gather_forever(state)
        finally:  # closed (or the loop is ending): nobody will run what is still queued
            stranded = [state.carry] if state.carry else []
            state.carry = None
            while not state.queue.empty():
                stranded.append(state.queue.get_nowait())
            for job in stranded:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("critic is closed"))

    async def _gather_forever(self, state: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await state.slots.acquire()
            try:
                first = await self._next(state, None)
            except BaseException:
                state.slots.release()
                raise
            assert first is not None  # without a timeout _next waits for a job
            batch, rows, width = [first], first.rows, first.width
            deadline = first.queued_at + self.max_wait_s
            while self.fits(rows + 1, width):
                job = await self._next(state, deadline - time.perf_counter())
                if job is None:
                    break
                if not self.fits(rows + job.rows, max(width, job.width)):
                    state.carry = job
                    break
                batch.append(job)
                rows, width = rows + job.rows, max(width, job.width)
            task = loop.create_task(self._dispatch(state, batch))
            state.runs.add(task)
            task.add_done_callback(state.runs.discard)

    async def _dispatch(self, state: _LoopState, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            feed = merge([j.feed for j in batch], self._pad)
            started = time.perf_counter()
            scores = await loop.run_in_executor(self._executor, self._run, feed)
            metrics.CRITIC_DURATION.observe(time.perf_counter() - started)
            metrics.CRITIC_BATCH.observe(len(feed["input_ids"]))
            at = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(scores[at:at + job.rows])
                at += job.rows
        except Exception as e:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
        finally:
            state.slots.release()

    def close(self) -> None:
        """Refuse new work and stop the collectors (runs in flight finish)."""
        self._closed = True
        for state in list(self._states.values()):
            if state.collector is not None and not state.collector.done():
                with contextlib.suppress(RuntimeError):  # that loop is already closed
                    state.collector.get_loop().call_soon_threadsafe(state.collector.cancel)


def merge(feeds: list[Feed], pad: dict[str, int]) -> Feed:
    """Stacks the feeds row-wise, right-padding each to the widest (``pad``: fill per input)."""
    if len(feeds) == 1:
        return feeds[0]
    width = max(f["input_ids"].shape[1] for f in feeds)
    rows = sum(f["input_ids"].shape[0] for f in feeds)
    out = {}
    for name in feeds[0]:
        arr = np.full((rows, width), pad.get(name, 0), dtype=feeds[0][name].dtype)
        at = 0
        for f in feeds:
            part = f[name]
            arr[at:at + len(part), :part.shape[1]] = part
            at += len(part)
        out[name] = arr
    return out
