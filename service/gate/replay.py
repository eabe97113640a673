"""`turngate replay`: what would the gate have flagged on recorded conversations?

Every assistant turn of a trajectory is scored in its context by the critic (all turns at once, so
the micro-batcher can merge them). A turn is *flagged* at threshold t when its score is below t,
which is what `intervene_threshold = t` would act on. Per threshold the report gives the flag rate
in failed vs successful conversations, and, on write tool calls of trajectories with gold actions,
the precision and recall of flags against "the call matches no gold action".

A conversation without a reward (what `turngate export` writes before feedback arrives) has no
outcome: its turns count in the flag totals and against gold actions, not in the outcome rates,
and the report says how many were left out.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.critic.base import Critic
from service.gate.actions import gold_of, matches_gold, write_calls

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class ScoredTurn:
    conversation: str
    reward: float | None  # None: no outcome recorded yet
    score: float
    write: bool  # the reply makes at least one write call
    bad_write: bool | None  # a write call matching no gold action (None: no gold to judge by)


async def score_turns(rows: list[dict[str, Any]], critic: Critic, concurrency: int = 64) -> list[ScoredTurn]:
    gate = asyncio.Semaphore(concurrency)

    async def one(row: dict[str, Any], i: int) -> ScoredTurn:
        message = row["messages"][i]
        async with gate:
            [score] = await critic.score(row["messages"][:i], [message], row.get("tools"))
        writes = write_calls(message)
        gold = gold_of(row)
        bad = (not all(matches_gold(c, gold) for c in writes)) if writes and gold else None
        reward = row.get("reward")
        return ScoredTurn(row["id"], None if reward is None else float(reward), score, bool(writes), bad)

    jobs = [one(row, i) for row in rows for i, m in enumerate(row["messages"])
            if m.get("role") == "assistant" and i > 0]
    return list(await asyncio.gather(*jobs))


def report(turns: list[ScoredTurn], thresholds=DEFAULT_THRESHOLDS) -> list[dict[str, Any]]:
    failed = [t for t in turns if t.reward is not None and t.reward < 1]
    solved = [t for t in turns if t.reward is not None and t.reward >= 1]
    judged = [t for t in turns if t.bad_write is not None]
    rows = []
    for th in thresholds:
        flagged_bad = sum(t.score < th and bool(t.bad_write) for t in judged)
        flagged = sum(t.score < th for t in judged)
        bad = sum(bool(t.bad_write) for t in judged)
        convs: dict[str, tuple[bool, float]] = {}  # conversation -> (any turn flagged, reward)
        for t in failed + solved:
            reward = t.reward or 0.0  # not None: failed and solved have an outcome
            convs[t.conversation] = (convs.get(t.conversation, (False, reward))[0] or t.score < th, reward)
        rows.append({
            "threshold": th,
            "turns_flagged": sum(t.score < th for t in turns),
            "flag_rate_failed": _share([t.score < th for t in failed]),
            "flag_rate_solved": _share([t.score < th for t in solved]),
            "conversations_flagged_failed": _share([f for f, r in convs.values() if r < 1]),
            "conversations_flagged_solved": _share([f for f, r in convs.values() if r >= 1]),
            "write_precision": flagged_bad / flagged if flagged else None,
            "write_recall": flagged_bad / bad if bad else None,
        })
    return rows


def unlabelled(turns: list[ScoredTurn]) -> dict[str, int]:
    """How many conversations (and their turns) had no outcome and were left out of the outcome rates."""
    left_out = [t for t in turns if t.reward is None]
    return {"conversations": len({t.conversation for t in left_out}), "turns": len(left_out)}


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def format_table(rows: list[dict[str, Any]], turns: list[ScoredTurn]) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    judged = sum(t.bad_write is not None for t in turns)
    left_out = unlabelled(turns)
    without = ""
    if left_out["conversations"]:
        c, n = left_out["conversations"], left_out["turns"]
        without = (f"; {c} conversation{'s' * (c != 1)} ({n} turn{'s' * (n != 1)}) without an outcome, "
                   "left out of the outcome rates")
    head = (f"{len(turns)} assistant turns in {len({t.conversation for t in turns})} conversations; "
            f"{judged} write calls judged against gold actions ({sum(bool(t.bad_write) for t in turns)} bad)"
            f"{without}\n"
            f"{'thresh':>7}{'flagged':>9}{'rate fail':>11}{'rate ok':>9}{'conv fail':>11}{'conv ok':>9}"
            f"{'w.prec':>8}{'w.recall':>9}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['threshold']:>7.2f}{r['turns_flagged']:>9}{f(r['flag_rate_failed']):>11}"
                     f"{f(r['flag_rate_solved']):>9}{f(r['conversations_flagged_failed']):>11}"
                     f"{f(r['conversations_flagged_solved']):>9}{f(r['write_precision']):>8}"
                     f"{f(r['write_recall']):>9}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Writes the threshold curves as a PNG; False when matplotlib (the `train` extra) is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    th = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("flag_rate_failed", "turn flag rate, failed conversations"),
                       ("flag_rate_solved", "turn flag rate, solved conversations"),
                       ("write_precision", "write-call flag precision (vs gold)"),
                       ("write_recall", "write-call flag recall (vs gold)")):
        ax.plot(th, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=label)
    ax.set_xlabel("intervene_threshold")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("turngate replay: what the gate would have flagged")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def load_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        with path.open() as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows
