"""The record boundary: where turn records become rows, whatever a record holds is made to fit.

Records come from clients (through the gate), from spool files of any release, from `turngate
import` and from shadow scoring; none is trusted to fit the tables. Every row the writer builds is
fitted here, column by column, from the table's own types:
- text: NUL (refused by PostgreSQL in text and JSONB) and lone UTF-16 surrogates (which no UTF-8
  database can encode) become U+FFFD; a value that is not a string becomes its str();
- bounded text (ids, names): a value over the column's length keeps its head and ends in a hash of
  the whole value, so it stays deterministic and distinct (threading by a long explicit id works);
- booleans: anything but True or False becomes NULL;
- integers outside the column's range, non-numbers and non-finite floats become NULL (0 where the
  column allows no NULL);
- JSON: the same for every string and key nested anywhere; keys become strings; non-finite numbers
  become null; nesting deeper than MAX_DEPTH is cut. The common case (clean JSON) is detected by
  one C-speed encoding and costs nothing more.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, String, Table, Text

REPLACEMENT = "\ufffd"
MAX_DEPTH = 200  # JSON nesting kept; deeper values become a marker string
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


# -- scalars ---------------------------------------------------------------------------------------
def fit_text(value: Any, limit: int | None = None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    if "\x00" in value:
        value = value.replace("\x00", REPLACEMENT)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Through UTF-16: surrogate pairs become their character, lone halves U+FFFD.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if limit is not None and len(value) > limit:
        value = shorten(value, limit)
    return value


def shorten(value: str, limit: int) -> str:
    """A deterministic stand-in of at most `limit` characters: the head, then a hash of the whole."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    tail = 32 if limit >= 64 else 12 if limit >= 24 else 0
    if not tail:
        return value[:limit]
    return value[:limit - tail - 1] + "~" + digest[:tail]


def fit_int(value: Any, bounds: tuple[int, int] = _INT64) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and bounds[0] <= value <= bounds[1]:
        return value
    return None


def fit_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            f = float(value)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    return None


def fit_time(ts: Any) -> datetime:
    """A unix time as an aware UTC datetime; the time of writing when it is not a usable time."""
    try:
        return datetime.fromtimestamp(float(ts), tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC)


# -- JSON ------------------------------------------------------------------------------------------
def fit_json(value: Any, encode: bool = False) -> Any:
    """A JSON value any database holds; with `encode`, as JSON text (for PostgreSQL's bulk path)."""
    if value is None:
        return None
    try:
        text = orjson.dumps(value)  # raises on lone surrogates, huge ints, odd keys, deep nesting
        clean = b"\\u0000" not in text
    except TypeError:
        clean = False
    if clean:
        return text.decode() if encode else value
    value = _clean(value, 0)
    if encode:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return fit_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**300 else str(value)  # PostgreSQL's numeric has limits too
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_DEPTH:
        return "(nested too deep)"
    if isinstance(value, dict):
        return {fit_text(k if isinstance(k, str) else json.dumps(k) if _scalar(k) else str(k)): _clean(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    return fit_text(str(value))


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float))


# -- rows ------------------------------------------------------------------------------------------
_FITTERS: dict[str, dict[str, tuple]] = {}


def _fitters(table: Table) -> dict[str, tuple]:
    """Per column: (kind, bound, nullable), from the table's declared types."""
    got = _FITTERS.get(table.name)
    if got is None:
        got = {}
        for col in table.c:
            t = col.type
            bound: Any  # a length, a (low, high) range, or None
            if isinstance(t, JSON):
                kind, bound = "json", None
            elif isinstance(t, String):  # Text is a String without a length
                kind, bound = "text", None if isinstance(t, Text) else t.length
            elif isinstance(t, BigInteger):
                kind, bound = "int", _INT64
            elif isinstance(t, Integer):
                kind, bound = "int", _INT32
            elif isinstance(t, Float):
                kind, bound = "float", None
            elif isinstance(t, DateTime):
                kind, bound = "time", None
            elif isinstance(t, Boolean):
                kind, bound = "bool", None
            else:  # pragma: no cover - a new column type needs a rule here
                raise TypeError(f"no fitting rule for {table.name}.{col.name} ({t!r})")
            got[col.name] = (kind, bound, col.nullable)
        _FITTERS[table.name] = got
    return got


def column_kinds(table: Table) -> dict[str, str]:
    """Column name -> its kind here: text, int, float, json, time or bool."""
    return {name: kind for name, (kind, _, _) in _fitters(table).items()}


def fit_row(table: Table, row: dict[str, Any], encode_json: bool = False) -> dict[str, Any]:
    """Fits a row (in place) to its table's columns; returns it."""
    for name, (kind, bound, nullable) in _fitters(table).items():
        if name not in row:
            continue
        v = row[name]
        # Values that already fit (nearly all of them) are left as they are, checked inline: this
        # runs for every column of every row written.
        if v is None:
            if nullable and kind != "time":
                continue
        elif kind == "text":
            if type(v) is str and v.isascii() and "\x00" not in v and (bound is None or len(v) <= bound):
                continue
        elif kind == "int":
            if type(v) is int and bound[0] <= v <= bound[1]:
                continue
        elif kind == "float" and type(v) is float and math.isfinite(v):
            continue
        row[name] = _fit_value(v, kind, bound, nullable, encode_json)
    return row


def fit_columns(table: Table, columns: dict[str, list[Any]], encode_json: bool = False) -> dict[str, list[Any]]:
    """Fits a batch of rows given column by column (in place: each list is replaced); returns it. A
    column is checked whole, by a few passes in C (its types, its text joined, its lengths and
    ranges), so a batch costs a handful of calls a column instead of a few a value; a column that
    fails a check is fitted value by value, as fit_row fits each value."""
    fitters = _fitters(table)
    for name, values in columns.items():
        kind, bound, nullable = fitters[name]
        if kind == "json":
            columns[name] = _json_column(values, nullable, encode_json)
        elif not _column_fits(values, kind, bound, nullable):
            columns[name] = [_fit_value(v, kind, bound, nullable, encode_json) for v in values]
    return columns


_NONE = type(None)


def _column_fits(values: list[Any], kind: str, bound: Any, nullable: bool) -> bool:
    """Whether every value already fits (then fit_row would leave each as it is)."""
    types = set(map(type, values))
    if _NONE in types:
        if not nullable or kind == "time":
            return False
        types.discard(_NONE)
        values = [v for v in values if v is not None]
    if not values:
        return True
    if kind == "text":
        if types != {str}:
            return False
        joined = "".join(values)  # one scan for NUL and for what UTF-8 cannot encode (lone surrogates)
        if "\x00" in joined or not (joined.isascii() or _encodes(joined)):
            return False
        return bound is None or max(map(len, values)) <= bound
    if kind == "int":
        return types == {int} and bound[0] <= min(values) and max(values) <= bound[1]
    if kind == "float":
        return types == {float} and all(map(math.isfinite, values))
    if kind == "bool":
        return types == {bool}
    return kind == "time" and types == {datetime}


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_column(values: list[Any], nullable: bool, encode_json: bool) -> list[Any]:
    """fit_json over a column: each value encoded once by orjson; the column is fitted value by value
    only when one does not encode, holds an escaped NUL, or is a None where none is allowed."""
    try:
        texts = [None if v is None else orjson.dumps(v) for v in values]
    except TypeError:
        texts = []
    if len(texts) != len(values) or b"\\u0000" in b"".join(filter(None, texts)) or (not nullable and None in texts):
        return [_fit_value(v, "json", None, nullable, encode_json) for v in values]
    if not encode_json:
        return values
    return [None if t is None else t.decode() for t in texts]


def _fit_value(v: Any, kind: str, bound: Any, nullable: bool, encode_json: bool) -> Any:
    if kind == "text":
        v = fit_text(v, bound)
        if v is None and not nullable:
            v = ""
    elif kind == "int":
        v = fit_int(v, bound)
        if v is None and not nullable:
            v = 0
    elif kind == "float":
        v = fit_float(v)
    elif kind == "json":
        v = fit_json(v, encode_json)
        if v is None and not nullable and encode_json:
            v = "null"  # what SQLAlchemy's JSON type writes for None on the other path
    elif kind == "bool":
        v = None if v is None else bool(v) if isinstance(v, bool | int) else None
        if v is None and not nullable:
            v = False
    elif kind == "time" and not isinstance(v, datetime):
        v = fit_time(v if v is not None else time.time())
    return v
