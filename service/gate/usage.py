"""What a turn cost: the usage of every upstream call it made, summed (docs/proxy.md, "Usage").

Each call's usage object sits on the first candidate it gave (a call asking for n choices reports one
usage for all), so summing the candidates' usage sums the calls: every candidate and every
intervention round, as the upstream bills them. Calls that failed or were given up reported no
usage and are not in the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from service.gate.record import CandidateRecord

MAX_TOKENS = 2**53  # past this a float (a counter, a budget) no longer holds every integer


def is_token_count(value: Any) -> TypeGuard[int]:
    """Whether an upstream's usage number can be counted: a non-negative integer a float holds exactly.
    Anything else (negative, 10**400, a bool, text) is not a count: counters refuse it."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS


@dataclass(frozen=True)
class Billed:
    usage: dict[str, Any] | None  # the summed usage; None when no call reported any
    candidates: int  # candidates the upstream gave (synthesized replies not counted)

    @property
    def total_tokens(self) -> int | None:
        if self.usage is None:
            return None
        total = self.usage.get("total_tokens")
        if isinstance(total, int | float) and not isinstance(total, bool):
            return int(total)
        parts = [self.usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
        return sum(int(v) for v in parts if isinstance(v, int | float) and not isinstance(v, bool))


def billed(candidates: list[CandidateRecord]) -> Billed:
    usages = [c.usage for c in candidates if isinstance(c.usage, dict)]
    return Billed(merge(usages) if usages else None,
                  sum(1 for c in candidates if c.upstream_latency_ms is not None))


def merge(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers added up (token counts, and a vendor's `cost`), objects merged the same way (the
    *_details), anything else (a flag, a string) as the first usage that has it says."""
    out: dict[str, Any] = {}
    for usage in usages:
        for key, value in usage.items():
            have = out.get(key)
            if _is_number(value) and (have is None or _is_number(have)):
                out[key] = (have or 0) + value
            elif isinstance(value, dict) and (have is None or isinstance(have, dict)):
                out[key] = merge([have, value]) if have is not None else merge([value])
            elif key not in out or have is None:
                out[key] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
