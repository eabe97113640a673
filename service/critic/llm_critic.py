"""The LLM critic: a language model behind any OpenAI-compatible endpoint judges all candidates of
a turn in one request and answers, with structured output, a score in 0..1 and a one-sentence
reason for each.

The gate's cascade calls it when the encoder critic is unsure (service/gate/judging.py); the
teacher labelling job may call it on logged turns. Whatever the judge does (answers late, answers
garbage, refuses, fails), `judge` either returns a whole, checked Judgement or raises JudgeError:
the caller falls back to the encoder.

What it sees is bounded, because a client controls the conversation: the system prompt's head, the
newest messages up to CONTEXT_CHARS (each message cut to MESSAGE_CHARS), the declared tools up to
TOOLS_CHARS, every candidate cut to CANDIDATE_CHARS.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from service.gate.usage import is_token_count
from service.settings import LLMCriticSettings
from service.telemetry import metrics

Message = dict[str, Any]
Outcome = Literal["timeout", "error", "invalid"]

SYSTEM_HEAD_CHARS = 6_000  # the system prompt: the agent's policy, which the judge needs most
CONTEXT_CHARS = 24_000  # the rest of the conversation, newest messages first
MESSAGE_CHARS = 4_000  # any one message of it
TOOLS_CHARS = 12_000  # the declared tools, as compact JSON
CANDIDATE_CHARS = 4_000  # each candidate
REASON_CHARS = 400  # a reason kept from the judge's answer

INSTRUCTIONS = """\
You review the next step an AI agent proposes, before it is carried out. You are shown the \
conversation so far, the tools the agent may call, and several candidate next steps sampled from \
the agent. Judge each candidate on its own merits as the agent's next turn:
- it calls the right tool, or replies in text when no tool is needed (asking the user for missing \
information or a confirmation is a good step);
- every argument is grounded in the conversation: ids, names, dates and amounts the user or a tool \
result gave, never invented;
- it takes steps in the right order (look up before acting on what the lookup returns);
- it takes no action that changes state (cancel, book, pay, modify, delete, send) which the user \
has not explicitly confirmed;
- it follows the system prompt's policy.
Score each candidate from 0 (wrong or harmful) to 1 (exactly the right next step) and give one \
sentence saying what is right or wrong with it, concretely (name the tool, the argument, the \
missing confirmation). Score every candidate, by its index."""

RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "candidate_scores",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["candidates"],
            "properties": {"candidates": {"type": "array", "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["index", "score", "reason"],
                "properties": {"index": {"type": "integer"}, "score": {"type": "number"},
                               "reason": {"type": "string"}},
            }}},
        },
    },
}


class JudgeError(Exception):
    """The judge gave no usable judgement. `kind`: timeout, error (HTTP/connection) or invalid (an
    answer that is not one score and reason per candidate). The tokens it billed, where it said."""

    def __init__(self, kind: Outcome, message: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        super().__init__(message)
        self.kind: Outcome = kind
        self.message = message
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


@dataclass(frozen=True)
class CandidateJudgement:
    score: float  # 0..1
    reason: str  # one sentence


@dataclass(frozen=True)
class Judgement:
    candidates: list[CandidateJudgement]  # in the order of the candidates judged
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    model: str
    rubric_version: str

    @property
    def scores(self) -> list[float]:
        return [c.score for c in self.candidates]

    @property
    def labeler(self) -> str:
        """How candidate_labels names this judge: "judge:<model>@<rubric_version>"."""
        return f"judge:{self.model}@{self.rubric_version}"


class LLMCritic:
    """One judge endpoint. `route`: the metric label, None for no metrics (an offline job)."""

    def __init__(self, settings: LLMCriticSettings, http: httpx.AsyncClient, route: str | None = None) -> None:
        self.settings = settings
        self.http = http
        self.route = route

    async def judge(self, messages: list[Message], candidates: list[Message],
                    tools: list[dict[str, Any]] | None = None, timeout_s: float | None = None) -> Judgement:
        """Scores and reasons for `candidates`, within `timeout_s` (default: the settings'); JudgeError
        otherwise. Counted in the turngate_llm_critic_* metrics when the critic has a route."""
        started = time.perf_counter()
        try:
            got = await self._judge(messages, candidates, tools, timeout_s or self.settings.timeout_s, started)
        except JudgeError as e:
            self._count(e.kind, time.perf_counter() - started, e.prompt_tokens, e.completion_tokens)
            raise
        self._count("ok", got.latency_s, got.prompt_tokens, got.completion_tokens)
        return got

    async def _judge(self, messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None,
                     timeout_s: float, started: float) -> Judgement:
        if not candidates:
            raise JudgeError("invalid", "no candidates to judge")
        cfg = self.settings
        payload = request_body(cfg.model, messages, candidates, tools, cfg.rubric)
        # ASCII JSON: a lone surrogate a client sent travels escaped instead of failing the encoding.
        content = json.dumps(payload, separators=(",", ":"), default=str).encode()
        headers = {"content-type": "application/json"}
        if cfg.api_key:
            headers["authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.http.post(url, content=content, headers=headers, timeout=timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            raise JudgeError("timeout", f"the judge did not answer within {timeout_s:g}s") from None
        except httpx.HTTPError as e:  # the exception's text may hold the URL, never the key
            raise JudgeError("error", f"the judge is unreachable: {type(e).__name__}") from None
        latency = time.perf_counter() - started
        if resp.status_code >= 400:
            raise JudgeError("error", f"the judge answered HTTP {resp.status_code}")
        return parse(resp.content, len(candidates), latency, cfg)

    def _count(self, outcome: str, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        if self.route is None:
            return
        metrics.LLM_CRITIC_REQUESTS.labels(self.route, outcome).inc()
        metrics.LLM_CRITIC_LATENCY.labels(self.route).observe(latency_s)
        for kind, value in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if value:
                metrics.LLM_CRITIC_TOKENS.labels(self.route, kind).inc(value)


# -- the request ---------------------------------------------------------------------------------

def request_body(model: str, messages: list[Message], candidates: list[Message],
                 tools: list[dict[str, Any]] | None, rubric: str = "") -> dict[str, Any]:
    """The Chat Completions body asking `model` to judge `candidates` (index = position in the list): the
    serving critic and the offline labeller (`turngate critic label`) send this one request."""
    return {"model": model, "temperature": 0, "response_format": RESPONSE_FORMAT,
            "messages": prompt(messages, candidates, tools, rubric)}


def prompt(messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None,
           rubric: str = "") -> list[Message]:
    """The judge's messages: the instructions (and the route's rubric), then one user message with
    the tools, the conversation and the numbered candidates."""
    system = INSTRUCTIONS + (f"\n\nThe operator's rubric for this agent:\n{rubric.strip()}" if rubric.strip() else "")
    parts = ["## Tools the agent may call", render_tools(tools) or "(none: the agent can only reply in text)",
             "## Conversation so far (oldest first)", render_conversation(messages),
             f"## Candidate next steps ({len(candidates)}; indexes 0 to {len(candidates) - 1})"]
    parts += [f"### Candidate {i}\n{render_step(c)}" for i, c in enumerate(candidates)]
    parts.append(f"Score all {len(candidates)} candidates: one entry per index, 0 to {len(candidates) - 1}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...cut]"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def render_step(message: Message, limit: int = CANDIDATE_CHARS) -> str:
    """An assistant message as text: its words, then each tool call as name(arguments)."""
    if not isinstance(message, dict):
        return "(not a message)"
    lines = []
    text = _text(message.get("content")).strip()
    if text:
        lines.append(text)
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            args = fn.get("arguments")
            lines.append(f"CALL {fn.get('name')}({args if isinstance(args, str) else json.dumps(args)})")
    if isinstance(message.get("refusal"), str):
        lines.append(f"REFUSAL {message['refusal']}")
    return _clip("\n".join(lines) or "(empty)", limit)


def _render_message(m: Any) -> str:
    if not isinstance(m, dict):
        return "[?] (not a message)"
    role = str(m.get("role") or "user")
    if role == "assistant":
        return "[assistant] " + render_step(m, MESSAGE_CHARS)
    if role == "tool":
        return "[tool result] " + _clip(_text(m.get("content")), MESSAGE_CHARS)
    return f"[{role}] " + _clip(_text(m.get("content")), MESSAGE_CHARS)


def render_conversation(messages: list[Message], limit: int = CONTEXT_CHARS) -> str:
    """The system prompt's head, then the newest messages that fit in `limit` characters."""
    msgs = list(messages or [])
    head = []
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") in ("system", "developer"):
        head.append("[system] " + _clip(_text(msgs[0].get("content")), SYSTEM_HEAD_CHARS))
        msgs = msgs[1:]
    tail: list[str] = []
    used = 0
    for m in reversed(msgs):
        line = _render_message(m)
        if used + len(line) > limit:
            tail.append(f"[... {len(msgs) - len(tail)} earlier messages left out]")
            break
        tail.append(line)
        used += len(line)
    return "\n".join(head + tail[::-1]) or "(empty)"


def render_tools(tools: list[dict[str, Any]] | None, limit: int = TOOLS_CHARS) -> str:
    lines, used = [], 0
    for tool in tools or []:
        spec = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(spec, dict):
            continue
        line = json.dumps({k: spec[k] for k in ("name", "description", "parameters") if k in spec},
                          separators=(",", ":"), default=str)
        if used + len(line) > limit:
            lines.append("(more tools left out)")
            break
        lines.append(line)
        used += len(line)
    return "\n".join(lines)


# -- the answer ----------------------------------------------------------------------------------

def _tokens(usage: Any, name: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if is_token_count(value) else 0


def parse(raw: bytes, n: int, latency_s: float, cfg: LLMCriticSettings) -> Judgement:
    """The judge's chat completion -> a Judgement with one entry per candidate; JudgeError("invalid")
    for anything else: not JSON, no choice, a refusal, a wrong count, a missing or repeated index,
    a score that is not a number in 0..1."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise JudgeError("invalid", "the judge's reply is not JSON") from None
    usage = body.get("usage") if isinstance(body, dict) else None
    pt, ct = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")

    try:
        judged = read_reply(body, n)
    except JudgeError as e:
        raise JudgeError("invalid", e.message, pt, ct) from None
    return Judgement(judged, pt, ct, latency_s, cfg.model, cfg.rubric_version)


def read_reply(body: Any, n: int) -> list[CandidateJudgement]:
    """The judgements in a chat completion's first message, one per candidate 0..n-1 in index order;
    JudgeError("invalid") for no message, a refusal, or an answer read_answer refuses."""
    choices = body.get("choices") if isinstance(body, dict) else None
    message = choices[0].get("message") if isinstance(choices, list) and choices and isinstance(
        choices[0], dict) else None
    if not isinstance(message, dict):
        raise JudgeError("invalid", "the judge's reply has no message")
    if message.get("refusal"):
        raise JudgeError("invalid", "the judge refused")
    content = message.get("content")
    if not isinstance(content, str):
        raise JudgeError("invalid", "the judge's answer is not text")
    return read_answer(content, n)


def read_answer(content: str, n: int) -> list[CandidateJudgement]:
    """The judge's JSON answer -> one judgement per candidate 0..n-1, in index order."""
    text = content.strip()
    if text.startswith("```"):  # some models fence JSON even when asked for a schema
        text = text.strip("`").removeprefix("json").strip()
    try:
        answer = json.loads(text)
    except (ValueError, TypeError):
        raise JudgeError("invalid", "the judge's answer is not JSON") from None
    entries = answer.get("candidates") if isinstance(answer, dict) else None
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else "no"
        raise JudgeError("invalid", f"the judge scored {got} candidates, not {n}")
    out: list[CandidateJudgement | None] = [None] * n
    for e in entries:
        index, score, reason = (e.get(k) for k in ("index", "score", "reason")) if isinstance(e, dict) else (
            None, None, None)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n or out[index] is not None:
            raise JudgeError("invalid", f"the judge's indexes are not 0 to {n - 1}, each once")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score) \
                or not 0 <= score <= 1:
            raise JudgeError("invalid", f"the judge's score for candidate {index} is not a number in 0..1")
        text = " ".join(reason.split()) if isinstance(reason, str) else ""
        out[index] = CandidateJudgement(float(score), _clip(text.replace("\x00", ""), REASON_CHARS))
    return [c for c in out if c is not None]
