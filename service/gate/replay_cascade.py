"""`turngate replay --cascade ...`: what a cascade setting would have cost and changed on logged traffic.

The input is `turngate export` JSONL: every turn's candidates with the scores and features the gate
logged. Per turn, service.gate.cascade.doubt (the gate's one rule) is asked about the gate's pick:
the best-scored candidate that passed the structural checks, with its `call_support` feature as the
agreement. Candidates of the first sampling round only: that is where the gate ranks first.

Lines without `turns` (trajectory JSONL: one reply a turn) are lone turns: no margin, no agreement,
only `on_write` applies.

The budget is applied in the turns' logged order (by `created_at`): a turn in doubt goes to the
judge while the judged share of the turns so far, this one included, stays within `max_share`,
and (where set and the turns carry times) while the judge tokens of the hour up to it stay within
`max_tokens_per_hour`. Turns in doubt but over budget are *cut*: the encoder decides them.

Judge tokens are an estimate (no judge is called): the prompt is the turn's context messages, the
declared tools and every candidate as compact JSON, at 4 characters a token; the reply is
``REPLY_TOKENS_PER_CANDIDATE`` a candidate (a score and a one-sentence reason). The rubric's own
length is not counted: add it once per judged turn.

Where every candidate of a judged turn carries a label, the pick the judge would make is known:
the judge's labels (`candidate_labels` rows, labeler "judge:..."), else the others (a structural
veto is 0, the chosen reply carries the conversation's outcome). Without them the report says so.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from service.gate.cascade import Doubt, doubt, writes
from service.settings import CascadeSettings

CHARS_PER_TOKEN = 4
REPLY_TOKENS_PER_CANDIDATE = 40
REASONS: tuple[Doubt, ...] = ("margin", "agreement", "write")


@dataclass
class LoggedTurn:
    """One turn as the cascade would have seen it."""

    conversation: str
    created_at: float | None  # seconds since the epoch; None for trajectory lines
    replies: list[dict[str, Any]]  # first-round candidates; a lone turn: its one reply
    scores: list[float] | None  # None: no critic score was logged
    ok: list[bool]  # passed the structural checks
    agreement: list[float | None]  # each candidate's call_support (None: unknown or a text reply)
    labels: list[float | None]  # 0..1 where known
    prompt_chars: int  # context + tools + every candidate, as compact JSON
    lone: bool

    def pick(self) -> int:
        """The gate's pick: the best score among candidates that passed the checks (ties: the earlier)."""
        pickable = [i for i, ok in enumerate(self.ok) if ok] or list(range(len(self.replies)))
        if self.scores is None:
            return pickable[0]
        scores = self.scores
        return max(pickable, key=lambda i: (scores[i], -i))

    def doubt(self, cfg: CascadeSettings) -> Doubt | None:
        top = self.pick()
        if self.scores is None or len(self.replies) < 2:  # no ranking to doubt: only on_write applies
            return doubt([1.0], 0, None, writes(self.replies[top]), cfg)
        pickable = [i for i, ok in enumerate(self.ok) if ok] or list(range(len(self.replies)))
        return doubt([self.scores[i] for i in pickable], pickable.index(top), self.agreement[top],
                     writes(self.replies[top]), cfg, [self.replies[i] for i in pickable])

    def judge_tokens(self) -> int:
        return self.prompt_chars // CHARS_PER_TOKEN + REPLY_TOKENS_PER_CANDIDATE * len(self.replies)


def parse_setting(text: str) -> CascadeSettings:
    """"margin=0.1,min_agreement=0.5,on_write=true,max_share=0.2" (unset keys: the defaults)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {part.strip()!r}")
        fields[key.strip()] = value.strip()
    try:
        return CascadeSettings.model_validate(fields)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None


def parse_settings(values: Iterable[str]) -> list[CascadeSettings]:
    """Each --cascade value; one value may hold several settings separated by ';'."""
    return [parse_setting(s) for v in values for s in v.split(";") if s.strip()]


def describe(cfg: CascadeSettings) -> str:
    tokens = f",max_tokens_per_hour={cfg.max_tokens_per_hour}" if cfg.max_tokens_per_hour else ""
    return (f"margin={cfg.margin:g},min_agreement={cfg.min_agreement:g},on_write={str(cfg.on_write).lower()},"
            f"max_share={cfg.max_share:g}{tokens}")


# -- reading logged turns --------------------------------------------------------------------------

def _chars(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


def _time(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp() if isinstance(text, str) else None
    except ValueError:
        return None


def _agreement(features: Any, n: int) -> float | None:
    if n < 2 or not isinstance(features, dict) or features.get("is_text"):
        return None
    value = features.get("call_support")
    return float(value) if isinstance(value, (int, float)) else None


def _carried_labels(turn: dict[str, Any], candidate: dict[str, Any]) -> dict[str, float]:
    """labeler -> score, from the candidate's `labels` ({labeler: score} or [{labeler, score}]) or the
    turn's `candidate_labels` rows ({candidate_idx, labeler, score})."""
    out: dict[str, float] = {}
    rows: list[Any] = []
    own = candidate.get("labels")
    if isinstance(own, dict):
        rows += [{"labeler": k, "score": v} for k, v in own.items()]
    elif isinstance(own, list):
        rows += own
    rows += [r for r in turn.get("candidate_labels") or []
             if isinstance(r, dict) and r.get("candidate_idx") == candidate.get("index")]
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("labeler"), str) and isinstance(r.get("score"), (int, float)):
            out[r["labeler"]] = float(r["score"])
    return out


def _label(turn: dict[str, Any], candidate: dict[str, Any], reward: Any) -> float | None:
    carried = _carried_labels(turn, candidate)
    judges = sorted(k for k in carried if k.startswith("judge:"))
    if judges:
        return carried[judges[-1]]
    for labeler in ("veto", "outcome"):
        if labeler in carried:
            return carried[labeler]
    if candidate.get("verdict") == "veto":
        return 0.0
    if candidate.get("index") == turn.get("chosen_index") and isinstance(reward, (int, float)):
        return float(reward)
    return None


def exported_turns(row: dict[str, Any]) -> list[LoggedTurn]:
    """A `turngate export` line: each turn's first-round candidates, in the context before it."""
    messages = row.get("messages") or []
    starts = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    tools_chars = _chars(row["tools"]) if row.get("tools") else 0
    out = []
    for k, t in enumerate(row.get("turns") or []):
        cands = [c for c in t.get("candidates") or [] if isinstance(c, dict) and (c.get("round") or 0) == 0
                 and isinstance(c.get("message"), dict)]
        if not cands:
            continue
        at = t.get("index") if isinstance(t.get("index"), int) else k
        context = messages[:starts[at]] if at < len(starts) else messages
        scores = [c["score"] for c in cands if isinstance(c.get("score"), (int, float))]
        replies = [c["message"] for c in cands]
        out.append(LoggedTurn(
            str(row.get("conversation_id") or row.get("id")), _time(t.get("created_at")), replies,
            [float(s) for s in scores] if len(scores) == len(cands) else None,  # all scored, or none usable
            [c.get("verdict") != "veto" for c in cands], [_agreement(c.get("features"), len(cands)) for c in cands],
            [_label(t, c, row.get("reward")) for c in cands],
            _chars(context) + tools_chars + sum(_chars(r) for r in replies), lone=False))
    return out


def lone_turns(row: dict[str, Any]) -> list[LoggedTurn]:
    """A trajectory line: every assistant message after the first message, alone."""
    messages = row.get("messages") or []
    tools_chars = _chars(row["tools"]) if row.get("tools") else 0
    return [LoggedTurn(str(row.get("id")), None, [m], None, [True], [None], [None],
                       _chars(messages[:i]) + tools_chars + _chars(m), lone=True)
            for i, m in enumerate(messages) if i > 0 and isinstance(m, dict) and m.get("role") == "assistant"]


def load_turns(rows: list[dict[str, Any]]) -> list[LoggedTurn]:
    """Every turn, logged turns in the order they were served (lone turns keep the file's order)."""
    turns = [t for row in rows for t in (exported_turns(row) if "turns" in row else lone_turns(row))]
    return sorted(turns, key=lambda t: t.created_at if t.created_at is not None else float("-inf"))


# -- the replay ------------------------------------------------------------------------------------

def replay(turns: list[LoggedTurn], cfg: CascadeSettings) -> dict[str, Any]:
    sent: list[LoggedTurn] = []
    trusted: list[LoggedTurn] = []
    reasons = dict.fromkeys(REASONS, 0)
    cut = {"share": 0, "tokens": 0}
    hour: deque[tuple[float, int]] = deque()  # (time, tokens) of judged turns in the last hour
    in_hour = 0
    for seen, t in enumerate(turns, start=1):
        why = t.doubt(cfg)
        if why is None:
            trusted.append(t)
            continue
        if len(sent) + 1 > cfg.max_share * seen + 1e-9:
            cut["share"] += 1
            trusted.append(t)
            continue
        tokens = t.judge_tokens()
        if cfg.max_tokens_per_hour and t.created_at is not None:
            while hour and hour[0][0] <= t.created_at - 3600:
                in_hour -= hour.popleft()[1]
            if in_hour + tokens > cfg.max_tokens_per_hour:
                cut["tokens"] += 1
                trusted.append(t)
                continue
            hour.append((t.created_at, tokens))
            in_hour += tokens
        reasons[why] += 1
        sent.append(t)
    n = len(turns)
    doubted = len(sent) + cut["share"] + cut["tokens"]
    return {"setting": describe(cfg), "turns": n, "lone_turns": sum(t.lone for t in turns),
            "unscored_turns": sum(t.scores is None and not t.lone for t in turns),
            "doubted": doubted, "sent": len(sent), "share": len(sent) / n if n else 0.0,
            "by_reason": reasons, "cut": cut,
            "judge_tokens": sum(t.judge_tokens() for t in sent),
            "judge_tokens_per_1000_turns": round(1000 * sum(t.judge_tokens() for t in sent) / n) if n else 0,
            "tokens_per_hour_applied": bool(cfg.max_tokens_per_hour) and any(t.created_at is not None for t in turns),
            "picks": _picks(sent, trusted)}


def _picks(sent: list[LoggedTurn], trusted: list[LoggedTurn]) -> dict[str, Any]:
    """On turns whose every candidate is labelled: how the judge's pick would change the encoder's,
    and how often the encoder's pick is among the labels' best where the judge is not called."""
    def labelled(ts: list[LoggedTurn]) -> list[tuple[LoggedTurn, list[float]]]:
        out = []
        for t in ts:
            ys = [x for x in t.labels if x is not None]
            if len(t.replies) > 1 and len(ys) == len(t.labels):
                out.append((t, ys))
        return out

    judged, kept = labelled(sent), labelled(trusted)
    before = [y[t.pick()] for t, y in judged]
    after = [max(y) for _, y in judged]
    agree = [y[t.pick()] == max(y) for t, y in kept]
    return {"judged_labelled": len(judged), "changed": sum(a > b for a, b in zip(after, before)),
            "label_before": sum(before) / len(before) if before else None,
            "label_after": sum(after) / len(after) if after else None,
            "trusted_labelled": len(kept), "trusted_agree": sum(agree) / len(agree) if agree else None}


def format_table(results: list[dict[str, Any]]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    first = results[0]
    lone = (f"; {first['lone_turns']} lone turns (trajectory lines: only on_write applies)"
            if first["lone_turns"] else "")
    unscored = f"; {first['unscored_turns']} without critic scores" if first["unscored_turns"] else ""
    lines = [f"{first['turns']} turns{lone}{unscored}. Judge tokens: (context + tools + candidates as JSON) / "
             f"{CHARS_PER_TOKEN} + {REPLY_TOKENS_PER_CANDIDATE} a candidate, rubric not counted.",
             f"{'setting':<56} {'sent':>6} {'share':>6} {'margin':>7} {'agree.':>7} {'write':>6} "
             f"{'cut':>9} {'tokens/1k turns':>16}"]
    for r in results:
        b = r["by_reason"]
        lines.append(f"{r['setting']:<56} {r['sent']:>6} {r['share']:>6.3f} {b['margin']:>7} {b['agreement']:>7} "
                     f"{b['write']:>6} {str(r['cut']['share']) + '/' + str(r['cut']['tokens']):>9} "
                     f"{r['judge_tokens_per_1000_turns']:>16,}")
    lines.append("")
    if any(r["picks"]["judged_labelled"] or r["picks"]["trusted_labelled"] for r in results):
        lines.append("on turns with a label on every candidate (judge labels, vetoes, the outcome of the reply "
                     "chosen):")
        for r in results:
            p = r["picks"]
            lines.append(f"  {r['setting']}: judged {p['judged_labelled']}, pick changed on {p['changed']} "
                         f"(mean label {f(p['label_before'])} -> {f(p['label_after'])}); trusted "
                         f"{p['trusted_labelled']}, encoder among the labels' best {f(p['trusted_agree'])}")
    elif first["lone_turns"] == first["turns"]:
        lines.append("how the pick would change: nothing to change, every turn has one reply (a judge could "
                     "only veto it)")
    else:
        lines.append("how the pick would change: not shown, no turn has a label on every candidate (run "
                     "`turngate critic label` before exporting, or feed back outcomes and vetoes)")
    lines.append("cut: in doubt but over the budget, max_share / max_tokens_per_hour (the latter only where "
                 "turns carry times); the encoder decides them")
    return "\n".join(lines)
