"""The spool's and the quarantine's line format: one JSON object per line, versioned.

    format 2: {"v": 2, "turn": {TurnRecord fields}}                        a journaled turn
              {"v": 2, "turn": {...}, "provisional": true}                 shadow mode: the reply is
                                                                             out, scoring still running
              {"v": 2, "at": ..., "error": ..., "turn": {...} | "raw": ...}  a quarantined record/line
    format 1: a bare TurnRecord.to_dict() (releases before the version field); still read.

Encoding must never fail on what a record holds: a record the fast encoder cannot take (lone
surrogates, integers past 64 bits, non-string keys) is written by the standard library with
ASCII escapes, which round-trip exactly. Records are written as received; making them fit the
database is the boundary's job (service.store.boundary), at write time.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import orjson

from service.gate.record import TurnRecord

FORMAT = 2
_NL = orjson.OPT_APPEND_NEWLINE


def encode_turn(record: TurnRecord, provisional: bool = False) -> bytes:
    """One spool line. Runs on the request path: orjson serializes the dataclasses directly."""
    env: dict[str, Any] = {"v": FORMAT, "turn": record}
    if provisional:
        env["provisional"] = True
    try:
        return orjson.dumps(env, option=_NL)
    except TypeError:
        return _stdlib(env)


def encode_quarantined(error: str, *, record: TurnRecord | None = None, raw: bytes | None = None,
                       source: str | None = None) -> bytes:
    env: dict[str, Any] = {"v": FORMAT, "at": datetime.now(UTC).isoformat(), "error": error}
    if source:
        env["source"] = source
    if record is not None:
        env["turn"] = record
    if raw is not None:
        env["raw"] = raw.decode("utf-8", "surrogateescape")  # exact bytes back via surrogateescape
    try:
        return orjson.dumps(env, option=_NL)
    except TypeError:
        pass
    try:
        return _stdlib(env)
    except (ValueError, RecursionError) as e:  # nested past what any encoder takes: keep what can be kept
        if record is None:
            raise
        env["turn_id"], env["error"] = str(record.turn_id)[:200], f"{error}; unserializable: {type(e).__name__}"
        del env["turn"]
        return _stdlib(env)


def _stdlib(env: dict[str, Any]) -> bytes:
    # ensure_ascii: lone surrogates become \udXXX escapes; _fields: records as their fields (not
    # dataclasses.asdict, which deep-copies a client's whole body first); odd objects become text.
    return json.dumps(env, ensure_ascii=True, separators=(",", ":"), default=_fields).encode() + b"\n"


def _fields(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return str(value)


def decode_turn(line: bytes) -> tuple[TurnRecord, bool]:
    """(record, provisional) from a spool line of any format; ValueError/TypeError if unreadable."""
    d = json.loads(line)  # the standard library: it reads what either encoder wrote
    if not isinstance(d, dict):
        raise TypeError(f"a spool line holds a JSON {type(d).__name__}, not an object")
    if "v" in d:
        turn, provisional = d.get("turn"), bool(d.get("provisional"))
        if not isinstance(turn, dict):
            raise TypeError("a spool line without a turn")
    else:  # format 1
        turn, provisional = d, False
    return TurnRecord.from_dict(turn), provisional
