"""Per-client request limits: a fixed one-minute window per API key.

In-process by default (one replica). With TURNGATE_REDIS_URL the counters live in Redis, so every
replica behind the load balancer enforces the same budget. If Redis fails, requests are let through
(fail open) and the error is counted: an outage of the limiter must not become an outage of the
agents behind it. The warning about it is logged once per interval, not once per request.

The Redis connections are a blocking pool: a burst beyond its size waits for a free connection
(up to POOL_WAIT_S) instead of failing, which let every request of a burst through while Redis was
up (redis-py's default pool raises "Too many connections" past 100 concurrent calls).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from service.telemetry import metrics
from service.telemetry.throttled import ThrottledWarning

log = logging.getLogger(__name__)

WINDOW_S = 60
# Timeouts are wall time on the event loop: under a burst a reply (or a connect) that Redis served
# in a millisecond can wait 0.25 s and more for the loop to read it, and 0.25 s timeouts let most of
# a burst through with Redis up (tests/test_ratelimit.py). Refused connections still fail at once.
# A request waits this long for a free Redis connection before failing open. Every connection busy
# means Redis is answering (in an outage commands fail or time out within REDIS_TIMEOUT_S and free
# their connection), so the wait is congestion of this process, not an outage: waiting is right,
# and 1 s let a few requests of a 300-request burst through on a loaded 2-core machine.
POOL_WAIT_S = 5.0
REDIS_TIMEOUT_S = 1.0  # one connect or one command


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
    def __init__(self, url: str, per_minute: int, prefix: str = "turngate:rl", max_connections: int = 64,
                 warn_interval_s: float = 30.0) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry  # the asyncio client awaits its retries: not redis.retry's
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        self.per_minute = per_minute
        self.prefix = prefix
        # One immediate retry on a broken connection (a pooled one that Redis closed, e.g. after a
        # restart), none on a timeout: each would add REDIS_TIMEOUT_S to every request of an outage.
        # A connection setting: given to Redis() beside an explicit pool, it would be ignored.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_WAIT_S, socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        self.redis = redis.Redis(connection_pool=pool)
        self._outage = ThrottledWarning(log, warn_interval_s)

    async def hit(self, key_id: str) -> Verdict:
        window, retry = _window(time.time())
        key = f"{self.prefix}:{key_id}:{window}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S + 5)
                count, _ = await pipe.execute()
        except Exception as e:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            self._outage.warning("rate limiter: redis unavailable (%s); letting requests through",
                                 type(e).__name__)
            return Verdict(True)
        return Verdict(count <= self.per_minute, retry)

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)  # the pool is ours, not the client's


def make_limiter(redis_url: str | None, per_minute: int | None, redis_max_connections: int = 64):
    if not per_minute:
        return None
    if redis_url:
        return RedisLimiter(redis_url, per_minute, max_connections=redis_max_connections)
    return MemoryLimiter(per_minute)
