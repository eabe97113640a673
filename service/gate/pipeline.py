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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from service.critic.base import CriticSlot
from service.gate import feedback, judging, recording, sampling, selection, usage
from service.gate.record import CandidateRecord, ConversationHint, TurnRecord, UpstreamFailure
from service.gate.selection import Candidate
from service.limits.spend import SpendMeter
from service.settings import RouteSettings
from service.store.base import TurnSink
from service.telemetry import metrics, spans
from service.telemetry.tracing import Tracing
from service.upstream import streaming
from service.upstream.client import UpstreamClient, UpstreamError, UpstreamStream, UpstreamWait, samples_of

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
    # Whether the store gets this turn (the route's `record` setting); decided once, by turn id.
    recorded: bool = field(init=False)

    def __post_init__(self) -> None:
        self.recorded = recording.recorded(self.route, self.turn_id)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body["messages"]

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.body.get("tools")

    @property
    def n(self) -> int:
        """Choices the client asked for (service.api.openai has checked it against the route)."""
        return int(self.body.get("n") or 1)


@dataclass
class TurnResult:
    record: TurnRecord
    chosen: Candidate
    # What the client gets, `chosen` first: one candidate, or up to the `n` the client asked for
    # (passthrough: the upstream's n choices; rank: the best that passed; shadow: the first sampled).
    choices: list[Candidate] = field(default_factory=list)
    # The usage of every call made by the time the reply left (shadow: the calls it waited for).
    billed: usage.Billed | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [self.chosen]


@dataclass
class _Clock:
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0
    critic_s: float = 0.0


def _note(record: TurnRecord, got: sampling.Sampled) -> None:
    """What came back besides candidates: the failed calls, and the tokens the calls billed."""
    record.upstream_errors.extend(UpstreamFailure.of(e.kind, e.message) for e in got.errors)
    for kind, value in (("prompt", got.prompt_tokens), ("completion", got.completion_tokens)):
        if value is not None:
            name = f"{kind}_tokens"
            setattr(record, name, (getattr(record, name) or 0) + value)
            metrics.labelled(metrics.TOKENS, record.route, kind).inc(value)


class Gate:
    def __init__(self, upstream: UpstreamClient, critics: CriticSlot, sink: TurnSink,
                 shadow_max_backlog: int = 8, tracing: Tracing | None = None, spend: SpendMeter | None = None,
                 judges: judging.JudgeDesk | None = None) -> None:
        self.upstream = upstream
        self.judges = judges or judging.JudgeDesk()  # the routes' LLM critics and their budgets
        self.spend = spend  # charged each finished turn's tokens, under its client key
        self.critics = critics
        self.sink = sink
        self.tracing = tracing  # None: no spans at all (service.telemetry.tracing)
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
        if self.tracing is None:
            return await self._run(req, record, critic)
        with self.tracing.span("turngate.turn", {
                "turngate.turn_id": record.turn_id, "turngate.route": route.alias, "turngate.mode": route.mode,
                "gen_ai.operation.name": "chat", "gen_ai.request.model": route.model}) as span:
            try:
                return await self._run(req, record, critic)
            finally:
                span.set_attributes(spans.turn_outcome(record))
                if record.error is not None:
                    self.tracing.failed(span, record.decision, record.error)

    async def _run(self, req: TurnRequest, record: TurnRecord, critic) -> TurnResult:
        route = req.route
        clock = _Clock()
        deadline = time.monotonic() + route.deadline_s
        deferred = False
        try:
            if route.mode == "passthrough":
                record.critic_name = record.critic_version = None
                choices = await self._passthrough(req, record, clock, deadline)
            elif route.mode == "shadow":
                choices, deferred = await self._shadow(req, record, clock, deadline, critic)
            else:
                choices = await self._rank(req, record, clock, deadline, critic)
            return TurnResult(record, choices[0], choices, usage.billed(record.candidates))
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
                self._hold(record, req.recorded)  # durable before the reply leaves; the scored record follows
            else:
                self._enqueue(record, req.recorded)

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
        wait = UpstreamWait()
        try:
            stream = await self.upstream.open_stream(
                route, req.body, req.client_key, max(0.001, min(route.attempt_timeout_s, deadline - time.monotonic())),
                route.attempt_timeout_s, wait)
        except BaseException as e:
            clock.upstream_s = wait.seconds(at=time.perf_counter())
            if isinstance(e, UpstreamError):
                metrics.UPSTREAM_ERRORS.labels(route.alias, e.kind).inc()
                record.decision, record.error = "error", e.message
                _note(record, sampling.Sampled(errors=[e]))
            else:
                record.decision, record.error = "cancelled", "client disconnected"
            self._finish(record, clock)
            self._enqueue(record, req.recorded)
            raise
        return Relay(self, req, record, clock, deadline, stream)

    # -- modes ------------------------------------------------------------------------------

    async def _passthrough(self, req: TurnRequest, record: TurnRecord, clock: _Clock,
                           deadline: float) -> list[Candidate]:
        # The client's `n` goes upstream as it is: one call, its choices returned in the upstream's order.
        cands = await self._sample(req, req.body, req.n, 0, record, clock, deadline, one_call=True)
        record.decision = "passthrough"
        self._choose(record, cands[0])
        return cands

    async def _shadow(self, req: TurnRequest, record: TurnRecord, clock: _Clock, deadline: float,
                      critic) -> tuple[list[Candidate], bool]:
        """Return the first call's reply (the first `n` candidates when the client asks for n) as soon
        as it is in; rank everything in the background.

        Returns the replies and whether the record is left to the background ranking to enqueue.
        When the backlog is full the turn is shed: the calls the reply needs, the record enqueued unscored.
        """
        route, n = req.route, req.n
        ranked = self.shadow_backlog < self.shadow_max_backlog
        if ranked:
            self._shadow_slot(+1)
        else:
            metrics.SHADOW_SHED.labels(route.alias).inc()
        started = time.monotonic()
        wait = UpstreamWait()
        tasks = sampling.start(self.upstream, route, req.body, route.n if ranked else n, req.client_key,
                               deadline, tracing=self.tracing, wait=wait)
        shown = 1 if route.upstream_supports_n else n  # the calls whose replies the client gets
        try:
            first = await sampling.collect(tasks[:shown], deadline, route, started)
            _note(record, first)
            if not first.samples:  # the first calls failed: fall back to those that did not
                rest = await sampling.collect(tasks[shown:], deadline, route, started)
                _note(record, rest)
                if not rest.samples:
                    raise sampling.most_telling(first.errors + rest.errors)
                first.samples = rest.samples
                tasks = []
        except BaseException:
            sampling.cancel(tasks)
            if ranked:
                self._shadow_slot(-1)
            raise
        first_in = time.monotonic()
        # The reply's calls, in: the background ones still out are not the reply's wait (unless all were).
        clock.upstream_s += wait.seconds(at=None if tasks else time.perf_counter())
        # Every sample in so far is a candidate (an n-call brings all N at once); the first n are shown.
        got = selection.from_samples(first.samples, 0, 0, route.record_logprobs)
        record.decision = "shadow"
        record.candidates.extend(c.record for c in got)
        self._choose(record, got[0])
        if ranked:
            self._spawn(self._shadow_rank(req, record, got, tasks[shown:], deadline, critic, started, first_in))
        return got[:n], ranked

    def _shadow_slot(self, change: int) -> None:
        self.shadow_backlog += change
        metrics.SHADOW_BACKLOG.inc(change)

    async def _shadow_rank(self, req: TurnRequest, record: TurnRecord, first: list[Candidate],
                           tasks: list[asyncio.Task], deadline: float, critic, started: float,
                           first_in: float) -> None:
        try:
            rest = await sampling.collect(tasks, deadline, req.route, started, first_in)
            _note(record, rest)
            cands = first + selection.from_samples(rest.samples, len(first), 0, req.route.record_logprobs)
            record.candidates = [c.record for c in cands]
            await selection.check_structure(cands, req.tools, req.body.get("tool_choice"), req.route.alias)
            spent = await self._score(critic, req, cands)
            # The cascade as it would have run, for the record: the reply (candidate 0) is out already.
            spent += await self._consult(req, record, cands, deadline)
            record.latency_critic_ms = 1000 * spent
            metrics.labelled(metrics.CANDIDATES, req.route.alias).observe(len(cands))
        except Exception:
            log.exception("shadow ranking failed for %s", record.turn_id)
        finally:
            self._shadow_slot(-1)
            self._enqueue(record, req.recorded)

    async def _rank(self, req: TurnRequest, record: TurnRecord, clock: _Clock, deadline: float,
                    critic) -> list[Candidate]:
        route, policy = req.route, req.route.policy
        body = req.body
        notes: list[str] = []
        seen: list[Candidate] = []
        chosen, decision = None, "ranked"
        choices: list[Candidate] = []
        for round_no in range(policy.max_interventions + 1):
            if round_no:
                metrics.INTERVENTIONS.labels(route.alias).inc()
                body = {**req.body, "messages": req.messages + [
                    {"role": policy.feedback_role, "content": n} for n in notes]}
            cands, early = await self._sample_round(req, body, round_no, record, clock, deadline, critic)
            # The cascade: the LLM critic's scores decide where it judged (a route without one: the encoder's).
            clock.critic_s += await self._consult(req, record, cands, deadline)
            seen += cands
            record.rounds = round_no + 1
            # The client's n: the best of this round that the gate would return on their own.
            threshold = policy.intervene_threshold
            choices = [c for c in selection.ranked(cands) if threshold is None or c.decisive_score is None
                       or c.decisive_score >= threshold][:req.n]
            if choices:
                chosen = choices[0]
                decision = "intervened" if round_no else ("accepted" if early else "ranked")
                break
            if round_no == policy.max_interventions or time.monotonic() >= deadline:
                break
            # Off the loop: the objections check each candidate against the tool schemas again.
            notes.append(await asyncio.to_thread(feedback.build, cands, req.messages, req.tools, policy.guidance))
            record.feedback.append(notes[-1])
        if chosen is None:
            return [self._exhausted(req, record, seen)]
        record.decision = decision
        self._choose(record, chosen)
        return choices

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
            accept = policy.accept_threshold  # set: first_n < n only under adaptive sampling with one
            if top is not None and top.score is not None and accept is not None and top.score >= accept:
                early = True
                record.candidates_saved += n - first_n
                metrics.CANDIDATES_SAVED.labels(route.alias).inc(n - first_n)
            elif time.monotonic() < deadline:
                more = await self._sample(req, body, n - first_n, round_no, record, clock, deadline,
                                          required=False)
                await selection.check_structure(more, req.tools, req.body.get("tool_choice"), route.alias)
                cands += more
                # Rescored together: agreement is a feature of the whole round.
                clock.critic_s += await self._score(critic, req, cands)
        return cands, early

    async def _evaluate(self, req: TurnRequest, body: dict[str, Any], cands: list[Candidate], clock: _Clock,
                        critic) -> None:
        await selection.check_structure(cands, req.tools, req.body.get("tool_choice"), req.route.alias)
        # The critic judges the candidate against the conversation the client sent, not our feedback.
        clock.critic_s += await self._score(critic, req, cands)

    async def _sample(self, req: TurnRequest, body: dict[str, Any], n: int, round_no: int,
                      record: TurnRecord, clock: _Clock, deadline: float, required: bool = True,
                      one_call: bool | None = None) -> list[Candidate]:
        started = time.monotonic()
        wait = UpstreamWait()
        if one_call:  # passthrough: the client's n, one call
            got = await sampling.one(self.upstream, req.route, body, n, req.client_key, deadline, self.tracing, wait)
        else:
            tasks = sampling.start(self.upstream, req.route, body, n, req.client_key, deadline, one_call,
                                   self.tracing, wait)
            got = await sampling.collect(tasks, deadline, req.route, started)
        # Calls given up by collect are still out: they held the turn until now.
        clock.upstream_s += wait.seconds(at=time.perf_counter())
        _note(record, got)
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
        route, mode = record.route, record.mode
        metrics.labelled(metrics.TURNS, route, mode, record.decision).inc()
        metrics.labelled(metrics.REQUEST_DURATION, route, mode).observe(total)
        metrics.labelled(metrics.OVERHEAD, route, mode).observe(max(0.0, total - clock.upstream_s - clock.critic_s))
        if record.mode != "shadow" and record.candidates:
            metrics.labelled(metrics.CANDIDATES, route).observe(len(record.candidates))

    async def _score(self, critic, req: TurnRequest, cands: list[Candidate]) -> float:
        """selection.score, in a span when tracing."""
        if self.tracing is None:
            return await selection.score(critic, req.messages, cands, req.tools, req.route.alias)
        with self.tracing.span("turngate.critic", spans.critic(critic, cands)) as span:
            spent = await selection.score(critic, req.messages, cands, req.tools, req.route.alias)
            span.set_attributes(spans.scores(cands))
            return spent

    async def _consult(self, req: TurnRequest, record: TurnRecord, cands: list[Candidate], deadline: float) -> float:
        """judging.consult (the cascade), in a span when tracing and the route has an LLM critic."""
        route = req.route
        if self.tracing is None or route.llm_critic is None:
            return await judging.consult(self.judges, route, record, req.messages, req.tools, cands, deadline)
        with self.tracing.span("turngate.cascade", {"turngate.route": route.alias,
                                                    "gen_ai.request.model": route.llm_critic.model}) as span:
            spent = await judging.consult(self.judges, route, record, req.messages, req.tools, cands, deadline)
            span.set_attributes({"turngate.decided_by": record.decided_by or "",
                                 "turngate.judge_reason": record.judge_reason or ""})
            return spent

    def _enqueue(self, record: TurnRecord, recorded: bool = True) -> None:
        """The finished turn: to the store (unless its route does not record it), and to its key's spend."""
        if record.error is None and any(not e.kind.startswith("judge_") for e in record.upstream_errors):
            metrics.labelled(metrics.TURNS_PARTIAL, record.route).inc()
        if recorded:
            with self._store_span("enqueue", record):
                try:
                    self.sink.enqueue(record)
                except Exception:
                    log.exception("could not enqueue turn %s", record.turn_id)
        else:
            metrics.labelled(metrics.TURNS_UNRECORDED, record.route).inc()
        self._charge(record)

    def _charge(self, record: TurnRecord) -> None:
        """The turn's tokens, every call's, to its client key's spend: in the background (the reply does
        not wait for Redis), and never failing the turn (the meter fails open on its own)."""
        key_id, tokens = record.conversation.key_id, (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        if self.spend is None or key_id is None or not record.conversation.charged or tokens <= 0:
            return
        self._spawn(self._charged(self.spend, key_id, tokens, record.turn_id))

    @staticmethod
    async def _charged(meter: SpendMeter, key_id: str, tokens: int, turn_id: str) -> None:
        try:
            await meter.charge(key_id, tokens)
        except Exception:
            log.exception("could not charge turn %s to its key", turn_id)

    def _hold(self, record: TurnRecord, recorded: bool = True) -> None:
        if not recorded:
            return  # its _enqueue, after the ranking, skips the store too (the same turn id decides)
        with self._store_span("hold", record):
            try:
                self.sink.hold(record)
            except Exception:  # logging must never fail a turn
                log.exception("could not journal turn %s", record.turn_id)

    def _store_span(self, how: str, record: TurnRecord) -> AbstractContextManager:
        if self.tracing is None:
            return nullcontext()
        return self.tracing.span("turngate.store", {"turngate.store.op": how, "turngate.turn_id": record.turn_id,
                                                    "turngate.candidates": len(record.candidates)})

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
            _note(record, sampling.Sampled(errors=[e]))
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
        latency = self._stream.last_in - self._stream.sent  # request written to the last piece in
        clock.upstream_s = latency
        metrics.labelled(metrics.UPSTREAM_DURATION, record.route).observe(latency)
        try:
            body = self._assembler.body()
            samples = samples_of(body, body["choices"], latency, self.headers) if body["choices"] else []
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: nesting
            log.exception("could not assemble the streamed reply of %s", record.turn_id)
            samples = []
        cands = selection.from_samples(samples, 0, 0, self._req.route.record_logprobs)
        record.candidates.extend(c.record for c in cands)
        billed = sampling.Sampled()
        billed.add_usage(samples)  # the stream's usage chunk: what the turn cost, as on every path
        _note(record, billed)
        if cands:
            self._gate._choose(record, cands[0])
        self._gate._finish(record, clock)
        self._gate._enqueue(record, self._req.recorded)
        await self._stream.aclose()  # last: a client gone may cancel what awaits here
