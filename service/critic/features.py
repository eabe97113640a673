"""Turn features: what the gate knows about each candidate besides the encoder's reading of it.

Computed at gating time for every candidate of a turn, given the conversation, the declared tools
and the other candidates of the same turn (the N samples the gate already paid for). Torch-free
and cheap: plain Python over JSON that is already parsed. docs/critic.md says why each one helps.

Agreement is the strongest signal the gate has for free: samples of one actor that make the very
same call are more often right than a call only one sample makes (a majority vote over 4 samples
of function-calling models is valid 0.87 of the time against 0.77 for the first sample, on the
shared BFCL training questions). The other features break the ties a vote cannot: a schema the
call breaks, argument values that occur nowhere in the conversation, a write the user never
confirmed, the call that just failed repeated.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service import wirejson
from service.gate import structural, toolschema
from service.gate.actions import is_write

Message = dict[str, Any]

# Bump when a feature's definition changes: a head is fitted on one version and served with it.
FEATURES_VERSION = 1

# Features of candidates that call tools (or could: the request declares tools).
TOOL_FEATURES = (
    "call_support",  # share of the turn's candidates making the very same calls (name + arguments)
    "name_support",  # share calling the same functions, whatever the arguments
    "count_support",  # share making as many calls
    "soft_support",  # mean overlap (Jaccard) of argument values with each other candidate
    "arg_support",  # mean share of candidates passing each of this one's argument values
    "consensus_missing",  # argument values most candidates pass and this one does not
    "is_text",  # a text reply, no call
    "schema_ok",  # passes the structural checks (declared tool, arguments fit the schema)
    "grounded",  # share of its argument values found in the conversation
    "ungrounded",  # argument strings found nowhere in the conversation (log1p of the count)
    "n_calls",  # log1p of the number of calls
    "optional_args",  # log1p of arguments passed that the schema does not require
    "unconfirmed_write",  # a write with no user message since the previous write
    "repeat_call",  # the very same call was already made in this conversation
    "retry_after_error",  # calls the tool whose result just reported an error, unchanged
    "alone",  # the only candidate: agreement unknown (its supports read 1), e.g. adaptive sampling's first
    "encoder",  # the cross-encoder's logit
)
# Features of text replies where no tools are declared.
TEXT_FEATURES = (
    "log_chars",  # log1p of the reply's length
    "rel_length",  # length against the other candidates: (log length - group mean)
    "consensus",  # mean word-set overlap (Jaccard) with the other candidates
    "structure",  # log1p of list items, headings and code fences
    "encoder",
)
FEATURES_BY_KIND = {"tool": TOOL_FEATURES, "agent": TOOL_FEATURES, "text": TEXT_FEATURES}

_STRUCTURE = re.compile(r"^\s*(?:[-*+] |\d+[.)] |#{1,6} |```)", re.MULTILINE)
_ERROR = re.compile(r"\berror\b|\bfailed\b|\binvalid\b|\bnot found\b|\bexception\b", re.IGNORECASE)
_TEXT_CAP = 20_000  # characters of a message searched or tokenized: bounded work per turn
_CONSENSUS_CHARS = 3_000
_CONVERSATION_CHARS = 200_000  # the newest part of a long conversation, where grounding is looked for
_VALUES = 64  # argument values of a candidate looked up in the conversation
_ARGS_CHARS = 20_000  # longer arguments (a file's content, say) are compared whole, not parsed


@dataclass(frozen=True)
class TurnFeatures:
    kind: str  # "tool", "agent" or "text": which head scores the turn (kind_of)
    names: tuple[str, ...]
    rows: list[list[float]]  # one row per candidate, in `names` order


def kind_of(messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None) -> str:
    """Which head scores the turn: "agent" once the conversation holds tool calls or results (a
    turn inside an agent's loop, where ids, confirmations and earlier calls matter); "tool" for
    a request that declares tools (or a candidate that calls one) without such history; else
    "text"."""
    if any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages):
        return "agent"
    if tools or any(isinstance(c, dict) and c.get("tool_calls") for c in candidates):
        return "tool"
    return "text"


def compute(messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None,
            encoder_logits: list[float] | None = None, verdicts: list[bool] | None = None) -> TurnFeatures:
    """Every candidate's features; ``encoder_logits`` in candidate order (0 when absent);
    ``verdicts``: the structural checks where the caller already ran them (the gate), else run here."""
    enc = list(encoder_logits) if encoder_logits is not None else [0.0] * len(candidates)
    kind = kind_of(messages, candidates, tools)
    if kind == "text":
        return TurnFeatures(kind, TEXT_FEATURES, _text_rows(candidates, enc))
    return TurnFeatures(kind, TOOL_FEATURES, _tool_rows(messages, candidates, tools, enc, verdicts))


# -- tool turns ----------------------------------------------------------------------------------

@dataclass
class Call:
    name: str
    args: Any  # parsed arguments, or the raw string when it is not JSON


def parse_calls(message: Message) -> list[Call]:
    out = []
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        raw = fn.get("arguments")
        try:  # the bounded parser (nesting past 200 levels stays a string); a huge payload stays opaque
            args = wirejson.loads(raw) if isinstance(raw, str) and len(raw) <= _ARGS_CHARS else raw
        except ValueError:
            args = raw
        out.append(Call(str(fn.get("name")), args))
    return out


def _norm(value: Any) -> Any:
    """Values that mean the same compare equal: 5 and 5.0, " Paris" and "paris"."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _norm(v)) for k, v in value.items()))
    return str(value)


def _number(value: int | float) -> int | float:
    """A float, so that 5 and 5.0 agree; an integer past a double's range (a client may send 400
    digits) stays the exact integer instead of raising."""
    try:
        return float(value)
    except OverflowError:
        return value


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, scalar) pairs of a JSON value: each argument value a call passes."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return [(path, tuple(sorted(map(str, map(_norm, value)))))]  # a set of values: order-free
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, _norm(value))]


def signature(calls: list[Call]) -> tuple:
    return tuple(sorted(repr((c.name, _norm(c.args))) for c in calls)) if calls else ("<text>",)


def _arg_items(calls: list[Call]) -> set[tuple]:
    return {(c.name, p, v) for c in calls for p, v in _leaves(c.args)}


def content_text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content[:_TEXT_CAP]
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))[
            :_TEXT_CAP]
    return ""


def conversation_text(messages: list[Message]) -> str:
    """What the user said, what tools returned and what the agent already passed, lower-cased:
    where a grounded argument value comes from."""
    parts = []
    for m in messages:
        if m.get("role") in ("system", "developer"):
            continue
        parts.append(content_text(m))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                parts.append(fn["arguments"][:_TEXT_CAP])
    return "\n".join(parts)[-_CONVERSATION_CHARS:].lower()


def _scalars(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _scalars(v)
    elif isinstance(value, list):
        for v in value:
            yield from _scalars(v)
    else:
        yield value


def value_strings(calls: list[Call]) -> list[str]:
    """The argument values a call passes, as they would be written in the conversation (the first
    _VALUES of them: bounded work whatever the candidate holds)."""
    out: list[str] = []
    for c in calls:
        for x in _scalars(c.args):
            if len(out) >= _VALUES:
                return out
            if isinstance(x, bool) or x is None:
                continue
            if isinstance(x, int):
                out.append(str(x))
            elif isinstance(x, float):  # 5.0 is written 5
                out.append(str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x))
            elif isinstance(x, str) and x.strip():
                out.append(x.strip()[:_TEXT_CAP])
    return out


@dataclass
class History:
    """What the conversation says about the next action."""

    since_write_user: bool  # a user message came after the last write call (or there was none)
    made: set[tuple]  # signatures of every call already made
    failed: set[tuple]  # signatures of the calls whose result just reported an error


def history(messages: list[Message]) -> History:
    since_user, last_calls = True, []
    made: set[tuple] = set()
    failed: set[tuple] = set()
    for m in messages:
        role = m.get("role")
        if role == "user":
            since_user, failed = True, set()
        elif role == "assistant":
            calls = parse_calls(m)
            if calls:
                last_calls = calls
                failed = set()
                made.update(signature([c]) for c in calls)
                if any(is_write(c.name) for c in calls):
                    since_user = False
        elif role == "tool" and _ERROR.search(content_text(m)[:500]):
            failed = {signature([c]) for c in last_calls}
    return History(since_user, made, failed)


def _tool_rows(messages: list[Message], candidates: list[Message], tools: list[dict[str, Any]] | None,
               enc: list[float], verdicts: list[bool] | None) -> list[list[float]]:
    """Per candidate; the work that does not depend on the group is done once per distinct reply
    (samples of one turn often repeat each other), the agreement counts over all of them."""
    n = len(candidates)
    calls = [parse_calls(c) for c in candidates]
    sigs = [signature(cs) for cs in calls]
    keys = [(sig, content_text(c), bool(c.get("refusal"))) for sig, c in zip(sigs, candidates)]
    distinct = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(distinct)}
    first = {k: keys.index(k) for k in distinct}
    mult = Counter(keys)
    d_calls = [calls[first[k]] for k in distinct]
    d_items = [_arg_items(cs) for cs in d_calls]
    d_names = [tuple(sorted(c.name for c in cs)) for cs in d_calls]
    sig_count = Counter(sigs)
    name_count: Counter = Counter()
    count_count: Counter = Counter()
    item_count: Counter = Counter()
    for k, cs, nm, its in zip(distinct, d_calls, d_names, d_items):
        name_count[nm] += mult[k]
        count_count[len(cs)] += mult[k]
        for it in its:
            item_count[it] += mult[k]
    consensus = {it for it, c in item_count.items() if c * 2 > n}
    schemas = structural.tool_schemas(tools) if verdicts is None else {}
    required = _required(tools)
    deadline = time.monotonic() + structural.SCHEMA_BUDGET_S  # the gate's bound on schema checks
    turn = toolschema.TurnValidators()  # the candidates share one build of each schema
    text = conversation_text(messages)
    hist = history(messages)
    base = []
    for k, cs, nm, its in zip(distinct, d_calls, d_names, d_items):
        values = value_strings(cs)
        found = [v.lower() in text for v in values]
        singles = [signature([c]) for c in cs]
        write = any(is_write(c.name) for c in cs)
        if verdicts is not None:
            ok = verdicts[first[k]]
        else:  # nothing declared: nothing to check the calls against
            ok = (structural.check(candidates[first[k]], None, schemas, deadline=deadline, turn=turn).ok
                  if tools else True)
        base.append([
            sig_count[k[0]] / n,
            name_count[nm] / n,
            count_count[len(cs)] / n,
            _soft_support(where[k], d_items, distinct, mult, n),
            (sum(item_count[it] for it in its) / (n * len(its))) if its else name_count[nm] / n,
            len(consensus - its) / max(1, len(consensus)),
            float(not cs),
            float(ok),
            sum(found) / len(found) if found else 1.0,
            math.log1p(sum(1 for v, f in zip(values, found) if not f and len(v) >= 3)),
            math.log1p(len(cs)),
            math.log1p(_optional_args(cs, required)),
            float(write and not hist.since_write_user),
            float(any(s in hist.made for s in singles)),
            float(any(s in hist.failed for s in singles)),
            float(n == 1),
        ])
    return [base[where[k]] + [float(e)] for k, e in zip(keys, enc)]


def _soft_support(d: int, items: list[set[tuple]], distinct: list[tuple], mult: Counter, n: int) -> float:
    """Partial agreement: the mean overlap (Jaccard) of argument values with every other
    candidate; two calls that share most argument values mostly agree."""
    if n < 2:
        return 1.0
    total = float(mult[distinct[d]] - 1)  # its duplicates agree fully
    for e, other in enumerate(items):
        if e != d:
            union = items[d] | other
            same = len(items[d] & other) / len(union) if union else float(distinct[d][0] == distinct[e][0])
            total += mult[distinct[e]] * same
    return total / (n - 1)


def _required(tools: list[dict[str, Any]] | None) -> dict[str, set[str]]:
    """Function name -> the argument names its schema requires."""
    out: dict[str, set[str]] = {}
    for tool in tools or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            req = params.get("required") if isinstance(params, dict) else None
            out[fn["name"]] = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
    return out


def _optional_args(calls: list[Call], required: dict[str, set[str]]) -> int:
    return sum(sum(1 for k in c.args if k not in required[c.name])
               for c in calls if isinstance(c.args, dict) and c.name in required)


# -- text turns ----------------------------------------------------------------------------------

def _text_rows(candidates: list[Message], enc: list[float]) -> list[list[float]]:
    texts = [content_text(c) for c in candidates]
    n = len(texts)
    if not n:
        return []
    # Word sets of the head of each answer: enough to tell what it says, bounded work.
    words = [set(t[:_CONSENSUS_CHARS].lower().split()) for t in texts]
    sims = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            shared = len(words[i] & words[j])
            union = len(words[i]) + len(words[j]) - shared
            sims[i][j] = sims[j][i] = shared / union if union else 1.0
    logs = [math.log1p(len(t)) for t in texts]
    mean = sum(logs) / n
    return [[lg, lg - mean, (sum(sims[i]) - 1.0) / (n - 1) if n > 1 else 1.0,
             math.log1p(len(_STRUCTURE.findall(t))), float(e)]
            for i, (t, lg, e) in enumerate(zip(texts, logs, enc))]
