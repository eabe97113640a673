"""The offline labeller's judge request (`turngate critic label`): the very prompt, response format
and parse the serving LLM critic uses (service.critic.llm_critic), so teacher labels and online
judgements answer the same question. Pure functions, no I/O."""

from __future__ import annotations

from typing import Any

from service.critic.llm_critic import RESPONSE_FORMAT, CandidateJudgement, JudgeError, prompt, read_answer, read_reply

__all__ = ["CandidateJudgement", "JudgeError", "judge_body", "parse_content", "parse_reply"]

Message = dict[str, Any]


def judge_body(model: str, messages: list[Message], candidates: list[Message],
               tools: list[dict[str, Any]] | None = None, rubric: str = "") -> dict[str, Any]:
    """The Chat Completions body asking `model` to judge `candidates` (index = position in the list)."""
    return {"model": model, "temperature": 0, "messages": prompt(messages, candidates, tools, rubric),
            "response_format": RESPONSE_FORMAT}


def parse_reply(reply: Any, n: int) -> list[CandidateJudgement]:
    """The judgements in a Chat Completions reply, one per candidate 0..n-1, in index order."""
    return read_reply(reply, n)


def parse_content(content: str, n: int) -> list[CandidateJudgement]:
    return read_answer(content, n)
