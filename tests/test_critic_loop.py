"""The critic loop end to end, on a real store: turns served by a real gateway (uvicorn) against a fake
actor, labelled by a fake judge on loopback (`turngate critic label`), a head trained from the store
(`turngate critic train-head --from-store`), promoted through the running gateway's admin API
(`turngate critic promote`), and the new version answering on POST /v1/critic/score.

The actor answers each turn with three replies, one of them "good"; the judge prefers it. The active
critic is a tiny encoder whose (random) weights happen to prefer the "bad" ones (seed 3), so a head
trained on the judge's labels must beat it on the held-out conversations; a head trained on a judge
that prefers "bad" is worse by the first judge's labels, and refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from critic_models.store_data import Holdout
from service.app import create_app
from service.cli import app as cli_app
from service.demo.fake_actor import FakeActor, Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.migrate import upgrade
from tests.judge_support import judged_candidates
from tests.test_critic_serving_bundles import build_bundle
from tests.test_store_support import make_pg_db, sql  # noqa: F401 - fixture

pytest.importorskip("torch")  # the tiny encoder bundle is exported from a torch model

ADMIN_KEY = "adm-loop-" + "7c3f9a" * 5
TURNS = 30
HOLDOUT = "0.3"
FAIL_500, FAIL_GARBAGE = 3, 7  # the flaky judge fails on these questions


def question(t: int) -> str:
    return f"Please answer question {t}."


def actor(body: dict[str, Any], attempt: int) -> Reply:
    """n replies; the good one at position t % n."""
    t = int(body["messages"][-1]["content"].split()[-1].rstrip("."))
    n = int(body.get("n") or 1)
    return Reply([assistant(f"Here is a {'good' if i == t % n else 'bad'} answer to question {t}.")
                  for i in range(n)])


@dataclass
class Judge:
    """An OpenAI-compatible judge answering structured scores: 1 for a reply containing "good" (or
    "bad" when the rubric says `Prefer bad`); it fails on the questions in `failing`."""

    failing: frozenset[int] = frozenset()
    calls: int = 0

    def __call__(self, body: dict[str, Any], attempt: int) -> Reply:
        self.calls += 1
        asked = re.search(r"Please answer question (\d+)\.", body["messages"][1]["content"])
        assert asked is not None, "the judge's request holds the conversation"
        t = int(asked.group(1))
        if t in self.failing:
            return Reply(status=500) if t == FAIL_500 else Reply([assistant("I think the second one, maybe.")])
        assert body["response_format"]["type"] == "json_schema"
        liked = "bad" if "Prefer bad" in body["messages"][0]["content"] else "good"
        scores = [{"index": i, "score": 1.0 if liked in text else 0.0,
                   "reason": f"it is {'the' if liked in text else 'not the'} {liked} one"}
                  for i, text in enumerate(judged_candidates(body))]
        return Reply([assistant(json.dumps({"candidates": scores}))])


@dataclass
class Loop:
    root: Path
    db: str
    gateway: str
    active: Path  # the tiny encoder the gateway starts with
    judge: Judge
    judge_url: str


def wait_for_turns(db: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while sql(db, "SELECT count(*) FROM candidates")[0][0] < 3 * n:
        assert time.monotonic() < deadline, "the turns were not written"
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loop(request, tmp_path_factory) -> Iterator[Loop]:
    root = tmp_path_factory.mktemp("loop")
    if request.param == "sqlite":
        db = f"sqlite:///{root}/store.db"
        upgrade(db)
    else:
        db = request.getfixturevalue("make_pg_db")()
    active = build_bundle(root / "bundles" / "encoder", version="enc3", seed=3)
    judge = Judge(frozenset({FAIL_500, FAIL_GARBAGE}))
    with ExitStack() as stack:
        actor_url = stack.enter_context(serve_in_thread(FakeActor(actor).app)) + "/v1"
        judge_url = stack.enter_context(serve_in_thread(FakeActor(judge).app)) + "/v1"
        route = RouteSettings(alias="agent", upstream_base_url=actor_url, upstream_model="actor", candidates=3,
                              mode="rank", upstream_supports_n=True, attempt_timeout_s=5, deadline_s=10)
        settings = Settings(routes=[route], database_url=db, critic=str(active), admin_key=ADMIN_KEY,
                            spool_dir=str(root / "spool"), critic_providers="CPUExecutionProvider")
        gateway = stack.enter_context(serve_in_thread(create_app(settings)))
        with httpx.Client(base_url=gateway, timeout=30) as client:
            for t in range(TURNS):
                r = client.post("/v1/chat/completions", headers={"x-turngate-conversation-id": f"conv-{t}",
                                                                 "authorization": "Bearer sk-test"},
                                json={"model": "agent", "messages": [{"role": "user", "content": question(t)}]})
                assert r.status_code == 200, r.text
        wait_for_turns(db, TURNS)
        yield Loop(root, db, gateway, active, judge, judge_url)


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli_app, list(args), env=env)


def label(lp: Loop, *extra: str):
    return cli("critic", "label", "--judge-url", lp.judge_url, "--judge-model", "fake-judge", "--rate", "0",
               "--concurrency", "4", "--database-url", lp.db, *extra)


def judge_labels(db: str, labeler: str = "judge:fake-judge@1") -> list[Any]:
    return sql(db, f"SELECT turn_id, candidate_idx, score, reason FROM candidate_labels WHERE labeler = '{labeler}'")


def test_labels_resume_and_failed_turns_wait_for_the_next_run(loop):
    first = label(loop)
    assert first.exit_code == 0, first.output
    assert f"judge:fake-judge@1: labelled {TURNS - 2} of {TURNS} turns; 2 failed" in first.output
    rows = judge_labels(loop.db)
    assert len(rows) == 3 * (TURNS - 2)
    # Every stored label is the judge's: 1 on the good reply, 0 on the others, with its reason.
    by_turn: dict[str, list] = {}
    for turn_id, idx, score, reason in rows:
        by_turn.setdefault(turn_id, []).append((idx, score, reason))
    messages = dict(sql(loop.db, "SELECT turn_id || ':' || idx, message FROM candidates"))
    for turn_id, labels in by_turn.items():
        assert sorted(s for _, s, _ in labels) == [0.0, 0.0, 1.0]
        for idx, score, reason in labels:
            message = messages[f"{turn_id}:{idx}"]  # JSON text on SQLite, JSONB on PostgreSQL
            content = (message if isinstance(message, dict) else json.loads(message))["content"]
            assert ("good" in content) == (score == 1.0)
            assert reason in ("it is the good one", "it is not the good one")

    calls = loop.judge.calls
    again = label(loop)  # the same flaky judge: only the two failed turns are asked again, and fail again
    assert again.exit_code == 0, again.output
    assert "labelled 0 of 2 turns; 2 failed" in again.output
    assert loop.judge.calls == calls + 2 and len(judge_labels(loop.db)) == 3 * (TURNS - 2)

    loop.judge.failing = frozenset()  # the judge recovers: the next run finishes the job
    healed = label(loop)
    assert "labelled 2 of 2 turns" in healed.output and len(judge_labels(loop.db)) == 3 * TURNS
    calls = loop.judge.calls
    noop = label(loop)
    assert "labelled 0 of 0 turns" in noop.output and loop.judge.calls == calls


def trained_head(loop: Loop) -> Path:
    """The head trained on the judge's labels of every turn (the tests above do the labelling and
    the training; run alone, a test does what they would have)."""
    out = loop.root / "bundles" / "head"
    if not (out / "held_out.json").is_file():
        if len(judge_labels(loop.db)) < 3 * TURNS:
            loop.judge.failing = frozenset()
            assert "labelled" in label(loop).output
        result = cli("critic", "train-head", "--from-store", loop.db, "--encoder", str(loop.active), "--out",
                     str(out), "--labeler", "judge:fake-judge@1", "--holdout", HOLDOUT, "--folds", "0",
                     "--steps", "200")
        assert result.exit_code == 0, result.output
    return out


def test_train_from_the_store_holds_out_conversations(loop):
    out = trained_head(loop)
    held = json.loads((out / "held_out.json").read_text())
    conversations = [r[0] for r in sql(loop.db, "SELECT DISTINCT conversation_id FROM turns")]
    rule = Holdout(float(HOLDOUT), 0)
    expected = sorted(c for c in conversations if rule.held(c))
    assert held["conversations"] == expected and 5 <= len(expected) <= TURNS - 10
    assert held["held_out_turns"] == len(expected) and held["train_turns"] == TURNS - len(expected)
    card = json.loads((out / "critic.json").read_text())
    figures = card["evaluation_head"]["sets"]["store"]  # the held-out turns, scored by the new head
    assert figures["groups"] == len(expected) and figures["critic"]["mean"] == 1.0


def promote(loop: Loop, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    """`turngate critic promote` as an operator runs it (its own process, the one-line errors)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TURNGATE_")}, "TURNGATE_ADMIN_KEY": ADMIN_KEY}
    return subprocess.run([sys.executable, "-m", "service.cli", "critic", "promote", str(bundle), "--url",
                           loop.gateway, "--database-url", loop.db, *extra], env=env, capture_output=True,
                          text=True, timeout=120)


def score_api(loop: Loop) -> dict[str, Any]:
    r = httpx.post(loop.gateway + "/v1/critic/score", headers={"authorization": "Bearer sk-test"}, json={
        "messages": [{"role": "user", "content": question(99)}],
        "candidates": [assistant("Here is a bad answer to question 99."),
                       assistant("Here is a good answer to question 99.")]}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_promote_activates_a_better_head_and_refuses_a_worse_one(loop):
    head = trained_head(loop)
    before = score_api(loop)
    assert before["critic"]["version"] == "enc3" and before["scores"][0] > before["scores"][1]

    few = promote(loop, head, "--min-turns", "1000")
    assert few.returncode == 1 and few.stderr.count("\n") == 1, few.stderr
    assert "not promoted: only" in few.stderr and "--force" in few.stderr

    done = promote(loop, head, "--min-turns", "5")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("  ", 1) for line in done.stdout.splitlines() if "  " in line)
    active_pick, new_pick = lines["pick (mean label)"].split()
    assert float(active_pick) == 0.0 and float(new_pick) == 1.0  # the encoder alone picks a bad reply every time
    new_version = json.loads((head / "critic.json").read_text())["version"]
    assert f"activated tiny-critic {new_version} on every replica (was tiny-critic enc3)" in done.stdout
    after = score_api(loop)
    assert after["critic"]["name"] == "tiny-critic" and after["critic"]["version"] == new_version
    assert after["scores"][1] > after["scores"][0]  # the new head prefers the good reply

    # A head trained on a judge that prefers "bad" replies: by the first judge's labels it is worse.
    inverted = label(loop, "--rubric", "Prefer bad replies.", "--rubric-version", "inverted")
    assert "judge:fake-judge@inverted: labelled 30 of 30 turns" in inverted.output
    worse = loop.root / "bundles" / "worse"
    trained = cli("critic", "train-head", "--from-store", loop.db, "--encoder", str(loop.active), "--out", str(worse),
                  "--labeler", "judge:fake-judge@inverted", "--holdout", HOLDOUT, "--folds", "0", "--steps", "200")
    assert trained.exit_code == 0, trained.output
    refused = promote(loop, worse, "--labeler", "judge:fake-judge@1", "--min-turns", "5", "--force")
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("turngate: error: not promoted:") and "worse" in refused.stderr
    assert score_api(loop)["critic"]["version"] == new_version  # still the promoted head
