"""Turn a conversation and candidate replies into critic input: the one rendering shared by
training (critic_models) and serving (service.critic). Imports no torch.

Text form (``render_context`` / ``render_candidate``): one line group per message, the role as a
tag (``[system]``, ``[user]``, ``[assistant]``, ``[tool]``), tool calls as ``name({compact json})``,
tool results cut to ``TOOL_RESULT_CHARS``, the system prompt cut to its head
(``SYSTEM_HEAD_CHARS``), the declared tools listed by name after it.

Token form (``encode_batch``): ``[CLS] context [SEP] candidate [SEP]`` per candidate, padded to
the longest pair of the batch (not to ``max_length``). Truncation rule, per candidate:

- the candidate may use all the room the context does not need, and is guaranteed half of it:
  ``cap = room - min(len(context), room // 2)`` with ``room = max_length - 3``; only a candidate
  longer than ``cap`` is cut, from the right;
- the context fills what is left. When it must be cut, its head (the system prompt and the tools
  line) keeps up to ``SYSTEM_HEAD_TOKENS`` tokens (at most half of the room left), and the rest of
  the conversation is cut from the LEFT: the oldest turns go, the newest stay.

The tokenizer is handed at most ``CHARS_PER_TOKEN`` characters per token the critic can keep of a
part (the head, the conversation, each candidate): a longer part is cut there, less the word the
cut splits, which gives exactly the tokens the whole part would for ordinary text, and bounds the
work whatever a client sends (megabytes of arguments, tens of thousands of tools).

Bump ``FORMAT_VERSION`` whenever any of this changes: a bundle records the version it was trained
on and must not be served with another.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tokenizers

from service import wirejson

FORMAT_VERSION = 2  # 2: the system prompt's head survives a cut context

SYSTEM_HEAD_CHARS = 400
SYSTEM_HEAD_TOKENS = 48  # what a cut context keeps of the head (system prompt, tools)
TOOL_RESULT_CHARS = 300
TEXT_CHARS = 4000  # any single message; the tokenizer then never sees megabytes
# WordPiece reads words of up to 100 characters (max_input_chars_per_word), each at least one
# token; a longer word is one [UNK] whatever its length. So the tokens the critic keeps of ordinary
# text lie within this many characters per token, and text thinner in tokens is read no further.
CHARS_PER_TOKEN = 100
PARSED_ARGS_CHARS = 20_000  # longer tool-call arguments are rendered as sent: no parsing megabytes

Message = dict[str, Any]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def _content_text(content: Any) -> str:
    """OpenAI content is a string, null, or a list of parts; keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
    return str(content)


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    return f"{fn.get('name', '')}({_arguments_text(fn.get('arguments'))})"


def _arguments_text(raw: Any) -> str:
    """Compact JSON. Arguments past PARSED_ARGS_CHARS stay as sent: the critic reads a few hundred
    tokens of them, and those are the same, since JSON's spacing makes no tokens."""
    if isinstance(raw, str) and len(raw) > PARSED_ARGS_CHARS:
        return raw
    try:
        args = wirejson.loads(raw) if isinstance(raw, str) else raw  # bounded: depth 200, no NaN
        return json.dumps(args, separators=(",", ":"), ensure_ascii=False)
    except (json.JSONDecodeError, TypeError, ValueError):
        return str(raw)


def _render_message(message: Message) -> str:
    role = message.get("role", "user")
    text = _content_text(message.get("content"))
    if role == "system" or role == "developer":
        return "[system] " + _clip(text, SYSTEM_HEAD_CHARS)
    if role == "tool":
        return "[tool] " + _clip(text, TOOL_RESULT_CHARS)
    parts = [_clip(text, TEXT_CHARS)] if text else []
    parts += [_call_text(c) for c in message.get("tool_calls") or []]
    return f"[{role}] " + " ".join(parts)


def _tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    """OpenAI tools are ``{"type": "function", "function": {"name": ...}}``; accept bare ``{"name"}``."""
    names = []
    for tool in tools or []:
        spec = tool.get("function") or tool
        if spec.get("name"):
            names.append(str(spec["name"]))
    return names


def _context_parts(messages: list[Message], tools: list[dict[str, Any]] | None) -> tuple[str, str]:
    """(head, body): the system prompt and the tools line, then the rest of the conversation."""
    at = 1 if messages and messages[0].get("role") in ("system", "developer") else 0
    head = [_render_message(m) for m in messages[:at]]
    names = _tool_names(tools)
    if names:
        head.append("[tools] " + ", ".join(names))
    return "\n".join(head), "\n".join(_render_message(m) for m in messages[at:])


def render_context(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation so far, oldest first; the tools follow the system prompt."""
    return "\n".join(part for part in _context_parts(messages, tools) if part)


def render_candidate(message: Message) -> str:
    return _render_message({**message, "role": message.get("role") or "assistant"})


def _special_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token} token")
    return i


def _plain(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """We truncate and pad ourselves; a tokenizer.json may carry its own settings. Turning them
    off is idempotent, so a tokenizer shared across threads is safe to fix in place."""
    if tokenizer.truncation is not None:
        tokenizer.no_truncation()
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    return tokenizer


def _encode(tok: tokenizers.Tokenizer, texts: list[str]) -> list[tokenizers.Encoding]:
    """encode_batch lets go of the GIL while it works (encode holds it): the critic tokenizes in
    a pool beside the event loop, which must keep running meanwhile."""
    return tok.encode_batch(texts, add_special_tokens=False)


# BERT's normalizer works per character and its pre-tokenizer splits words apart, so a window of a
# text, less the word its edge may split, tokenizes to exactly that part of the whole text's tokens.

def _without_first_word(enc: tokenizers.Encoding) -> list[int]:
    words = enc.word_ids
    return enc.ids[words.count(words[0]):] if words else []


def _without_last_word(enc: tokenizers.Encoding) -> list[int]:
    words = enc.word_ids
    return enc.ids[:words.index(words[-1])] if words else []


def _head_ids(text: str, enc: tokenizers.Encoding, limit: int) -> list[int]:
    """The first tokens of a text handed to the tokenizer cut to ``limit`` characters."""
    return _without_last_word(enc) if len(text) > limit else enc.ids


def _first_window(text: str, need: int) -> str:
    """Where the tail of a conversation is first looked for: ``need * 6`` characters, enough
    tokens for most conversations (JSON, ids and numbers run thicker in tokens than prose)."""
    return text[-need * 6:]


def _tail_ids(tok: tokenizers.Tokenizer, text: str, need: int, window: str, enc: tokenizers.Encoding
              ) -> list[int]:
    """The last tokens of ``text``, at least ``need`` of them when it has that many, without
    tokenizing all of a long conversation: ``window`` (``_first_window``, tokenized to ``enc``),
    grown leftwards until it holds them, up to ``need * CHARS_PER_TOKEN`` characters. A growth
    tokenizes only the new characters, up to where the tokens kept so far begin (a word's start,
    so the two parts tokenize as the whole would); it is sized by the characters per token seen so
    far, and at least half again, so that thin text ends soon."""
    limit = need * CHARS_PER_TOKEN
    start = len(text) - len(window)  # the window is text[start:]
    ids = _without_first_word(enc) if start > 0 else enc.ids
    # where the kept tokens begin in text (the window's end when it is one word)
    kept_at = start + enc.offsets[len(enc.ids) - len(ids)][0] if ids else len(text)
    while start > 0 and len(ids) < need and len(text) - start < limit:
        chars = len(text) - start
        start = max(len(text) - min(max(chars * 3 // 2, chars * need * 5 // (4 * max(len(ids), 1))), limit), 0)
        enc = _encode(tok, [text[start:kept_at]])[0]
        more = _without_first_word(enc) if start > 0 else enc.ids
        if more:
            kept_at = start + enc.offsets[len(enc.ids) - len(more)][0]
        ids = more + ids
    return ids


def encode_batch(tokenizer: tokenizers.Tokenizer, messages: list[Message], candidates: list[Message],
                 tools: list[dict[str, Any]] | None, max_length: int) -> dict[str, np.ndarray]:
    """int64 ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape [len(candidates), L],
    L the longest pair in the batch. The context is tokenized once for all candidates."""
    if max_length < 8:
        raise ValueError("max_length must be at least 8")
    tok = _plain(tokenizer)
    cls, sep, pad = _special_id(tok, "[CLS]"), _special_id(tok, "[SEP]"), tok.token_to_id("[PAD]") or 0
    room = max_length - 3
    limit = room * CHARS_PER_TOKEN
    head_text, body_text = _context_parts(messages, tools)
    firsts = ([head_text] if head_text else []) + [render_candidate(c) for c in candidates]
    window = _first_window(body_text, room)
    # One tokenizer call for every part (it works on them side by side); BERT splits on whitespace
    # first, so the parts tokenize to exactly the whole text's tokens.
    encs = _encode(tok, [text[:limit] for text in firsts] + ([window] if body_text else []))
    heads = [_head_ids(text, enc, limit) for text, enc in zip(firsts, encs)]
    head = heads.pop(0)[:room] if head_text else []
    body = _tail_ids(tok, body_text, room, window, encs[-1]) if body_text else []
    cands = heads
    cap = room - min(len(head) + len(body), room // 2)
    rows = []
    for cand in cands:
        cand = cand[:cap]
        keep = room - len(cand)
        if len(head) + len(body) <= keep:
            ctx = head + body
        else:
            h = min(len(head), SYSTEM_HEAD_TOKENS, keep // 2)
            ctx = head[:h] + body[len(body) - (keep - h):] if keep > h else head[:h]
        rows.append((ctx, cand))
    width = max((len(c) + len(d) + 3 for c, d in rows), default=3)
    n = len(rows)
    ids = np.full((n, width), pad, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for i, (c, d) in enumerate(rows):
        a, b = len(c) + 2, len(c) + len(d) + 3
        ids[i, 0] = cls
        ids[i, 1:a - 1] = c
        ids[i, a - 1] = sep
        ids[i, a:b - 1] = d
        ids[i, b - 1] = sep
        mask[i, :b] = 1
        types[i, a:b] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
