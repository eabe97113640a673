"""The control plane's propagation: a change audited through one replica's ControlPlane is
reloaded by another's, by the poll alone and, with Redis, at once."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from sqlalchemy import func, select

from service.control.plane import ControlPlane, audit
from service.store.engine import make_async_engine
from service.store.models import AuditEntry
from tests.test_store_support import db_url, make_pg_db, shared_pg_db  # noqa: F401 - fixtures

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


async def _two_replicas(url: str, redis_url: str | None, poll_s: float):
    engines = [make_async_engine(url), make_async_engine(url)]
    planes = [ControlPlane(e, redis_url, poll_s) for e in engines]
    seen: list[list[int]] = [[], []]
    for plane, log in zip(planes, seen):
        async def reload(conn, log=log, plane=plane):
            log.append(1)
        plane.on_change("test", reload)
        await plane.start()
    return engines, planes, seen


async def _change_on(plane: ControlPlane) -> None:
    async with plane.engine.begin() as conn:
        await audit(conn, "test", "route.put", "r1", None, {"alias": "r1"})
    await plane.changed()


async def _time_to_reload(planes, seen, limit_s: float) -> float:
    before = len(seen[1])
    t0 = time.monotonic()
    await _change_on(planes[0])
    # Reloaded, and done with it: the generation is set once the reloaders have run.
    while len(seen[1]) == before or planes[1].generation != planes[0].generation:
        assert time.monotonic() - t0 < limit_s, "the other replica never reloaded"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_the_poll_alone_carries_a_change_to_another_replica(db_url):  # noqa: F811
    async def main():
        engines, planes, seen = await _two_replicas(db_url, None, poll_s=0.2)
        try:
            assert seen == [[1], [1]]  # both loaded the state at start
            assert await _time_to_reload(planes, seen, limit_s=2.0) < 1.0
            assert planes[0].generation == planes[1].generation > 0
            await asyncio.sleep(0.5)
            assert len(seen[1]) == 2  # no change, no reload
        finally:
            for p, e in zip(planes, engines):
                await p.stop()
                await e.dispose()
    asyncio.run(main())


@pytest.mark.skipif(not _redis_up(), reason="redis not reachable")
def test_redis_announces_a_change_before_the_poll_would(db_url):  # noqa: F811
    async def main():
        engines, planes, seen = await _two_replicas(db_url, REDIS_URL, poll_s=30.0)
        try:
            await asyncio.sleep(0.2)  # the subscription is up
            assert await _time_to_reload(planes, seen, limit_s=2.0) < 1.0
        finally:
            for p, e in zip(planes, engines):
                await p.stop()
                await e.dispose()
    asyncio.run(main())


def test_a_missing_database_at_start_does_not_stop_the_replica(tmp_path):
    async def main():
        engine = make_async_engine(f"sqlite:///{tmp_path}/missing/never.db")
        plane = ControlPlane(engine, None, 0.1)
        await plane.start()  # logs and goes on
        assert plane.generation == -1
        await plane.stop()
        await engine.dispose()
        # aiosqlite answers a failed connect's clean-up (`Connection.stop()`, a future nobody awaits)
        # from its thread; closing the loop before that lands is what pytest reported as an unhandled
        # thread exception in whichever test ran next.
        await asyncio.sleep(0.1)
    asyncio.run(main())


def test_stop_lets_a_reload_in_progress_finish(db_url):  # noqa: F811
    # Cancelled in the middle of a query, a database driver that runs it on a thread of its own
    # (aiosqlite) answers later, and finds the event loop closed when the process is shutting down.
    async def main():
        engine = make_async_engine(db_url)
        plane = ControlPlane(engine, None, 0.05)
        began, finished = asyncio.Event(), []

        async def reload(conn):
            if plane.generation < 0:
                return  # the load at start
            began.set()
            await asyncio.sleep(0.3)  # a slow reload, stopped in the middle
            finished.append((await conn.execute(select(func.count()).select_from(AuditEntry))).scalar_one())
        plane.on_change("slow", reload)
        await plane.start()
        try:
            async with engine.begin() as conn:
                await audit(conn, "test", "route.put", "r1", None, {"alias": "r1"})
            await asyncio.wait_for(began.wait(), 5)  # the poll is reloading
            await plane.stop()
            assert finished == [1]  # the reload ran to its end before stop returned
        finally:
            await plane.stop()
            await engine.dispose()
    asyncio.run(main())
