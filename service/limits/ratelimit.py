"""Per-client request limits: a sliding one-minute window per API key.

The window is a sliding-window counter over two fixed buckets (this minute's and the last one's):
the requests counted are this minute's plus the last minute's weighted by how much of it the
sliding window still covers. Unlike a fixed window it never lets twice the limit through around a
minute boundary, and it holds two integers per key, not one entry per request. A refused request is
not counted, so a client that keeps retrying is let through again as soon as its rate allows.

The limit is per call: an issued key's own rpm, else TURNGATE_RATE_LIMIT_PER_MINUTE (service.api.deps).

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
import math
import time
from dataclasses import dataclass
from typing import Any

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


def _buckets(now: float) -> tuple[int, float]:
    """(this minute's bucket start, the weight of the last minute's bucket in the sliding window)."""
    start = int(now // WINDOW_S) * WINDOW_S
    return start, 1.0 - (now - start) / WINDOW_S


def _admits(previous: int, current: int, weight: float, limit: int) -> bool:
    return previous * weight + current + 1 <= limit


def _retry_after(previous: int, current: int, now: float, limit: int) -> int:
    """Whole seconds until one more request fits, both buckets decaying as the window slides."""
    start = int(now // WINDOW_S) * WINDOW_S
    elapsed = now - start
    if current + 1 <= limit:  # the last minute's share is what is over: wait for it to slide out
        wait = WINDOW_S * (1 - (limit - current - 1) / previous) - elapsed
    else:  # this minute alone is full: into the next one, until this minute's share has slid out
        wait = WINDOW_S - elapsed + WINDOW_S * (1 - (limit - 1) / current)
    return max(1, math.ceil(wait))


def limits_redis(url: str, max_connections: int) -> Any:
    """A Redis client on a blocking pool of its own, for the request path's limits (this limiter, the
    spend meter): a burst waits up to POOL_WAIT_S for a connection, each connect or command fails
    after REDIS_TIMEOUT_S."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry  # the asyncio client awaits its retries: not redis.retry's
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    # One immediate retry on a broken connection (a pooled one that Redis closed, e.g. after a
    # restart), none on a timeout: each would add REDIS_TIMEOUT_S to every request of an outage.
    # A connection setting: given to Redis() beside an explicit pool, it would be ignored.
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    return redis.Redis(connection_pool=pool)


class MemoryLimiter:
    def __init__(self, per_minute: int | None = None) -> None:
        self.per_minute = per_minute
        self._counts: dict[tuple[str, int], int] = {}
        self._pruned_at: int | None = None  # the bucket of the last pruning

    async def hit(self, key_id: str, limit: int | None = None) -> Verdict:
        limit = limit or self.per_minute
        if not limit:
            return Verdict(True)
        now = time.time()
        bucket, weight = _buckets(now)
        # Buckets the window no longer covers go once a bucket: more live keys than this are not a
        # reason to rebuild the dict on every request (any bearer is a key where none are issued).
        if len(self._counts) > 10_000 and bucket != self._pruned_at:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= bucket - WINDOW_S}
            self._pruned_at = bucket
        previous = self._counts.get((key_id, bucket - WINDOW_S), 0)
        current = self._counts.get((key_id, bucket), 0)
        if not _admits(previous, current, weight, limit):
            return Verdict(False, _retry_after(previous, current, now, limit))
        self._counts[(key_id, bucket)] = current + 1
        return Verdict(True)

    async def close(self) -> None:
        return None


# Reads both buckets and counts the request only if it fits, atomically: replicas racing on one key
# cannot both take the last slot. KEYS: this bucket, the last one. ARGV: limit, weight, ttl.
# Returns {admitted (1/0), this bucket's count, the last bucket's count}.
_SLIDING_WINDOW = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[2]) + current + 1 > tonumber(ARGV[1]) then
  return {0, current, previous}
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, current + 1, previous}
"""


class RedisLimiter:
    def __init__(self, url: str, per_minute: int | None = None, prefix: str = "turngate:rl",
                 max_connections: int = 64, warn_interval_s: float = 30.0) -> None:
        self.per_minute = per_minute
        self.prefix = prefix
        self.redis = limits_redis(url, max_connections)
        self._script = self.redis.register_script(_SLIDING_WINDOW)  # EVALSHA, loaded on first use
        self._outage = ThrottledWarning(log, warn_interval_s)

    async def hit(self, key_id: str, limit: int | None = None) -> Verdict:
        limit = limit or self.per_minute
        if not limit:
            return Verdict(True)
        now = time.time()
        bucket, weight = _buckets(now)
        keys = [f"{self.prefix}:{key_id}:{bucket}", f"{self.prefix}:{key_id}:{bucket - WINDOW_S}"]
        try:
            admitted, current, previous = await self._script(keys=keys, args=[limit, repr(weight), 2 * WINDOW_S + 5])
        except Exception as e:
            metrics.REDIS_ERRORS.labels("ratelimit").inc()
            self._outage.warning("rate limiter: redis unavailable (%s); letting requests through",
                                 type(e).__name__)
            return Verdict(True)
        if admitted:
            return Verdict(True)
        return Verdict(False, _retry_after(int(previous), int(current), now, limit))

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)  # the pool is ours, not the client's


def make_limiter(redis_url: str | None, per_minute: int | None, redis_max_connections: int = 64):
    """Always a limiter: a key issued at run time may bring its own rpm where no global limit is set.
    With no limit for a request, `hit` returns at once (no Redis call)."""
    if redis_url:
        return RedisLimiter(redis_url, per_minute, max_connections=redis_max_connections)
    return MemoryLimiter(per_minute)
