"""The cascade in the gate: after the encoder critic scored a round, ask the route's LLM critic when
the encoder is unsure (service/gate/cascade.py's `doubt`) and the route's budget allows; its scores
then rank the round's candidates and meet the policy's thresholds (Candidate.decisive_score).

The budget is per route and per process: at most `max_share` of the route's last WINDOW_RANKINGS
rankings judged, and at most `max_tokens_per_hour` judge tokens over the last hour. Several
replicas each keep their own; the share holds on each, the token cap is per replica.

A judge that fails, answers late or answers garbage leaves the encoder's pick: the round is
decided by the encoder, the failure is noted on the record (upstream_errors, kind
"judge_<outcome>"), and the turn waits at most the critic's timeout_s (or what is left of the
turn's deadline, when less).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from service.critic.llm_critic import JudgeError, Judgement, LLMCritic
from service.gate import selection
from service.gate.cascade import Doubt, doubt, same_reply, writes
from service.gate.record import CandidateRecord, TurnRecord, UpstreamFailure
from service.gate.selection import Candidate
from service.settings import CascadeSettings, LLMCriticSettings, RouteSettings
from service.telemetry import metrics

log = logging.getLogger(__name__)

WINDOW_RANKINGS = 1000  # the sliding window max_share counts over: the route's last rankings
HOUR_S = 3600.0


def top_agreement(c: CandidateRecord) -> float | None:
    """The `agreement` doubt() takes: the share of the turn's candidates making the very same calls as
    `c` (its call_support feature, where the critic explains its scores); None for a text reply, a lone
    candidate or a critic without features."""
    f = c.features
    if not isinstance(f, dict) or not (c.message or {}).get("tool_calls") or f.get("alone"):
        return None
    value = f.get("call_support")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def round_doubt(messages: Sequence[dict[str, Any]], scores: Sequence[float | None],
                feats: Sequence[dict[str, Any] | None], cfg: CascadeSettings) -> tuple[Doubt | None, int]:
    """The cascade's doubt over one round's candidates that passed the structural checks: (why, the
    encoder's top pick). `doubt` with the replies, so the margin is to the best *other* reply, as
    `turngate replay` asks it (service/gate/replay_cascade.py). A missing encoder score counts as 0."""
    if not messages:
        return None, 0
    vals = [s if s is not None else 0.0 for s in scores]
    top = max(range(len(vals)), key=lambda i: (vals[i], -i))  # the first of the best, as selection.ranked
    f = feats[top]
    agreement = top_agreement(CandidateRecord(index=top, round=0, message=messages[top],
                                              features=f if isinstance(f, dict) else None))
    return doubt(vals, top, agreement, writes(messages[top]), cfg, list(messages)), top


class CascadeBudget:
    """One route's judge budget in this process: the share of rankings judged over a sliding window,
    and the judge tokens spent over the last hour."""

    def __init__(self, window: int = WINDOW_RANKINGS, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._judged: deque[bool] = deque()
        self._count = 0  # True entries in _judged
        self._spent: deque[tuple[float, int]] = deque()
        self._spent_total = 0
        self._clock = clock

    def _note(self, judged: bool) -> None:
        self._judged.append(judged)
        self._count += judged
        if len(self._judged) > self._window:
            self._count -= self._judged.popleft()

    def sure(self) -> None:
        """A ranking the encoder decided alone: it counts in the share's denominator."""
        self._note(False)

    def admit(self, cfg: CascadeSettings) -> bool:
        """An unsure ranking: may the judge be asked? While the judged share of the window, this ranking
        included, stays within max_share (as `turngate replay` counts it). Counted either way."""
        ok = self._count + 1 <= cfg.max_share * (len(self._judged) + 1) + 1e-9 and (
            cfg.max_tokens_per_hour is None or self.tokens_last_hour() < cfg.max_tokens_per_hour)
        self._note(ok)
        return ok

    def spend(self, tokens: int) -> None:
        if tokens > 0:
            self._spent.append((self._clock(), tokens))
            self._spent_total += tokens

    def tokens_last_hour(self) -> int:
        cutoff = self._clock() - HOUR_S
        while self._spent and self._spent[0][0] <= cutoff:
            self._spent_total -= self._spent.popleft()[1]
        return self._spent_total

    @property
    def share(self) -> float:
        """The share of the window's rankings that were judged."""
        return self._count / len(self._judged) if self._judged else 0.0


class JudgeDesk:
    """The gate's LLM critics (one per route's settings, rebuilt when a route changes), their HTTP
    client (made on first use) and the routes' budgets."""

    def __init__(self, http: httpx.AsyncClient | None = None) -> None:
        self._http = http
        self._critics: dict[str, tuple[LLMCriticSettings, LLMCritic]] = {}
        self.budgets: dict[str, CascadeBudget] = {}

    def critic(self, route: RouteSettings) -> LLMCritic | None:
        cfg = route.llm_critic
        if cfg is None:
            return None
        held = self._critics.get(route.alias)
        if held is None or held[0] != cfg:
            if self._http is None:
                self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=64), trust_env=False)
            held = self._critics[route.alias] = (cfg, LLMCritic(cfg, self._http, route.alias))
        return held[1]

    def budget(self, alias: str) -> CascadeBudget:
        got = self.budgets.get(alias)
        if got is None:
            got = self.budgets[alias] = CascadeBudget()
        return got

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


async def consult(desk: JudgeDesk, route: RouteSettings, record: TurnRecord, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None, cands: list[Candidate], deadline: float) -> float:
    """The cascade for one scored round: sets the record's decided_by ("encoder" on a route without an
    LLM critic; None when no candidate passed the structural checks), judge_reason and critics_agreed,
    and the judged candidates' judge_score and judge_reason.
    Returns the seconds spent waiting on the judge. Never raises but for cancellation."""
    passed = selection.ranked(cands)  # encoder order: the round is not judged yet
    record.decided_by, record.judge_reason, record.critics_agreed = ("encoder" if passed else None), None, None
    critic = desk.critic(route)
    if critic is None or not passed:
        return 0.0
    why, at = round_doubt([c.record.message for c in passed], [c.score for c in passed],
                          [c.record.features for c in passed], route.cascade)
    top = passed[at]
    budget = desk.budget(route.alias)
    if why is None:
        budget.sure()
        metrics.CASCADE.labels(route.alias, "encoder_sure").inc()
        return 0.0
    if not budget.admit(route.cascade):
        metrics.CASCADE.labels(route.alias, "over_budget").inc()
        return 0.0
    metrics.CASCADE.labels(route.alias, "judged").inc()
    started = time.perf_counter()
    timeout = max(0.001, min(critic.settings.timeout_s, deadline - time.monotonic()))
    try:
        got: Judgement = await critic.judge(messages, [c.record.message for c in passed], tools, timeout)
    except JudgeError as e:
        _spent(budget, record, e.prompt_tokens, e.completion_tokens)
        record.upstream_errors.append(UpstreamFailure.of(f"judge_{e.kind}", f"LLM critic: {e.message}"))
        return time.perf_counter() - started
    except Exception as e:  # a bug here must not fail the turn: the encoder's pick stands
        log.exception("the LLM critic of route %s failed", route.alias)
        record.upstream_errors.append(UpstreamFailure.of("judge_error", f"LLM critic: {type(e).__name__}"))
        return time.perf_counter() - started
    _spent(budget, record, got.prompt_tokens, got.completion_tokens)
    for c, j in zip(passed, got.candidates, strict=True):
        c.record.judge_score, c.record.judge_reason = j.score, j.reason
    record.decided_by, record.judge_reason = "llm", why
    # Agreed: the judge's pick is the encoder's reply (a sample identical to it counts as the same).
    record.critics_agreed = same_reply(selection.ranked(cands)[0].record.message, top.record.message)
    return time.perf_counter() - started


def _spent(budget: CascadeBudget, record: TurnRecord, prompt_tokens: int, completion_tokens: int) -> None:
    budget.spend(prompt_tokens + completion_tokens)
    record.judge_prompt_tokens = (record.judge_prompt_tokens or 0) + prompt_tokens
    record.judge_completion_tokens = (record.judge_completion_tokens or 0) + completion_tokens
