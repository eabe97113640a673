"""Token spend per client key: a sliding window for tokens-per-minute limits, and a running total
per budget period (calendar day and calendar month, UTC) for token budgets.

Spend is what the upstream bills: the prompt and completion tokens of every call of a turn, every
candidate and every intervention round (TurnRecord.prompt_tokens + completion_tokens). A turn is
charged when its record is complete (service.gate.pipeline, off the reply's path), so a check made
before a request sees the turns that finished, not those in flight: a budget can be overshot by the
turns running when it ran out.

In-process by default (one replica). With TURNGATE_REDIS_URL the counters live in Redis under
`turngate:spend:...`, each with a TTL, so every replica reads and adds to the same spend. As the
request limiter does (service.limits.ratelimit), a Redis failure lets requests through and is
counted (turngate_redis_errors_total{op="spend"}) with one warning per interval: an outage of the
meter must not become an outage of the agents behind it.

Every charge adds to both the day and the month counters, so a key's budget period can change
without losing what was spent. The one-minute window is `slots` buckets (5 s each by default):
a token leaves the window between window_s - window_s/slots and window_s after it was charged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from service.control.key_policy import BudgetPeriod, KeyPolicy
from service.limits.ratelimit import limits_redis
from service.telemetry import metrics
from service.telemetry.throttled import ThrottledWarning

log = logging.getLogger(__name__)

PREFIX = "turngate:spend"
WINDOW_S = 60.0
SLOTS = 12
PERIODS: tuple[BudgetPeriod, ...] = ("day", "month")
DEFAULT_PERIOD: BudgetPeriod = "month"  # a budget without a period is a monthly one
_KEEP_PAST_PERIOD_S = 86_400  # a finished period's total stays readable a day longer


def period_of(period: BudgetPeriod, now: float) -> tuple[str, datetime]:
    """The calendar period (UTC) that `now` falls in: its label and when the next one starts."""
    at = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start + timedelta(days=1)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y-%m"), following


@dataclass(frozen=True)
class Reading:
    """One key's spend as the meter saw it: the window's slots, oldest first, and a period's total."""

    slot_start: int  # the index of slots[0]
    slots: list[int]
    spent: int  # in the period asked for; 0 when none was asked

    @property
    def tpm_used(self) -> int:
        return sum(self.slots)


@dataclass(frozen=True)
class Refusal:
    """Why a key may not start another request now (a 429 for the API layer to send)."""

    code: str  # "tokens_per_minute_exceeded" or "budget_exceeded"
    message: str
    retry_after_s: int


class SpendMeter(Protocol):
    window_s: float
    slots: int

    async def charge(self, key_id: str, tokens: int) -> None: ...
    async def read(self, key_id: str, period: BudgetPeriod | None) -> Reading | None: ...
    async def close(self) -> None: ...


class _Clocked:
    """The window's arithmetic, shared by both meters."""

    def __init__(self, window_s: float, slots: int) -> None:
        self.window_s, self.slots = window_s, slots
        self.slot_s = window_s / slots

    def slot(self, now: float) -> int:
        return int(now // self.slot_s)


class MemorySpendMeter(_Clocked):
    def __init__(self, window_s: float = WINDOW_S, slots: int = SLOTS) -> None:
        super().__init__(window_s, slots)
        self._window: dict[tuple[str, int], int] = {}
        self._totals: dict[tuple[str, BudgetPeriod, str], int] = {}
        self._labels: tuple[str, ...] = ()  # the periods _totals holds
        self._pruned_at: int | None = None  # the slot of the last pruning

    async def charge(self, key_id: str, tokens: int) -> None:
        now = time.time()
        slot = self.slot(now)
        # Slots that left the window go once a slot (keys are bounded by it), not on every charge.
        if len(self._window) > 10_000 and slot != self._pruned_at:
            self._window = {k: v for k, v in self._window.items() if k[1] > slot - self.slots}
            self._pruned_at = slot
        self._window[(key_id, slot)] = self._window.get((key_id, slot), 0) + tokens
        labels = tuple(period_of(period, now)[0] for period in PERIODS)
        if labels != self._labels:  # a new day: forget the totals of periods that ended
            self._totals = {k: v for k, v in self._totals.items() if k[2] in labels}
            self._labels = labels
        for period, label in zip(PERIODS, labels, strict=True):
            key = (key_id, period, label)
            self._totals[key] = self._totals.get(key, 0) + tokens

    async def read(self, key_id: str, period: BudgetPeriod | None) -> Reading:
        now = time.time()
        first = self.slot(now) - self.slots + 1
        slots = [self._window.get((key_id, first + i), 0) for i in range(self.slots)]
        spent = self._totals.get((key_id, period, period_of(period, now)[0]), 0) if period else 0
        return Reading(first, slots, spent)

    async def close(self) -> None:
        return None


class RedisSpendMeter(_Clocked):
    def __init__(self, url: str, window_s: float = WINDOW_S, slots: int = SLOTS, prefix: str = PREFIX,
                 max_connections: int = 64, warn_interval_s: float = 30.0) -> None:
        super().__init__(window_s, slots)
        self.prefix = prefix
        self.redis = limits_redis(url, max_connections)  # the request limiter's pool settings
        self._outage = ThrottledWarning(log, warn_interval_s)

    def _slot_key(self, key_id: str, slot: int) -> str:
        return f"{self.prefix}:tpm:{key_id}:{slot}"

    def _total_key(self, key_id: str, period: BudgetPeriod, label: str) -> str:
        return f"{self.prefix}:{period}:{key_id}:{label}"

    async def charge(self, key_id: str, tokens: int) -> None:
        now = time.time()
        slot_key = self._slot_key(key_id, self.slot(now))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incrby(slot_key, tokens)
                pipe.expire(slot_key, math.ceil(self.window_s + self.slot_s) + 1)
                for period in PERIODS:
                    label, ends = period_of(period, now)
                    key = self._total_key(key_id, period, label)
                    pipe.incrby(key, tokens)
                    pipe.expireat(key, int(ends.timestamp()) + _KEEP_PAST_PERIOD_S)
                await pipe.execute()
        except Exception as e:
            self._failed(e, "could not count %d tokens", tokens)

    async def read(self, key_id: str, period: BudgetPeriod | None) -> Reading | None:
        now = time.time()
        first = self.slot(now) - self.slots + 1
        keys = [self._slot_key(key_id, first + i) for i in range(self.slots)]
        if period:
            keys.append(self._total_key(key_id, period, period_of(period, now)[0]))
        try:
            values = await self.redis.mget(keys)
        except Exception as e:
            self._failed(e, "could not read the spend; letting requests through")
            return None
        counts = [int(v) if v is not None else 0 for v in values]
        return Reading(first, counts[:self.slots], counts[self.slots] if period else 0)

    def _failed(self, e: Exception, what: str, *args: object) -> None:
        metrics.REDIS_ERRORS.labels("spend").inc()
        self._outage.warning("spend meter: redis unavailable (%s); " + what, type(e).__name__, *args)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)


def make_meter(redis_url: str | None, redis_max_connections: int = 64) -> SpendMeter:
    if redis_url:
        return RedisSpendMeter(redis_url, max_connections=redis_max_connections)
    return MemorySpendMeter()


# -- what the admin API and the request check read ---------------------------------------------------

async def spend(meter: SpendMeter, key_id: str, period: BudgetPeriod) -> int | None:
    """Tokens `key_id` spent in the current calendar `period` (UTC); None when the meter cannot tell."""
    reading = await meter.read(key_id, period)
    return reading.spent if reading else None


async def tpm_used(meter: SpendMeter, key_id: str) -> int | None:
    """Tokens `key_id` spent in the last window (one minute); None when the meter cannot tell."""
    reading = await meter.read(key_id, None)
    return reading.tpm_used if reading else None


async def refusal(meter: SpendMeter, key_id: str, policy: KeyPolicy) -> Refusal | None:
    """Why the key may not start a request now, or None: its tokens in the last minute reached its
    tpm, or its budget for the period is spent. None too when the meter cannot tell (fail open)."""
    if not policy.tpm and policy.budget_tokens is None:
        return None
    period = (policy.budget_period or DEFAULT_PERIOD) if policy.budget_tokens is not None else None
    reading = await meter.read(key_id, period)
    if reading is None:
        return None
    now = time.time()
    if period is not None and policy.budget_tokens is not None and reading.spent >= policy.budget_tokens:
        _, resets = period_of(period, now)
        return Refusal("budget_exceeded",
                       f"This API key has spent its token budget for the {period} ({reading.spent} of "
                       f"{policy.budget_tokens} tokens); it resets at {resets.strftime('%Y-%m-%dT%H:%M:%SZ')}.",
                       max(1, math.ceil(resets.timestamp() - now)))
    if policy.tpm and reading.tpm_used >= policy.tpm:
        return Refusal("tokens_per_minute_exceeded",
                       f"Tokens per minute limit reached for this API key ({reading.tpm_used} of {policy.tpm} "
                       f"tokens in the last {meter.window_s:g} s); retry after the window moves on.",
                       _tpm_retry_after(meter, reading, policy.tpm, now))
    return None


def _tpm_retry_after(meter: SpendMeter, reading: Reading, tpm: int, now: float) -> int:
    """Seconds until enough of the window's oldest tokens left it to bring the count under tpm."""
    slot_s = meter.window_s / meter.slots
    left = reading.tpm_used
    for i, count in enumerate(reading.slots):
        left -= count
        if left < tpm:
            leaves_at = (reading.slot_start + i + meter.slots) * slot_s
            return max(1, math.ceil(leaves_at - now))
    return max(1, math.ceil(meter.window_s))
