"""The turn as the client sees it: a ChatCompletion body, x-turngate-* headers, SSE chunks (a gated
reply replayed, a passthrough stream relayed), and the error event that ends a stream that failed.

What turngate does not decide about passes unchanged: the upstream's body fields (service_tier,
system_fingerprint, vendor fields), the chosen choice's own fields (logprobs), and its call's
forwarded headers (service.upstream.client.forwarded_headers). What it decides: the one choice
(index 0), its message, `usage` (the whole turn's: reported_usage), id/created/model when the
upstream gave none, and leaving out what turngate asked for and the client did not (logprobs a
route keeps, the usage chunk of a stream).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from service import wirejson
from service.api.errors import APIError, from_rejection, from_upstream
from service.gate.pipeline import TurnRejected, TurnResult
from service.upstream.client import UpstreamError
from service.upstream.streaming import Event

log = logging.getLogger(__name__)

_CONTENT_PIECE = 64  # characters per replayed content delta
_LARGE_FIELD_BYTES = 1024  # a top-level field larger than this is replayed on the first chunk only


def completion_body(result: TurnResult, alias: str, logprobs: bool = True,
                    usage_reported: str = "billed") -> dict[str, Any]:
    """The chosen reply as a ChatCompletion; `logprobs`: whether the client asked for them;
    `usage_reported`: the route's choice of usage (reported_usage)."""
    chosen, record = result.chosen, result.record
    sample = chosen.sample
    upstream = dict(sample.response) if sample else {}
    choice = {"logprobs": None, **(sample.choice if sample else {}), "index": 0, "message": chosen.record.message,
              "finish_reason": chosen.record.finish_reason or "stop"}
    if not logprobs:
        choice["logprobs"] = None  # the route asked the upstream for them, to keep; the client did not
    return {
        **upstream,
        "id": upstream.get("id") or "chatcmpl-" + record.turn_id.removeprefix("turn-"),
        "object": "chat.completion",
        "created": upstream.get("created") or int(record.created_at),
        "model": upstream.get("model") or alias,
        "choices": [choice],
        "usage": reported_usage(result, upstream.get("usage"), usage_reported),
    }


def reported_usage(result: TurnResult, chosen: Any, usage_reported: str) -> Any:
    """The reply's `usage`. "billed": every call of the turn summed, details included, so a client or a
    spend tracker that reads usage counts what the upstream billed; the chosen candidate's call's own
    usage under `chosen` and the candidates sampled under `candidates` (extra fields: OpenAI's SDKs
    keep them). "chosen": the chosen call's usage as the upstream sent it. A passthrough turn made
    one call: its usage is the upstream's, unchanged."""
    billed = result.billed
    if usage_reported == "chosen" or result.record.mode == "passthrough" or billed is None or billed.usage is None:
        return chosen
    return {**billed.usage, "chosen": chosen, "candidates": billed.candidates}


def decision_headers(result: TurnResult) -> dict[str, str]:
    """x-turngate-* and Server-Timing, after the chosen call's forwarded upstream headers."""
    record, chosen = result.record, result.chosen
    headers = {
        **(chosen.sample.headers if chosen.sample else {}),
        "x-turngate-turn-id": record.turn_id,
        "x-turngate-decision": record.decision,
        "x-turngate-candidates": str(sum(1 for c in record.candidates if c.upstream_latency_ms is not None)),
        "x-turngate-rounds": str(record.rounds),
        # Standard Server-Timing: lets clients and benchmarks split the latency per request. `upstream`:
        # the time the turn's calls were out, request written to reply read (UpstreamWait), so
        # total - upstream - critic is turngate's own time.
        "server-timing": f"upstream;dur={record.latency_upstream_ms or 0:.3f}, "
                         f"critic;dur={record.latency_critic_ms or 0:.3f}, "
                         f"total;dur={record.latency_total_ms or 0:.3f}",
    }
    if chosen.record.score is not None:
        headers["x-turngate-score"] = f"{chosen.record.score:.4f}"
    billed = result.billed.total_tokens if result.billed is not None else None
    if billed is not None:
        headers["x-turngate-billed-tokens"] = str(billed)  # every call's, whatever usage_reported says
    return headers


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def relay_headers(record, upstream: dict[str, str]) -> dict[str, str]:
    """A passthrough stream's headers: known before its reply, so no score and no Server-Timing."""
    return {**upstream, "x-turngate-turn-id": record.turn_id, "x-turngate-decision": "passthrough",
            "x-turngate-candidates": "1", "x-turngate-rounds": "1"}


def as_comment(headers: dict[str, str]) -> bytes:
    """Headers that come too late for the status line, as one SSE comment."""
    return (": " + " ".join(f"{k}={v}" for k, v in headers.items()) + "\n\n").encode()


async def relayed(events: AsyncIterator[Event], include_usage: bool, logprobs: bool) -> AsyncGenerator[bytes, None]:
    """A passthrough stream's events as the upstream wrote them, less what turngate asked for and
    the client did not: the usage chunk (turngate always asks, to count tokens) and the logprobs a
    route keeps."""
    async for event in events:
        chunk = event.data
        if isinstance(chunk, dict):
            choices = chunk.get("choices")
            if not include_usage and chunk.get("usage") and not choices:
                continue
            if not logprobs and isinstance(choices, list) and any(
                    isinstance(c, dict) and c.get("logprobs") for c in choices):
                yield sse({**chunk, "choices": [{**c, "logprobs": None} if isinstance(c, dict) else c
                                                for c in choices]})
                continue
        yield event.raw


def error_event(exc: BaseException) -> bytes:
    """The SSE event that ends a stream that failed after it began, in OpenAI's error envelope; the
    openai client raises it as APIError. An upstream's own error event is relayed as it was."""
    if isinstance(exc, UpstreamError) and exc.kind == "stream_error" and isinstance(exc.body, dict):
        return sse(exc.body)
    if isinstance(exc, UpstreamError):
        return sse(from_upstream(exc).body())
    if isinstance(exc, TurnRejected):
        return sse(from_rejection(exc).body())
    log.error("a stream failed after it began", exc_info=exc)
    return sse(APIError(500, "internal error in turngate; the reply is incomplete", "server_error",
                        "internal_error").body())


def replay_chunks(body: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """Replays a complete ChatCompletion as the chunk sequence an OpenAI stream would have sent:
    every top-level field (service_tier, system_fingerprint, ...) on each chunk (one over 1 KB on the
    first only), content cut along its logprobs' tokens where it has them (each chunk with its
    tokens' logprobs), tool calls (function or custom) as deltas."""
    choice = body["choices"][0]
    message = choice["message"]
    base = {k: v for k, v in body.items() if k not in ("choices", "usage")}
    base.update(object="chat.completion.chunk", created=body.get("created") or int(time.time()))
    if include_usage:
        base["usage"] = None  # as OpenAI does: null on every chunk but the last
    # What OpenAI repeats on every chunk is small (ids, model, fingerprint, tier). An upstream's large
    # extra field repeated on every 64-character piece would multiply the reply by its length: it
    # goes on the first chunk only.
    large = {k: v for k, v in base.items() if len(wirejson.dumps(v)) > _LARGE_FIELD_BYTES}
    first = base
    base = {k: v for k, v in base.items() if k not in large}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, head: dict = base) -> bytes:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                         "logprobs": logprobs}]})

    yield chunk({"role": "assistant", "content": ""}, head=first)
    logprobs = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
    content = message.get("content")
    pieces = _content_pieces(content if isinstance(content, str) else "", logprobs.get("content"))
    for text, entries in pieces:
        yield chunk({"content": text}, logprobs={"content": entries, "refusal": None} if entries else None)
    if message.get("refusal"):
        refusal = logprobs.get("refusal")
        yield chunk({"refusal": message["refusal"]},
                    logprobs={"content": None, "refusal": refusal} if refusal else None)
    for i, call in enumerate(message.get("tool_calls") or []):
        kind = "custom" if call.get("type") == "custom" else "function"
        text_key = "input" if kind == "custom" else "arguments"
        spec = call.get(kind) or {}
        yield chunk({"tool_calls": [{"index": i, "id": call.get("id"), "type": kind,
                                     kind: {"name": spec.get("name"), text_key: ""}}]})
        text = spec.get(text_key) or ""
        for j in range(0, len(text), _CONTENT_PIECE):
            yield chunk({"tool_calls": [{"index": i, kind: {text_key: text[j:j + _CONTENT_PIECE]}}]})
    unplaced = logprobs.get("content") if not pieces and logprobs.get("content") else None
    yield chunk({}, choice.get("finish_reason") or "stop",
                logprobs={"content": unplaced, "refusal": None} if unplaced else None)
    if include_usage and body.get("usage"):
        yield sse({**base, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")


def _content_pieces(content: str, entries: Any) -> list[tuple[str, list | None]]:
    """Content in deltas of about _CONTENT_PIECE characters, each with the logprobs of its tokens.
    Cut along the tokens where they spell the content; otherwise all logprobs go with the first."""
    pieces: list[tuple[str, list | None]] = []
    if isinstance(entries, list) and entries and all(isinstance(e, dict) and isinstance(e.get("token"), str)
                                                     for e in entries) \
            and "".join(e["token"] for e in entries) == content:
        text, group = "", []
        for e in entries:
            text += e["token"]
            group.append(e)
            if len(text) >= _CONTENT_PIECE:
                pieces.append((text, group))
                text, group = "", []
        if group:
            pieces.append((text, group))
        return pieces
    pieces += [(content[i:i + _CONTENT_PIECE], None) for i in range(0, len(content), _CONTENT_PIECE)]
    if pieces and isinstance(entries, list) and entries:
        pieces[0] = (pieces[0][0], entries)
    return pieces
