"""What keeps every replica's control state (keys, routes, the active critic) the same.

Every change writes an audit_log row in the same transaction as the change; that row's id is the
control plane's generation. Each replica polls `max(audit_log.id)` every `control_poll_s` (1 s by
default) and, when it moved, runs its reloaders, which read the state whole from the database. With
Redis configured, a change is also announced on a pub/sub channel so the others reload at once; the
poll is the safety net that needs nothing but the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.store.models import AuditEntry
from service.telemetry.throttled import ThrottledWarning

log = logging.getLogger(__name__)

CHANNEL = "turngate:control"
STOP_WAIT_S = 5.0  # how long stop() lets a reload in progress finish
Reloader = Callable[[AsyncConnection], Awaitable[None]]


async def audit(conn: AsyncConnection, actor: str, action: str, target: str | None,
                before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    """One audit row, in the caller's transaction: the change and its record commit together."""
    await conn.execute(insert(AuditEntry).values(at=datetime.now(UTC), actor=actor, action=action, target=target,
                                                 before=before, after=after))


class ControlPlane:
    def __init__(self, engine: AsyncEngine, redis_url: str | None = None, poll_s: float = 1.0) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.poll_s = poll_s
        self.generation = -1  # nothing loaded yet
        self._reloaders: list[tuple[str, Reloader]] = []
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._redis: Any = None
        self._warn = ThrottledWarning(log, 30.0)

    def on_change(self, name: str, reloader: Reloader) -> None:
        """`reloader` reads its part of the state whole; it runs at start and after every change."""
        self._reloaders.append((name, reloader))

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception as e:  # the database is away at start: the poll loads the state once it is back
            self._warn.warning("control plane: cannot load the state (%s); retrying every %.1f s",
                               type(e).__name__, self.poll_s)
        self._tasks.append(asyncio.create_task(self._poll(), name="control-poll"))
        if self.redis_url:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1.0)
            self._tasks.append(asyncio.create_task(self._listen(), name="control-listen"))

    async def stop(self) -> None:
        # Cancel between reloads, not inside one: a query cancelled half way is still answered by
        # the database driver's thread (aiosqlite), later, into an event loop closed by then. A
        # reload that hangs past STOP_WAIT_S is cancelled anyway.
        try:
            await asyncio.wait_for(self._lock.acquire(), STOP_WAIT_S)
            held = True
        except TimeoutError:
            held = False
        try:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            if held:
                self._lock.release()
        self._tasks.clear()
        if self._redis is not None:
            await self._redis.aclose()

    async def refresh(self, force: bool = False) -> bool:
        """Reload when the generation moved (or `force`); True when it reloaded."""
        async with self._lock:
            async with self.engine.connect() as conn:
                generation = (await conn.execute(select(func.coalesce(func.max(AuditEntry.id), 0)))).scalar_one()
                if generation == self.generation and not force:
                    return False
                for name, reloader in self._reloaders:
                    try:
                        await reloader(conn)
                    except Exception:  # one part failing must not stop the others; the next change retries
                        log.exception("control plane: reloading %s failed; keeping its previous state", name)
            self.generation = generation
            return True

    async def changed(self) -> None:
        """After a change committed: this replica reloads now, the others are told to."""
        await self.refresh()
        if self._redis is not None:
            try:
                await self._redis.publish(CHANNEL, str(self.generation))
            except Exception as e:  # the others' poll picks it up within poll_s
                self._warn.warning("control plane: cannot announce a change on redis (%s)", type(e).__name__)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as e:  # the database is away: keep serving on the state we have
                self._warn.warning("control plane: cannot read the generation (%s); serving the last state",
                                   type(e).__name__)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._warn.warning("control plane: redis pub/sub lost (%s); polling only until it is back",
                                   type(e).__name__)
                await asyncio.sleep(self.poll_s)
