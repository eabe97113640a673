"""`turngate demo`: the gate at work with no upstream key.

Starts a simulated actor that answers each recorded τ-bench turn with the candidate replies the
real agent produced across trials (service/demo/sample.jsonl; see NOTICE.md), starts turngate in
front of it with the default critic, sends the turns over HTTP as any OpenAI client would and
prints what the gate saw and chose. It needs nothing beyond turngate's own dependencies (httpx,
not the `openai` package), so it runs right after `pip install turngate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from service.app import create_app
from service.critic.registry import load_critic
from service.demo.fake_actor import FakeActor, Reply, serve_in_thread
from service.gate.feedback import describe_action
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink

SAMPLE = Path(__file__).with_name("sample.jsonl")


def load_turns(limit: int) -> list[dict]:
    with SAMPLE.open() as f:
        return [json.loads(line) for line in f][:limit]


def _key(messages: list[dict]) -> str:
    return json.dumps(messages[-1], sort_keys=True) + str(len(messages))


def simulated_actor(turns: list[dict]) -> FakeActor:
    """Answers a recorded context with all of its recorded candidates, as choices of one reply."""
    by_context = {_key(t["messages"]): [c["message"] for c in t["candidates"]] for t in turns}

    def respond(body: dict, attempt: int) -> Reply:
        candidates = by_context.get(_key(body["messages"]))
        if candidates is None:
            return Reply(status=400)
        return Reply(candidates)

    return FakeActor(respond)


def run_demo(limit: int = 4, print_fn=print) -> list[dict]:
    turns = load_turns(limit)
    actor = simulated_actor(turns)
    sink = MemorySink()
    rows: list[dict] = []
    with serve_in_thread(actor.app) as actor_url:
        route = RouteSettings(alias="demo-agent", upstream_base_url=actor_url + "/v1", upstream_model="gpt-4o",
                              mode="rank", candidates=max(len(t["candidates"]) for t in turns),
                              upstream_supports_n=True)
        settings = Settings(routes=[route])
        critic = load_critic(settings)
        with serve_in_thread(create_app(settings, critic=critic, sink=sink)) as url:
            print_fn(f"critic: {critic.name} {critic.version} on {critic.provider}\n")
            with httpx.Client(base_url=url + "/v1", headers={"authorization": "Bearer demo"}, timeout=60) as client:
                for turn in turns:
                    raw = client.post("/chat/completions", json={
                        "model": "demo-agent", "messages": turn["messages"], "tools": turn["tools"]})
                    raw.raise_for_status()
                    record = next(r for r in sink.records if r.turn_id == raw.headers["x-turngate-turn-id"])
                    rows.append(_show(turn, record, raw.headers, print_fn))
    return rows


def _show(turn: dict, record, headers, print_fn) -> dict:
    last_user = next(m["content"] for m in reversed(turn["messages"]) if m["role"] == "user")
    print_fn(f"τ-bench airline task {turn['task_id']}  user: {last_user[:90]!r}")
    print_fn(f"  {'#':<3}{'trial':<7}{'gold':<6}{'verdict':<14}{'score':>7}  action")
    for meta, cand in zip(turn["candidates"], record.candidates, strict=False):
        mark = "->" if cand.index == record.chosen_index else "  "
        trial = "synth" if meta["synthetic"] else str(meta["trial"])
        verdict = cand.veto_reason or "ok"
        score = "" if cand.score is None else f"{cand.score:.3f}"
        print_fn(f"{mark}{cand.index:<3}{trial:<7}{'yes' if meta['gold'] else 'no':<6}{verdict:<14}{score:>7}  "
                 f"{describe_action(cand.message)[:80]}")
    print_fn(f"  decision: {headers['x-turngate-decision']}, rounds {headers['x-turngate-rounds']}\n")
    chosen_meta = turn["candidates"][record.chosen_index]
    return {"task_id": turn["task_id"], "decision": record.decision, "chosen": record.chosen_index,
            "chosen_synthetic": chosen_meta["synthetic"], "chosen_gold": chosen_meta["gold"]}
