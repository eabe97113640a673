"""JSON from the wire, as turngate accepts it: RFC 8259, with bounds every later step can live with.

The parser is pydantic-core's (jiter, several times faster than `json`). While parsing it refuses
nesting deeper than 200 levels (so no later `json.dumps`, validator or renderer can run out of stack),
integers over 4,300 digits (Python cannot even print those), invalid UTF-8, lone surrogate escapes
(no database stores them) and, with allow_inf_nan=False, the NaN/Infinity literals. A number literal
too large for a double (`1e400`) still parses to inf; a walk over the floats refuses it, as no
upstream or database takes inf.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import OrderedDict
from typing import Any

import orjson
from pydantic_core import from_json


class WireJSONError(ValueError):
    """The bytes are not JSON turngate accepts; the message says why, for the client."""


def loads(raw: bytes | str) -> Any:
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise WireJSONError(str(e)) from None
    if not _finite(value):
        raise WireJSONError("a number is too large for a double (it would be Infinity)")
    return value


def _finite(value: Any) -> bool:
    if type(value) is not dict and type(value) is not list:
        return not (type(value) is float and not math.isfinite(value))
    stack = [value]
    while stack:
        item = stack.pop()
        for v in item.values() if type(item) is dict else item:
            kind = type(v)
            if kind is dict or kind is list:
                stack.append(v)
            elif kind is float and not math.isfinite(v):
                return False
    return True


def loads_upstream(raw: bytes) -> Any:
    """An upstream's reply, read as the standard library reads it (NaN, integers past 64 bits and
    lone surrogates included: what an upstream sends is relayed, not judged here), by orjson when it
    can: about three times faster on the replies every turn parses."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deep to read") from None


async def dumps_off_loop(value: Any) -> bytes:
    """``dumps`` for the event loop: orjson there, and what it refuses written on a thread, where
    the standard library's encoder (one call holding the GIL, 60-140 ms for a few MB of big
    integers) would stall the loop all the same. The thread walks the value in Python, which lets
    the loop run, and hands orjson the integers and strings it refuses as ready-made JSON. A body's
    top-level lists and objects that need the thread are written once for all the calls that send
    them (the candidate calls of a round share the client's body)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    if type(value) is not dict:
        return await asyncio.to_thread(_dumps_with_fragments, value)
    parts = {k: await _written_once(v) for k, v in value.items()}
    try:
        return orjson.dumps(parts)
    except TypeError:  # a top-level scalar orjson refuses
        return await asyncio.to_thread(_assemble, parts, value)


# Parts written on a thread, by identity: (the part itself, held so that its id is not reused while
# here; its loop; the writing). Bounded: the last few rounds' bodies (a part is at most a request
# body, 4 MB), each kept a second after it is written (a round's later calls come within it). Sound
# because nothing changes a body's parts once sent: a new round builds new lists (gate.pipeline).
_WRITTEN_MAX = 4
_WRITTEN_KEEP_S = 1.0
_written: OrderedDict[int, tuple[Any, asyncio.AbstractEventLoop, asyncio.Future[bytes]]] = OrderedDict()


async def _written_once(part: Any) -> Any:
    """The part, or its JSON as a Fragment where orjson refuses something in it."""
    if type(part) is not list and type(part) is not dict:
        return part
    loop = asyncio.get_running_loop()
    held = _written.get(id(part))
    if held is not None and held[0] is part:
        _written.move_to_end(id(part))
        if held[2].done() and not held[2].cancelled() and held[2].exception() is None:
            return orjson.Fragment(held[2].result())
        if held[1] is loop:
            return orjson.Fragment(await asyncio.shield(held[2]))  # a caller's cancellation leaves it to the others
    try:
        return orjson.Fragment(orjson.dumps(part))
    except TypeError:
        pass
    key, writing = id(part), asyncio.ensure_future(asyncio.to_thread(_dumps_with_fragments, part))
    _written[key] = (part, loop, writing)
    writing.add_done_callback(lambda _: loop.call_later(_WRITTEN_KEEP_S, _forget, key, writing))
    while len(_written) > _WRITTEN_MAX:
        _written.popitem(last=False)
    return orjson.Fragment(await asyncio.shield(writing))


def _forget(key: int, writing: asyncio.Future[bytes]) -> None:
    held = _written.get(key)
    if held is not None and held[2] is writing:
        del _written[key]


def _assemble(parts: dict[str, Any], value: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(_fragments(parts))
    except (TypeError, RecursionError):  # a key orjson refuses: the whole value, the slow way
        return _dumps_with_fragments(value)


def _dumps_with_fragments(value: Any) -> bytes:
    try:
        return orjson.dumps(_fragments(value))
    except (TypeError, RecursionError):  # a key orjson refuses, or nesting no client body has
        return dumps(value)


def _fragments(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _fragments(v) for k, v in value.items()}
    if kind is list:
        return [_fragments(v) for v in value]
    if kind is int and not -(2 ** 63) <= value < 2 ** 64:
        return orjson.Fragment(str(value).encode())
    if kind is str and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate: its escape is valid JSON
            return orjson.Fragment(json.dumps(value).encode())
    return value


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette's JSONResponse writes it, several times faster (orjson).
    What orjson refuses (integers past 64 bits, which a client may send and an upstream echo; lone
    surrogates, which an upstream may send) takes the standard library's path, with non-ASCII text
    escaped: a lone surrogate has no UTF-8 form, its escape is valid JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
