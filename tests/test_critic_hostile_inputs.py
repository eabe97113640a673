"""What a client can put in a turn must not break the critic or make it slow: numbers of any size
in tool-call arguments (service/critic/features.py), and megabytes of arguments, tool names or
whitespace-free history, whose tokenizer work is bounded by what the critic can read
(service/critic/render.py). Ordinary inputs render exactly as before (test_critic_render.py pins
that; here, inputs long enough to be clipped yet ordinary in their words)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tokenizers

from service.critic import features, reasons, render
from service.critic.onnx_critic import OnnxCritic
from service.critic.registry import shipped_bundle
from service.settings import GatePolicy

BIG = "9" * 400  # past a double's range: float() of it overflows
BIG_ID = f'{{"id": {BIG}}}'
TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}]
MAX_LENGTH = 256  # the shipped critic's


def _call(args: str, name: str = "get_order") -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}]}


def _history(args: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "where is my order?"}, _call(args),
            {"role": "tool", "tool_call_id": "c1", "content": "shipped"}, {"role": "user", "content": "thanks"}]


def _finite(rows: list[list[float]]) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for row in rows for v in row)


# --- numbers of any size -------------------------------------------------------------------------

HUGE_ARGS = [
    BIG_ID,
    f'{{"id": -{BIG}}}',
    f'{{"id": {"9" * 4300}}}',  # the longest integer the wire parser accepts
    f'{{"ids": [1, {BIG}, 2.5]}}',  # a list of scalars: compared as a set
    f'{{"order": {{"id": {BIG}, "qty": 1e308}}}}',
]


@pytest.mark.parametrize("args", HUGE_ARGS)
def test_huge_numbers_in_candidates_give_finite_features(args):
    candidates = [_call(args), _call(args), _call('{"id": 1}')]
    turn = features.compute([{"role": "user", "content": "hi"}], candidates, TOOLS)
    assert turn.kind == "tool" and len(turn.rows) == 3 and _finite(turn.rows)
    row = dict(zip(turn.names, turn.rows[0]))
    assert row["call_support"] == pytest.approx(2 / 3)  # the two same calls still agree
    assert len(reasons.explain([{"role": "user", "content": "hi"}], candidates, TOOLS)) == 3


@pytest.mark.parametrize("args", HUGE_ARGS)
def test_huge_numbers_in_history_give_finite_features(args):
    turn = features.compute(_history(args), [_call(args), {"role": "assistant", "content": "ok"}], TOOLS)
    assert turn.kind == "agent" and _finite(turn.rows)
    assert dict(zip(turn.names, turn.rows[0]))["repeat_call"] == 1.0  # the same huge call, made before
    reasons.explain(_history(args), [_call(args)], TOOLS)


def test_numbers_that_mean_the_same_still_agree():
    turn = features.compute([{"role": "user", "content": "hi"}], [_call('{"id": 5}'), _call('{"id": 5.0}')], TOOLS)
    assert dict(zip(turn.names, turn.rows[0]))["call_support"] == 1.0


def test_huge_numbers_passed_as_parsed_arguments():
    """Arguments that arrive as an object (not the JSON string OpenAI sends) are read too."""
    cand = {"role": "assistant", "tool_calls": [{"function": {"name": "get_order", "arguments": {"id": 10 ** 400}}}]}
    assert _finite(features.compute([{"role": "user", "content": "hi"}], [cand, cand], TOOLS).rows)


# --- the shipped critic, end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped() -> Any:
    path = shipped_bundle()
    if path is None:
        pytest.skip("no shipped critic bundle")
    critic = OnnxCritic.load(path, "cpu", max_wait_s=0.002)
    yield critic
    critic.close()


def test_the_critic_scores_huge_numbers(shipped):
    scores = asyncio.run(shipped.score(_history(BIG_ID), [_call(BIG_ID)], TOOLS))
    assert len(scores) == 1 and 0 < scores[0] < 1


def test_score_api_answers_huge_numbers(gateway, shipped):
    body = {"messages": [{"role": "user", "content": "hi"}], "candidates": [_call(BIG_ID)],
            "tools": TOOLS}
    with gateway(critic=shipped) as (url, _):
        r = httpx.post(url + "/critic/score", content=json.dumps(body),
                       headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 1 and 0 < r.json()["scores"][0] < 1


def test_huge_numbers_in_history_do_not_slip_past_a_blocking_policy(gateway, shipped):
    """The critic used to fail on such a turn, and an unscored candidate passed intervene_threshold."""
    policy = GatePolicy(intervene_threshold=0.99, on_exhausted="block", block_message="blocked here")
    with gateway(critic=shipped, candidates=2, policy=policy) as (url, sink):
        for args in ('{"id": 1}', BIG_ID):
            r = httpx.post(url + "/chat/completions", content=json.dumps(
                {"model": "gpt-test", "messages": _history(args), "tools": TOOLS}),
                headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.headers["x-turngate-decision"] == "blocked", args
    for record in sink.records:  # every sampled candidate scored (the last is the block message)
        assert all(c.score is not None for c in record.candidates[:-1])


# --- bounded tokenizer work ----------------------------------------------------------------------

class Recording:
    """A tokenizer that notes every text it is handed."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        self.texts: list[str] = []

    def encode(self, text: str, **kw: Any) -> Any:
        self.texts.append(text)
        return self.tok.encode(text, **kw)

    def encode_batch(self, texts: list[str], **kw: Any) -> Any:
        self.texts.extend(texts)
        return self.tok.encode_batch(texts, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    path = shipped_bundle()
    if path is None:
        pytest.skip("no shipped critic bundle")
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def _big_args(n: int) -> tuple[list, list, list | None]:
    args = json.dumps({"x": [0] * n})
    return [{"role": "user", "content": "hi"}], [_call(args, "f")], TOOLS


def _many_tools(n: int) -> tuple[list, list, list | None]:
    tools = [{"type": "function", "function": {"name": f"t{i:061d}"}} for i in range(n)]
    return [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "ok"}], tools


def _wordless_history(n: int) -> tuple[list, list, list | None]:
    return [{"role": "user", "content": "a" * 3990}] * n, [{"role": "assistant", "content": "ok"}], None


HOSTILE = {"3 MB of tool-call arguments": _big_args, "38,000 tools": _many_tools,
           "950 whitespace-free messages": _wordless_history}
SIZES = {"3 MB of tool-call arguments": 1_000_000, "38,000 tools": 38_000, "950 whitespace-free messages": 950}
# What the critic can read of a part, in characters, with room to spare: 100 per token
# (WordPiece's longest word) for the head, the body and each candidate.
READABLE_CHARS = 3 * MAX_LENGTH * 100


@pytest.mark.parametrize("case", HOSTILE)
def test_the_tokenizer_reads_what_the_critic_can_read(tokenizer, case):
    rec = Recording(tokenizer)
    render.encode_batch(rec, *HOSTILE[case](SIZES[case]), MAX_LENGTH)
    assert sum(len(t) for t in rec.texts) <= READABLE_CHARS
    smaller = Recording(tokenizer)
    render.encode_batch(smaller, *HOSTILE[case](SIZES[case] // 4), MAX_LENGTH)
    assert sum(map(len, smaller.texts)) == sum(map(len, rec.texts))  # no longer grows with the input


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_inputs_encode_quickly(tokenizer, case):
    args = HOSTILE[case](SIZES[case])
    started = time.perf_counter()
    out = render.encode_batch(tokenizer, *args, MAX_LENGTH)
    assert time.perf_counter() - started < 0.5  # it took 0.8-4.6 s; bounded, it takes tens of ms
    assert out["input_ids"].shape[1] <= MAX_LENGTH


def test_tokenizing_does_not_hold_the_gil(tokenizer):
    """The critic tokenizes off the event loop; the loop must keep running meanwhile."""
    messages, candidates, tools = _many_tools(38_000)
    gaps: list[float] = []

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, lambda: render.encode_batch(tokenizer, messages, candidates, tools,
                                                                         MAX_LENGTH))
        while not work.done():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - t)
        await work

    asyncio.run(probe())
    assert max(gaps) < 0.25


def _essay(words: int, start: int = 0) -> str:
    return " ".join(f"word{i} of the reservation" for i in range(start, start + words))


ORDINARY_LONG = {  # long enough to be clipped, made of ordinary words: rendered exactly as before
    "long candidate": ([{"role": "user", "content": "hi"}],
                       [{"role": "assistant", "content": _essay(800)}, _call(json.dumps({"note": _essay(9000)}))],
                       None),
    "many tools": ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                   [{"role": "assistant", "content": "ok"}],
                   [{"type": "function", "function": {"name": f"get_thing_{i}"}} for i in range(30_000)]),
    "long history": ([m for i in range(60) for m in ({"role": "user", "content": _essay(160, i)},
                                                      _call(json.dumps({"text": _essay(600, i)})))],
                     [{"role": "assistant", "content": "done"}], None),
}


@pytest.mark.parametrize("case", ORDINARY_LONG)
def test_ordinary_long_inputs_encode_as_if_unclipped(tokenizer, monkeypatch, case):
    messages, candidates, tools = ORDINARY_LONG[case]
    clipped = render.encode_batch(tokenizer, messages, candidates, tools, MAX_LENGTH)
    monkeypatch.setattr(render, "CHARS_PER_TOKEN", 10 ** 9, raising=False)  # nothing clipped
    whole = render.encode_batch(tokenizer, messages, candidates, tools, MAX_LENGTH)
    assert all(np.array_equal(clipped[k], whole[k]) for k in whole)
