"""Candidates of a turn: structural verdicts, critic scores, and picking the best.

Selection is: structural veto first, then the highest critic score; ties go to the earlier
candidate (the actor's own first choice). Where the cascade asked the LLM critic about a round
(service/gate/judging.py), its scores are the ones that rank and meet the thresholds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from service.critic.base import Critic, assess
from service.gate import structural
from service.gate.record import CandidateRecord
from service.telemetry import metrics
from service.upstream.client import Sample

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    record: CandidateRecord
    sample: Sample | None  # None for a synthesized reply (block policy)

    @property
    def ok(self) -> bool:
        return self.record.verdict == "ok"

    @property
    def score(self) -> float | None:
        return self.record.score

    @property
    def decisive_score(self) -> float | None:
        """The score that ranks it and meets the thresholds: the LLM critic's where it judged, else the encoder's."""
        judged = self.record.judge_score
        return judged if judged is not None else self.record.score


def from_samples(samples: list[Sample], first_index: int, round_no: int,
                 keep_logprobs: bool = False) -> list[Candidate]:
    return [Candidate(CandidateRecord(
        index=first_index + i, round=round_no, message=s.message, finish_reason=s.finish_reason,
        upstream_latency_ms=s.latency_s * 1000, prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens, usage=s.usage,
        logprobs=s.logprobs if keep_logprobs else None, upstream_request_id=s.request_id), s)
        for i, s in enumerate(samples)]


async def check_structure(cands: list[Candidate], tools: list[dict[str, Any]] | None, tool_choice: Any,
                          route: str) -> None:
    schemas = structural.tool_schemas(tools)
    verdicts = await structural.check_all([(c.record.message, c.record.finish_reason) for c in cands],
                                          schemas, tool_choice, structural.custom_tools(tools))
    for c, verdict in zip(cands, verdicts, strict=True):
        if not verdict.ok:
            c.record.verdict, c.record.veto_reason, c.record.veto_detail = "veto", verdict.reason, verdict.detail
            metrics.VETOES.labels(route, verdict.reason).inc()
        elif verdict.reason:
            metrics.SCHEMA_UNCHECKED.labels(route, verdict.reason).inc()


async def score(critic: Critic, messages: list[dict[str, Any]], cands: list[Candidate],
                tools: list[dict[str, Any]] | None, route: str) -> float:
    """Scores the candidates; returns seconds spent. Skipped when all were vetoed.

    Every candidate is assessed, the vetoed ones too: they are samples of the same turn, and the
    critic's agreement features count them. Only those that passed can be chosen (``best``).
    A failing critic must not fail the turn: the structural verdicts still choose.
    """
    if not any(c.ok for c in cands):
        return 0.0
    started = time.perf_counter()
    try:
        found = await assess(critic, messages, [c.record.message for c in cands], tools, [c.ok for c in cands])
    except Exception:
        log.exception("critic %s failed; selecting on structural checks only", critic.name)
        metrics.CRITIC_FAILURES.labels(route).inc()
        return time.perf_counter() - started
    for c, a in zip(cands, found, strict=True):
        c.record.score, c.record.features, c.record.contributions = float(a.score), a.features, a.contributions
        if c.ok:
            metrics.SCORES.labels(route).observe(float(a.score))
    return time.perf_counter() - started


def ranked(cands: list[Candidate]) -> list[Candidate]:
    """The candidates that passed the structural checks, best (decisive) score first; ties keep sampling
    order (the actor's own first choice first)."""
    return sorted((c for c in cands if c.ok), key=lambda c: -1.0 if c.decisive_score is None else -c.decisive_score)


def best(cands: list[Candidate]) -> Candidate | None:
    top = ranked(cands)
    return top[0] if top else None
