"""Per-client request limits: a fixed one-minute window per API key.

In-process by default (one replica). With TURNGATE_REDIS_URL the counters live in Redis, so every
replica behind the load balancer enforces the same budget. If Redis fails, requests are let through
(fail open) and the error is counted: an outage of the limiter must not become an outage of the
agents behind it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from service.telemetry import metrics

log = logging.getLogger(__name__)

WINDOW_S = 60


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: int = 0


def _window(now: float) -> tuple[int, int]:
    start = int(now // WINDOW_S) * WINDOW_S
    return start, start + WINDOW_S - int(now)


class MemoryLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._counts: dict[tuple[str, int], int] = {}

    async def hit(self, key_id: str) -> Verdict:
        window, retry = _window(time.time())
        if len(self._counts) > 10_000:  # drop old windows; keys are bounded by the window
            self._counts = {k: v for k, v in self._counts.items() if k[1] == window}
        count = self._counts.get((key_id, window), 0) + 1
        self._counts[(key_id, window)] = count
        return Verdict(count <= self.per_minute, retry)

    async def close(self) -> None:
        return None


class RedisLimiter:
    def __init__(self, url: str, per_minute: int, prefix: str = "turngate:rl") -> None:
        import redis.asyncio as redis

        self.per_minute = per_minute
        self.prefix = prefix
        self.redis = redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)

    async def hit(self, key_id: str) -> Verdict:
        window, retry = _window(time.time())
        key = f"{self.prefix}:{key_id}:{window}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                count, _ = await pipe.incr(key).expire(key, WINDOW_S + 5).execute()
        except Exception as e:  # noqa: BLE001 - fail open, but visibly
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            log.warning("rate limiter: redis unavailable (%s); letting the request through", type(e).__name__)
            return Verdict(True)
        return Verdict(count <= self.per_minute, retry)

    async def close(self) -> None:
        await self.redis.aclose()


def make_limiter(redis_url: str | None, per_minute: int | None):
    if not per_minute:
        return None
    return RedisLimiter(redis_url, per_minute) if redis_url else MemoryLimiter(per_minute)
