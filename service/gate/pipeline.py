"""The per-turn pipeline: sample, check, score, select, intervene; then hand the record to the store.

Decisions (the x-turngate-decision header and the record's `decision`):
  passthrough      mode passthrough: the single upstream reply, unscored (streamed as it comes: Gate.relay)
  shadow           mode shadow: candidate 0 returned unchanged, all scored in the background
  ranked           best of the candidates, by structural checks then critic score
  accepted         adaptive sampling stopped early: a candidate reached accept_threshold
  intervened       the critic rejected a round, fed back to the actor, and a later round passed
  below_threshold  no round passed intervene_threshold; the best candidate returned (on_exhausted=best)
  all_vetoed       every candidate failed the structural checks; the actor's first reply returned
  blocked          no round passed; the route's safe message returned (on_exhausted=block)
  rejected         no round passed; the client got a turn_rejected error (on_exhausted=error)
  error            the upstream failed every attempt
  cancelled        the client went away before the reply
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from service.critic.base import CriticSlot
from service.gate import feedback, sampling, selection
from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, UpstreamFailure
from service.gate.selection import Candidate
from service.settings import RouteSettings
from service.store.base import TurnSink
from service.telemetry import metrics
from service.upstream import streaming
from service.upstream.client import UpstreamClient, UpstreamError, UpstreamStream, samples_of

log = logging.getLogger(__name__)


class TurnRejected(Exception):
    """on_exhausted=error: no candidate was good enough and the route asks for an error."""

    def __init__(self, record: TurnRecord, message: str) -> None:
        super().__init__(message)
        self.record = record
        self.message = message


@dataclass
class TurnRequest:
    turn_id: str
    route: RouteSettings
    body: dict[str, Any]  # the client's request, as sent (model alias included)
    client_key: str | None = None
    conversation: ConversationHint = field(default_factory=ConversationHint)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body["messages"]

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.body.get("tools")


@dataclass
class TurnResult:
    record: TurnRecord
    chosen: Candidate


@dataclass
class _Clock:
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0
    critic_s: float = 0.0


def _note(record: TurnRecord, errors: list[UpstreamError]) -> None:
    record.upstream_errors.extend(UpstreamFailure.of(e.kind, e.message) for e in errors)


class Gate:
    def __init__(self, upstream: UpstreamClient, critics: CriticSlot, sink: TurnSink,
                 shadow_max_backlog: int = 8) -> None:
        self.upstream = upstream
        self.critics = critics
        self.sink = sink
        # Shadow turns whose other candidates are still being sampled or scored, at most this many:
        # beyond it a shadow turn is shed (one call, recorded unscored), so background work cannot
        # grow with the load and take the CPU the replies need.
        self.shadow_max_backlog = shadow_max_backlog
        self.shadow_backlog = 0
        self._background: set[asyncio.Task] = set()

    async def run(self, req: TurnRequest) -> TurnResult:
        route = req.route
        critic = self.critics.current  # one critic for the whole turn, even across a hot swap
        record = self._new_record(req, critic)
        clock = _Clock()
        deadline = time.monotonic() + route.deadline_s
        deferred = False
        try:
            if route.mode == "passthrough":
                record.critic_name = record.critic_version = None
                chosen = await self._passthrough(req, record, clock, deadline)
            elif route.mode == "shadow":
                chosen, deferred = await self._shadow(req, record, clock, deadline, critic)
            else:
                chosen = await self._rank(req, record, clock, deadline, critic)
            return TurnResult(record, chosen)
        except asyncio.CancelledError:
            record.decision, record.error = "cancelled", "client disconnected"
            raise
        except UpstreamError as e:
            record.decision, record.error = "error", e.message
            raise
        except TurnRejected as e:
            record.error = e.message
            raise
        finally:
            self._finish(record, clock)
            if deferred:
                self._hold(record)  # durable before the reply leaves; the scored record follows
            else:
                self._enqueue(record)

    def _new_record(self, req: TurnRequest, critic) -> TurnRecord:
        route = req.route
        return TurnRecord(turn_id=req.turn_id, route=route.alias, mode=route.mode,
                          upstream_model=route.model, request_messages=req.messages, tools=req.tools,
                          conversation=req.conversation, critic_name=critic.name if critic else None,
                          critic_version=critic.version if critic else None)

    async def relay(self, req: TurnRequest) -> Relay:
        """A passthrough turn streamed: the upstream's call is open (its status and headers in) when
        this returns; its events follow from Relay.events. Failures before that raise, recorded."""
        route = req.route
        record = self._new_record(req, None)
        clock = _Clock()
        deadline = time.monotonic() + route.deadline_s
        try:
            stream = await self.upstream.open_stream(
                route, req.body, req.client_key, max(0.001, min(route.attempt_timeout_s, deadline - time.monotonic())),
                route.attempt_timeout_s)
        except BaseException as e:
            clock.upstream_s = time.perf_counter() - clock.started
            if isinstance(e, UpstreamError):
                metrics.UPSTREAM_ERRORS.labels(route.alias, e.kind).inc()
                record.decision, record.error = "error", e.message
                _note(record, [e])
            else:
                record.decision, record.error = "cancelled", "client disconnected"
            self._finish(record, clock)
            self._enqueue(record)
            raise
        return Relay(self, req, record, clock, deadline, stream)

    # -- modes ------------------------------------------------------------------------------

    async def _passthrough(self, req: TurnRequest, record: TurnRecord, clock: _Clock,
                           deadline: float) -> Candidate:
        cands = await self._sample(req, req.body, 1, 0, record, clock, deadline)
        record.decision = "passthrough"
        return self._choose(record, cands[0])

    async def _shadow(self, req: TurnRequest, record: TurnRecord, clock: _Clock, deadline: float,
                      critic) -> tuple[Candidate, bool]:
        """Return the first call's reply as soon as it is in; rank everything in the background.

        Returns the reply and whether the record is left to the background ranking to enqueue.
        When the backlog is full the turn is shed: one upstream call, the record enqueued unscored.
        """
        route = req.route
        ranked = self.shadow_backlog < self.shadow_max_backlog
        if ranked:
            self._shadow_slot(+1)
        else:
            metrics.SHADOW_SHED.labels(route.alias).inc()
        started = time.monotonic()
        tasks = sampling.start(self.upstream, route, req.body, route.n if ranked else 1, req.client_key,
                               deadline)
        t0 = time.perf_counter()
        try:
            first = await sampling.collect(tasks[:1], deadline, route, started)
            _note(record, first.errors)
            if not first.samples:  # the first call failed: fall back to the first that did not
                rest = await sampling.collect(tasks[1:], deadline, route, started)
                _note(record, rest.errors)
                if not rest.samples:
                    raise sampling.most_telling(first.errors + rest.errors)
                first.samples = rest.samples[:1]
                tasks = []
        except BaseException:
            sampling.cancel(tasks)
            if ranked:
                self._shadow_slot(-1)
            raise
        first_in = time.monotonic()
        clock.upstream_s += time.perf_counter() - t0
        chosen = selection.from_samples(first.samples[:1], 0, 0, route.record_logprobs)[0]
        record.decision = "shadow"
        record.candidates.append(chosen.record)
        self._choose(record, chosen)
        if ranked:
            self._spawn(self._shadow_rank(req, record, chosen, tasks[1:], deadline, critic, started, first_in))
        return chosen, ranked

    def _shadow_slot(self, change: int) -> None:
        self.shadow_backlog += change
        metrics.SHADOW_BACKLOG.inc(change)

    async def _shadow_rank(self, req: TurnRequest, record: TurnRecord, first: Candidate,
                           tasks: list[asyncio.Task], deadline: float, critic, started: float,
                           first_in: float) -> None:
        try:
            rest = await sampling.collect(tasks, deadline, req.route, started, first_in)
            _note(record, rest.errors)
            cands = [first] + selection.from_samples(rest.samples, 1, 0, req.route.record_logprobs)
            record.candidates = [c.record for c in cands]
            await selection.check_structure(cands, req.tools, req.body.get("tool_choice"), req.route.alias)
            record.latency_critic_ms = 1000 * await selection.score(critic, req.messages, cands, req.tools,
                                                                    req.route.alias)
            metrics.CANDIDATES.labels(req.route.alias).observe(len(cands))
        except Exception:  # noqa: BLE001 - the client already has its reply; keep the record
            log.exception("shadow ranking failed for %s", record.turn_id)
        finally:
            self._shadow_slot(-1)
            self._enqueue(record)

    async def _rank(self, req: TurnRequest, record: TurnRecord, clock: _Clock, deadline: float,
                    critic) -> Candidate:
        route, policy = req.route, req.route.policy
        body = req.body
        notes: list[str] = []
        seen: list[Candidate] = []
        chosen, decision = None, "ranked"
        for round_no in range(policy.max_interventions + 1):
            if round_no:
                metrics.INTERVENTIONS.labels(route.alias).inc()
                body = {**req.body, "messages": req.messages + [
                    {"role": policy.feedback_role, "content": n} for n in notes]}
            cands, early = await self._sample_round(req, body, round_no, record, clock, deadline, critic)
            seen += cands
            record.rounds = round_no + 1
            top = selection.best(cands)
            passed = top is not None and (policy.intervene_threshold is None or top.score is None
                                          or top.score >= policy.intervene_threshold)
            if passed:
                chosen = top
                decision = "intervened" if round_no else ("accepted" if early else "ranked")
                break
            if round_no == policy.max_interventions or time.monotonic() >= deadline:
                break
            notes.append(feedback.build(cands, req.messages, req.tools, policy.guidance))
            record.feedback.append(notes[-1])
        if chosen is None:
            return self._exhausted(req, record, seen)
        record.decision = decision
        return self._choose(record, chosen)

    async def _sample_round(self, req: TurnRequest, body: dict[str, Any], round_no: int, record: TurnRecord,
                            clock: _Clock, deadline: float, critic) -> tuple[list[Candidate], bool]:
        """Sample, check and score one round; adaptive sampling may stop after the first k0."""
        route, policy = req.route, req.route.policy
        n = route.n
        first_n = n
        if policy.sampling == "adaptive" and policy.accept_threshold is not None:
            first_n = min(policy.initial_candidates, n)
        cands = await self._sample(req, body, first_n, round_no, record, clock, deadline)
        await self._evaluate(req, body, cands, clock, critic)
        early = False
        if first_n < n:
            top = selection.best(cands)
            if top is not None and top.score is not None and top.score >= policy.accept_threshold:
                early = True
                record.candidates_saved += n - first_n
                metrics.CANDIDATES_SAVED.labels(route.alias).inc(n - first_n)
            elif time.monotonic() < deadline:
                more = await self._sample(req, body, n - first_n, round_no, record, clock, deadline,
                                          required=False)
                await selection.check_structure(more, req.tools, req.body.get("tool_choice"), route.alias)
                cands += more
                # Rescored together: agreement is a feature of the whole round.
                clock.critic_s += await selection.score(critic, req.messages, cands, req.tools, route.alias)
        return cands, early

    async def _evaluate(self, req: TurnRequest, body: dict[str, Any], cands: list[Candidate], clock: _Clock,
                        critic) -> None:
        await selection.check_structure(cands, req.tools, req.body.get("tool_choice"), req.route.alias)
        # The critic judges the candidate against the conversation the client sent, not our feedback.
        clock.critic_s += await selection.score(critic, req.messages, cands, req.tools, req.route.alias)

    async def _sample(self, req: TurnRequest, body: dict[str, Any], n: int, round_no: int,
                      record: TurnRecord, clock: _Clock, deadline: float, required: bool = True
                      ) -> list[Candidate]:
        t0 = time.perf_counter()
        started = time.monotonic()
        tasks = sampling.start(self.upstream, req.route, body, n, req.client_key, deadline)
        got = await sampling.collect(tasks, deadline, req.route, started)
        clock.upstream_s += time.perf_counter() - t0
        _note(record, got.errors)
        if not got.samples and required and not record.candidates:
            raise sampling.most_telling(got.errors)
        cands = selection.from_samples(got.samples, len(record.candidates), round_no, req.route.record_logprobs)
        record.candidates.extend(c.record for c in cands)
        return cands

    # -- outcome ----------------------------------------------------------------------------

    def _exhausted(self, req: TurnRequest, record: TurnRecord, seen: list[Candidate]) -> Candidate:
        policy = req.route.policy
        if policy.on_exhausted == "error":
            record.decision = "rejected"
            raise TurnRejected(record, "no candidate reply passed the critic; the turn needs a human")
        if policy.on_exhausted == "block":
            record.decision = "blocked"
            msg = {"role": "assistant", "content": policy.block_message}
            blocked = CandidateRecord(index=len(record.candidates), round=record.rounds - 1, message=msg,
                                      finish_reason="stop")
            record.candidates.append(blocked)
            return self._choose(record, Candidate(blocked, None))
        top = selection.best(seen)
        if top is not None:
            record.decision = "below_threshold"
        else:
            record.decision = "all_vetoed"  # nothing valid: hand back the actor's own first reply
            top = seen[0]
        return self._choose(record, top)

    def _choose(self, record: TurnRecord, chosen: Candidate) -> Candidate:
        record.chosen_index = chosen.record.index
        return chosen

    def _finish(self, record: TurnRecord, clock: _Clock) -> None:
        total = time.perf_counter() - clock.started
        record.latency_total_ms = total * 1000
        record.latency_upstream_ms = clock.upstream_s * 1000
        if record.mode != "shadow":
            record.latency_critic_ms = clock.critic_s * 1000
        prompt = [c.prompt_tokens for c in record.candidates if c.prompt_tokens is not None]
        completion = [c.completion_tokens for c in record.candidates if c.completion_tokens is not None]
        record.prompt_tokens = sum(prompt) if prompt else None
        record.completion_tokens = sum(completion) if completion else None
        route, mode = record.route, record.mode
        metrics.TURNS.labels(route, mode, record.decision).inc()
        metrics.REQUEST_DURATION.labels(route, mode).observe(total)
        metrics.OVERHEAD.labels(route, mode).observe(max(0.0, total - clock.upstream_s - clock.critic_s))
        if record.mode != "shadow" and record.candidates:
            metrics.CANDIDATES.labels(route).observe(len(record.candidates))
        for kind, value in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens)):
            if value:
                metrics.TOKENS.labels(route, kind).inc(value)

    def _enqueue(self, record: TurnRecord) -> None:
        if record.upstream_errors and record.error is None:
            metrics.TURNS_PARTIAL.labels(record.route).inc()
        try:
            self.sink.enqueue(record)
        except Exception:  # noqa: BLE001 - logging must never fail a turn
            log.exception("could not enqueue turn %s", record.turn_id)

    def _hold(self, record: TurnRecord) -> None:
        try:
            self.sink.hold(record)
        except Exception:  # logging must never fail a turn
            log.exception("could not journal turn %s", record.turn_id)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float = 10.0) -> None:
        """Let background work (shadow ranking) finish so its records reach the store."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)


class Relay:
    """A passthrough turn streamed as the upstream sends it (Gate.relay): forward `headers`, then
    iterate `events()`. The turn is recorded, with the reply its chunks add up to, once the stream
    ended, failed or was left; `aclose` (idempotent) does it when events() never ran."""

    def __init__(self, gate: Gate, req: TurnRequest, record: TurnRecord, clock: _Clock, deadline: float,
                 stream: UpstreamStream) -> None:
        self.record = record
        self.headers = stream.headers
        self._gate, self._req, self._clock, self._deadline, self._stream = gate, req, clock, deadline, stream
        self._assembler = streaming.Assembler()
        self._closed = False

    async def events(self) -> AsyncIterator[streaming.Event]:
        record = self.record
        try:
            async for event in self._stream.events(self._deadline):
                self._assembler.add(event.data)
                yield event
            record.decision = "passthrough"
        except UpstreamError as e:
            metrics.UPSTREAM_ERRORS.labels(record.route, e.kind).inc()
            record.decision, record.error = "error", e.message
            _note(record, [e])
            raise
        except Exception as e:
            record.decision, record.error = "error", f"relaying the stream failed: {e!r}"[:500]
            raise
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        record, clock = self.record, self._clock
        if record.decision == "error" and record.error is None:  # neither ended nor failed: left
            record.decision, record.error = "cancelled", "client disconnected"
        latency = time.perf_counter() - self._stream.started
        clock.upstream_s = time.perf_counter() - clock.started
        metrics.UPSTREAM_DURATION.labels(record.route).observe(latency)
        try:
            body = self._assembler.body()
            samples = samples_of(body, body["choices"], latency, self.headers) if body["choices"] else []
        except (ValueError, KeyError, TypeError, AttributeError):
            log.exception("could not assemble the streamed reply of %s", record.turn_id)
            samples = []
        cands = selection.from_samples(samples, 0, 0, self._req.route.record_logprobs)
        record.candidates.extend(c.record for c in cands)
        if cands:
            self._gate._choose(record, cands[0])
        self._gate._finish(record, clock)
        self._gate._enqueue(record)
        await self._stream.aclose()  # last: a client gone may cancel what awaits here
