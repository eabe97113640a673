"""The gated turn as the client sees it: a ChatCompletion body, x-turngate-* headers, SSE chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from service.gate.pipeline import TurnResult

_CONTENT_PIECE = 64  # characters per replayed content delta


def completion_body(result: TurnResult, alias: str) -> dict[str, Any]:
    chosen, record = result.chosen, result.record
    sample = chosen.sample
    upstream = dict(sample.response) if sample else {}
    usage: dict[str, Any] | None
    if sample and sample.completion_tokens is not None:
        usage = {"prompt_tokens": sample.prompt_tokens or 0, "completion_tokens": sample.completion_tokens,
                 "total_tokens": (sample.prompt_tokens or 0) + sample.completion_tokens}
    else:
        usage = upstream.get("usage")
    return {
        **upstream,
        "id": upstream.get("id") or "chatcmpl-" + record.turn_id.removeprefix("turn-"),
        "object": "chat.completion",
        "created": upstream.get("created") or int(record.created_at),
        "model": upstream.get("model") or alias,
        "choices": [{"index": 0, "message": chosen.record.message,
                     "finish_reason": chosen.record.finish_reason or "stop", "logprobs": None}],
        "usage": usage,
    }


def decision_headers(result: TurnResult) -> dict[str, str]:
    record, chosen = result.record, result.chosen
    headers = {
        "x-turngate-turn-id": record.turn_id,
        "x-turngate-decision": record.decision,
        "x-turngate-candidates": str(sum(1 for c in record.candidates if c.upstream_latency_ms is not None)),
        "x-turngate-rounds": str(record.rounds),
        # Standard Server-Timing: lets clients and benchmarks split the latency per request.
        "server-timing": f"upstream;dur={record.latency_upstream_ms or 0:.3f}, "
                         f"critic;dur={record.latency_critic_ms or 0:.3f}, "
                         f"total;dur={record.latency_total_ms or 0:.3f}",
    }
    if chosen.record.score is not None:
        headers["x-turngate-score"] = f"{chosen.record.score:.4f}"
    return headers


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def replay_chunks(body: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """Replays a complete ChatCompletion as the chunk sequence an OpenAI stream would have sent."""
    choice = body["choices"][0]
    message = choice["message"]
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body.get("created", int(time.time())),
            "model": body["model"]}
    if body.get("system_fingerprint"):
        base["system_fingerprint"] = body["system_fingerprint"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""})
    content = message.get("content")
    if isinstance(content, str):
        for i in range(0, len(content), _CONTENT_PIECE):
            yield chunk({"content": content[i:i + _CONTENT_PIECE]})
    if message.get("refusal"):
        yield chunk({"refusal": message["refusal"]})
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        yield chunk({"tool_calls": [{"index": i, "id": call.get("id"), "type": call.get("type", "function"),
                                     "function": {"name": fn.get("name"), "arguments": ""}}]})
        args = fn.get("arguments") or ""
        for j in range(0, len(args), _CONTENT_PIECE):
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + _CONTENT_PIECE]}}]})
    yield chunk({}, choice.get("finish_reason") or "stop")
    if include_usage and body.get("usage"):
        yield sse({**base, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")
