"""A client body that orjson cannot write (integers past 64 bits, lone surrogates: a client may
send both) is written for each candidate call off the event loop, to the same JSON; before, the
standard library's encoder ran on the loop, in one call that holds the GIL, once per candidate."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service import wirejson
from service.settings import RouteSettings
from service.upstream.client import UpstreamClient, UpstreamError, make_pools
from tests.test_tool_schemas import tarpit

HOSTILE = {"model": "m", "messages": [{"role": "user", "content": "hi \ud800 there"}],
           "metadata": {"id": 10 ** 30}, "x_pad": [10 ** 20] * 170_000}  # 3.7 MB (the request cap is 4 MB)


def test_a_body_orjson_refuses_is_written_as_the_standard_library_reads_it():
    written = asyncio.run(wirejson.dumps_off_loop(HOSTILE))
    assert json.loads(written) == HOSTILE
    assert asyncio.run(wirejson.dumps_off_loop({"a": [1, "é"]})) == wirejson.dumps({"a": [1, "é"]})


def test_writing_such_a_body_for_a_candidate_call_leaves_the_loop_free():
    route = RouteSettings(alias="r", upstream_base_url="http://127.0.0.1:9/v1", upstream_model="m")

    async def run(url: str) -> float:
        upstream = UpstreamClient(make_pools())
        lags: list[float] = []

        async def probe() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - started - 0.005)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.05)
        try:
            with pytest.raises(UpstreamError):  # the tarpit never answers
                await upstream.complete(route.model_copy(update={"upstream_base_url": url}), HOSTILE, 1, None, 1.0)
        finally:
            prober.cancel()
            await upstream.aclose()
        return max(lags)

    with tarpit() as (url, _):
        worst = asyncio.run(run(url))
    assert worst < 0.05, f"the event loop stalled {worst * 1000:.0f} ms"


def test_such_a_body_is_written_once_for_all_the_candidate_calls_of_a_round():
    """The candidate calls of a round share the client's body: its parts orjson refuses are written
    once, not once per call (before, each of N calls walked the whole body: N times the CPU)."""
    route = RouteSettings(alias="r", upstream_base_url="http://127.0.0.1:9/v1", upstream_model="m")

    async def calls(url: str, n: int) -> float:
        upstream = UpstreamClient(make_pools())
        body = {**HOSTILE, "x_pad": list(HOSTILE["x_pad"])}  # a new round's body: nothing written yet
        started = time.process_time()
        try:
            got = await asyncio.gather(*[upstream.complete(route.model_copy(update={"upstream_base_url": url}),
                                                           body, 1, None, 1.0) for _ in range(n)],
                                       return_exceptions=True)
        finally:
            await upstream.aclose()
        assert all(isinstance(e, UpstreamError) for e in got)  # the tarpit never answers
        return time.process_time() - started

    with tarpit() as (url, _):
        one = min(asyncio.run(calls(url, 1)) for _ in range(2))
        eight = asyncio.run(calls(url, 8))
    assert eight < 4 * one, f"8 calls {eight * 1000:.0f} ms of CPU, one call {one * 1000:.0f} ms"


def test_nothing_of_such_a_body_is_held_a_second_after_its_round():
    import gc
    import sys

    route = RouteSettings(alias="r", upstream_base_url="http://127.0.0.1:9/v1", upstream_model="m")
    pad = list(HOSTILE["x_pad"])
    before = sys.getrefcount(pad)

    async def round_then_wait(url: str) -> int:
        upstream = UpstreamClient(make_pools())
        body = {**HOSTILE, "x_pad": pad}
        try:
            await asyncio.gather(*[upstream.complete(route.model_copy(update={"upstream_base_url": url}),
                                                     body, 1, None, 0.5) for _ in range(3)], return_exceptions=True)
        finally:
            await upstream.aclose()
        del body
        during = sys.getrefcount(pad)
        await asyncio.sleep(1.2)
        return during

    with tarpit() as (url, _):
        during = asyncio.run(round_then_wait(url))
    gc.collect()  # the calls' exceptions (the tarpit never answers) hold their frames in cycles
    assert during > before  # kept for the round's later calls
    assert sys.getrefcount(pad) == before
