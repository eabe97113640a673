"""One judge request per turn: the conversation, the tools and every candidate in one Chat Completions
call with structured output, and the parse of its reply. Pure functions, no I/O: the offline labeller
(`turngate critic label`) sends it; an online LLM critic can send the very same body.

The reply is `{"candidates": [{"index", "score", "reason"}]}`: a score in [0, 1] and a one-sentence
reason for each candidate. Anything else (not JSON, a missing or repeated index, a score out of range)
is a JudgeError, so a garbage reply never becomes a label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

INSTRUCTIONS = (
    "You review the candidate replies an AI assistant could send next in the conversation below. "
    "Score every candidate from 0 (wrong, harmful or useless) to 1 (correct and the best next step), "
    "judging each on its own merits against the conversation and the tools, and give one sentence "
    "saying why. Tool calls must use declared tools with arguments the conversation supports. "
    "Answer with JSON only: {\"candidates\": [{\"index\": int, \"score\": number, \"reason\": string}]}, "
    "one entry per candidate.")

RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["candidates"],
    "properties": {"candidates": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["index", "score", "reason"],
        "properties": {"index": {"type": "integer"}, "score": {"type": "number"}, "reason": {"type": "string"}}}}}}

MAX_REASON_CHARS = 1000  # a label's reason is one sentence; a runaway one is cut, not refused


class JudgeError(ValueError):
    """The judge's reply is not a usable judgement."""


@dataclass(frozen=True)
class Judgement:
    index: int
    score: float
    reason: str


def judge_body(model: str, messages: list[Message], candidates: list[Message],
               tools: list[dict[str, Any]] | None = None, rubric: str = "") -> dict[str, Any]:
    """The Chat Completions body asking `model` to judge `candidates` (index = position in the list)."""
    system = INSTRUCTIONS + (f"\n\nRubric:\n{rubric.strip()}" if rubric.strip() else "")
    case = {"conversation": messages, "tools": tools or [],
            "candidates": [{"index": i, "reply": c} for i, c in enumerate(candidates)]}
    return {"model": model, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": json.dumps(case, ensure_ascii=False)}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "candidate_scores", "strict": True, "schema": RESPONSE_SCHEMA}}}


def parse_reply(reply: Any, n: int) -> list[Judgement]:
    """The judgements in a Chat Completions reply, one per candidate 0..n-1, in index order."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError("the reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise JudgeError("the reply's content is not text")
    return parse_content(content, n)


def parse_content(content: str, n: int) -> list[Judgement]:
    text = content.strip()
    if text.startswith("```"):  # some models fence JSON even when asked for a schema
        text = text.strip("`").removeprefix("json").strip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise JudgeError(f"the reply is not JSON: {content[:80]!r}") from None
    entries = doc.get("candidates") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise JudgeError("the reply has no `candidates` list")
    found: dict[int, Judgement] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise JudgeError("a `candidates` entry is not an object")
        index, score, reason = e.get("index"), e.get("score"), e.get("reason")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
            raise JudgeError(f"index {index!r} is not a candidate (0..{n - 1})")
        if index in found:
            raise JudgeError(f"candidate {index} is judged twice")
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score) \
                or not 0 <= score <= 1:
            raise JudgeError(f"candidate {index}: score {score!r} is not a number in [0, 1]")
        found[index] = Judgement(index, float(score), str(reason or "")[:MAX_REASON_CHARS])
    if len(found) != n:
        raise JudgeError(f"the reply judges {len(found)} of {n} candidates")
    return [found[i] for i in range(n)]
