"""Checks on configuration that comes from outside the program (the environment, the YAML file).

Pure functions over plain values: `service.settings` calls them while it still knows where each
value came from, so that a refusal can name the variable or the file and the key.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from sqlalchemy.engine import make_url

MIN_SECRET_CHARS = 16
MIN_DISTINCT_CHARS = 6  # 16 random hex digits have fewer than 6 distinct ones about once in 30,000

# Words that only an unreplaced example value holds, compared without case or punctuation.
_PLACEHOLDER_WORDS = ("changeme", "replaceme", "placeholder", "yourkey", "yourapikey", "yoursecret",
                      "insertkey", "secret", "password", "example")
_PLACEHOLDER_VALUES = {"", "sk", "xxx", "todo", "test", "admin", "default", "none", "null", "key",
                       "apikey", "token"}

# Kubernetes injects these into every pod of a namespace with a Service named `turngate`
# (service links): they are not settings, and must not be mistaken for unknown ones.
_SERVICE_LINK = re.compile(r"TURNGATE(_[A-Z0-9]+)*_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)\w*)?)")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for a close match, else ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _nested_models(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model a field holds, whether as a list of them) for `M`, `M | None`, `list[M]`."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        inner, _ = _nested_models(typing.get_args(annotation)[0])
        return inner, True
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested_models(arg)
            if found[0] is not None:
                return found
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def unknown_keys(data: Mapping[str, Any], model: type[BaseModel], where: str = "") -> list[str]:
    """One message per key of `data` (a YAML mapping, recursively) that `model` has no field for."""
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            place = f"in {where}" if where else "at the top level"
            problems.append(f"unknown key '{key}' {place}{did_you_mean(str(key), model.model_fields)}")
            continue
        inner, many = _nested_models(field.annotation)
        if inner is None:
            continue
        items = enumerate(value) if many and isinstance(value, list) else [(None, value)]
        for i, item in items:
            if not isinstance(item, Mapping):
                continue  # the wrong shape is the model's to report
            label = key if i is None else f"{key}[{item.get('alias', i)}]"
            problems += unknown_keys(item, inner, f"{where}.{label}" if where else label)
    return problems


def unknown_variables(environ: Mapping[str, str], known: set[str]) -> list[str]:
    """One message per TURNGATE_* variable that no setting reads (service links excepted)."""
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("TURNGATE_") and upper not in known and not _SERVICE_LINK.fullmatch(upper):
            problems.append(f"{name} is not a turngate setting, ignored{did_you_mean(upper, known)}")
    return problems


def weak_secret(value: str, *, ours: bool) -> str | None:
    """Why `value` must not be used as a secret, or None.

    `ours`: a secret turngate's operator chooses (admin key, client keys, the key hash secret), so it must also be long
    and varied; other secrets (an upstream key, a database password) are only checked for being
    an example value left in place, since their owner decides their form.
    """
    squashed = re.sub(r"[^a-z0-9]", "", value.lower())
    core = squashed.removeprefix("sk")  # OpenAI-style keys: sk-..., sk-xxxx
    if core in _PLACEHOLDER_VALUES or len(set(core)) < 3 or any(w in squashed for w in _PLACEHOLDER_WORDS):
        return "is a placeholder"
    if not ours:
        return None
    if len(value) < MIN_SECRET_CHARS:
        return f"is shorter than {MIN_SECRET_CHARS} characters"
    if len(set(value)) < MIN_DISTINCT_CHARS:
        return f"has fewer than {MIN_DISTINCT_CHARS} distinct characters"
    return None


def secrets_in(values: Mapping[str, Any], name: Callable[[str, str], str]) -> list[tuple[str, str, bool]]:
    """(where, value, chosen by turngate's operator) for every secret among raw settings values
    (as read from the environment or the YAML file); `name(key, note)` says where a setting (a
    field, or a path into routes) came from."""
    found: list[tuple[str, str, bool]] = []

    def add(where: str, value: Any, ours: bool) -> None:
        # An empty value is no secret: the setting is off (admin API disabled, client keys forwarded).
        if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value) != "":
            found.append((where, str(value), ours))

    add(name("admin_key", ""), values.get("admin_key"), True)
    add(name("key_hash_secret", ""), values.get("key_hash_secret"), True)  # who knows it can test guessed keys
    keys = values.get("api_keys")  # "a,b" from the environment, a list from the file
    keys = keys.split(",") if isinstance(keys, str) else keys if isinstance(keys, list) else []
    keys = [str(k).strip() for k in keys if str(k).strip()]
    for n, key in enumerate(keys, 1):
        add(name("api_keys", f" (key {n})" if len(keys) > 1 else ""), key, True)
    add(name("upstream_api_key", ""), values.get("upstream_api_key"), False)
    for field in ("database_url", "redis_url"):
        try:
            password = make_url(values[field]).password if isinstance(values.get(field), str) else None
        except Exception:
            password = None
        if password is not None:
            add("the password in " + name(field, ""), password, False)
    routes = values.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if isinstance(route, Mapping):
            add(name(f"routes[{route.get('alias', i)}].upstream_api_key", ""), route.get("upstream_api_key"), False)
    return found
