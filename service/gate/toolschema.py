"""A client's tool schema is data: checking arguments against it never fetches, never backtracks, never hangs.

- `$ref`s resolve inside the document only (`#/...`, anchors, `$id`s the document itself declares): the
  registry has no retrieval, so an `http://` or `file://` ref is never followed; the part of the
  schema behind it is not enforced.
- `pattern` and `patternProperties` (and `additionalProperties` next to them) are matched by RE2, which
  runs in linear time; a pattern RE2 cannot compile (backreferences, lookaround) is not enforced.
- `uniqueItems` hashes the items instead of comparing every pair.
- Every keyword checks a deadline, so a schema that would take long (exponential `anyOf` nesting over
  `$ref`s, huge values) gives up instead: `Unchecked`. The check of the schema itself against its
  metaschema keeps the same deadline; a schema too large to check in time is not parsed at all, and
  one turn builds each schema once (`TurnValidators`), not once per candidate.
- `self_reference` finds schemas that refer back to themselves without descending into the value
  (`{"$ref": "#"}`, an `allOf` cycle): no validator can evaluate those, so the request is refused.

`format` is an annotation here (the 2020-12 default), so `format: regex` never compiles anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import cache, lru_cache
from typing import Any, TypeVar

import re2
import referencing.exceptions
from jsonschema import ValidationError, validators
from jsonschema_specifications import REGISTRY as METASCHEMAS  # type: ignore[import-untyped]
from referencing import Registry, Resource, Specification
from referencing.jsonschema import DRAFT202012, UnknownDialect

# No `retrieve`: a URI outside the document is unresolvable, never fetched (jsonschema's own default
# registry fetches http(s) refs with urlopen, without a timeout, on the calling thread).
_IN_DOCUMENT_ONLY: Registry = Registry()

log = logging.getLogger(__name__)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad pattern is not an error of ours
_RE2_OPTIONS.max_mem = 256 * 1024  # per compiled pattern; bounds what the pattern cache can hold
_CACHED_PATTERN_CHARS = 512

_T = TypeVar("_T")

_deadline: ContextVar[float] = ContextVar("toolschema_deadline", default=float("inf"))


class Unchecked(Exception):
    """The arguments could not be checked against this schema (not the candidate's fault)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- patterns ---------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _compiled_cached(pattern: str):
    return _compile_uncached(pattern)


def _compile_uncached(pattern: str):
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        return None


def _regex(pattern: str):
    """RE2 for the pattern, or None when RE2 cannot express it (then the keyword is not enforced)."""
    if len(pattern) > _CACHED_PATTERN_CHARS:
        return _compile_uncached(pattern)
    return _compiled_cached(pattern)


def _search(pattern: str, text: str) -> bool | None:
    regex = _regex(pattern)
    if regex is None:
        return None
    try:
        return regex.search(text) is not None
    except UnicodeError:  # a lone surrogate cannot be encoded for RE2
        return None


def _pattern(validator, patrn, instance, schema):
    if validator.is_type(instance, "string") and _search(patrn, instance) is False:
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for k, v in instance.items():
            if _search(pattern, k):
                yield from validator.descend(v, subschema, path=k, schema_path=pattern)


def _additional_properties(base):
    """The dialect's additionalProperties, told which keys the patterns matched (it would use `re`)."""
    def check(validator, ap, instance, schema):
        patterns = schema.get("patternProperties")
        if patterns and validator.is_type(instance, "object"):
            # A key whose match is unknown (pattern RE2 cannot run) counts as matched: not enforced.
            matched = {k: True for k in instance if any(_search(p, k) is not False for p in patterns)}
            schema = {k: v for k, v in schema.items() if k != "patternProperties"}
            schema["properties"] = {**schema.get("properties", {}), **matched}
        yield from base(validator, ap, instance, schema)
    return check


def _not_enforced(validator, value, instance, schema):
    return ()


def _mentions(schema: Any, keywords: tuple[str, ...], below_root: bool = False) -> bool:
    """Whether any object in the schema (below the root only, if asked) has one of the keywords."""
    stack = list(schema.values()) if below_root and isinstance(schema, dict) else [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any(k in node for k in keywords):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


# -- other keywords -----------------------------------------------------------------------------


def _hashable(value: Any) -> Any:
    """A key equal for JSON-equal values (1 == 1.0, true != 1), for uniqueItems in linear time."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, dict):
        return ("object", frozenset((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_hashable(v) for v in value))
    return ("other", repr(value))


def _unique_items(validator, unique, instance, schema):
    if unique and validator.is_type(instance, "array"):
        keys = [_hashable(v) for v in instance]
        if len(set(keys)) != len(keys):
            yield ValidationError(f"{instance!r} has non-unique elements")


def _in_document_ref(base):
    """$ref and $dynamicRef: a reference the document cannot resolve by itself is not enforced."""
    def check(validator, ref, instance, schema):
        try:
            yield from base(validator, ref, instance, schema)
        except referencing.exceptions.Unresolvable:
            return
    return check


def _bounded(keyword):
    def check(validator, value, instance, schema):
        if time.monotonic() > _deadline.get():
            raise Unchecked("timeout")
        return keyword(validator, value, instance, schema)
    return check


@cache  # per dialect and flag: a handful of classes
def _safe_class(base, with_unevaluated: bool):
    keywords = dict(base.VALIDATORS)
    keywords.update(pattern=_pattern, patternProperties=_pattern_properties, uniqueItems=_unique_items)
    for name, wrap in (("additionalProperties", _additional_properties),
                       ("$ref", _in_document_ref), ("$dynamicRef", _in_document_ref),
                       ("$recursiveRef", _in_document_ref)):
        if name in keywords:
            keywords[name] = wrap(keywords[name])
    if not with_unevaluated and "unevaluatedProperties" in keywords:
        # jsonschema evaluates it by matching patternProperties with `re`: not enforced next to them.
        keywords["unevaluatedProperties"] = _not_enforced
    return validators.extend(base, {name: _bounded(fn) for name, fn in keywords.items()})


# -- validators -------------------------------------------------------------------------------

_CACHED_SCHEMA_CHARS = 32 * 1024  # the validator cache holds only small schemas: it cannot be filled
# Checking a schema against its metaschema takes some 4 us a byte of nested properties: one past this
# size cannot be checked within a turn's budget, so it is not parsed at all.
_CHECKED_SCHEMA_CHARS = 256 * 1024


@lru_cache(maxsize=512)
def _validator_cached(schema_json: str):
    return _build(schema_json)


def _build(schema_json: str):
    schema = json.loads(schema_json)
    if _mentions(schema, ("$schema",), below_root=True):
        # A subschema naming its own dialect gets jsonschema's stock validator class (with `re`).
        return None
    base = validators.validator_for(schema)
    if not _fits_metaschema(base, schema):
        return None
    with_unevaluated = not _mentions(schema, ("patternProperties",))
    return _safe_class(base, with_unevaluated)(schema, registry=_IN_DOCUMENT_ONLY)


def _fits_metaschema(base, schema: Any) -> bool:
    """The dialect's check_schema, but bounded: the client's schema is the instance, so its walk
    keeps the deadline and hashes uniqueItems like any other check (stock `uniq` compares pairs)."""
    return next(iter(_metaschema_validator(base).iter_errors(schema)), None) is None


@cache  # per dialect: a handful of validators
def _metaschema_validator(base):
    meta_base = validators.validator_for(base.META_SCHEMA, default=base)
    with_unevaluated = not _mentions(base.META_SCHEMA, ("patternProperties",))
    meta = _without_dialect(base.META_SCHEMA)
    return _safe_class(meta_base, with_unevaluated)(meta, registry=_metaschemas_without_dialect())


def _without_dialect(document: Any) -> Any:
    """The document without its root `$schema`: jsonschema would swap in its stock (unbounded) class
    for every metaschema document that names its dialect."""
    return {k: v for k, v in document.items() if k != "$schema"} if isinstance(document, dict) else document


@cache
def _metaschemas_without_dialect() -> Registry:
    # Crawled, so that their anchors ($dynamicAnchor "meta") win over those of jsonschema's own copies.
    return Registry().with_resources((uri, _resource_without_dialect(METASCHEMAS[uri].contents))
                                     for uri in METASCHEMAS).crawl()


def _resource_without_dialect(document: Any) -> Resource:
    specification = Specification.detect(document)  # from the `$schema` about to be dropped
    return specification.create_resource(_without_dialect(document))


def validator_for(schema_json: str):
    """A validator for the schema (as canonical JSON), or None when it cannot be enforced safely.

    Raises Unchecked when the schema is too large to check, or its metaschema walk runs out of time.
    """
    if len(schema_json) > _CHECKED_SCHEMA_CHARS:
        raise Unchecked("too_large")
    if len(schema_json) > _CACHED_SCHEMA_CHARS:
        return _build(schema_json)
    return _validator_cached(schema_json)


class TurnValidators:
    """The validators of one turn's schemas: each schema is built once, however many candidates call it."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}  # schema JSON -> its validator, or why it has none (Unchecked)

    def get(self, schema_json: str):
        """The schema's validator; raises Unchecked (again, for each call) when it has none."""
        if schema_json not in self._built:
            self._built[schema_json] = self._build(schema_json)
        built = self._built[schema_json]
        if isinstance(built, Unchecked):
            raise Unchecked(built.reason)
        return built

    @staticmethod
    def _build(schema_json: str):
        try:
            return _unchecked_on_failure(lambda: validator_for(schema_json)) or Unchecked("unusable_schema")
        except Unchecked as e:
            return e


def first_error(schema_json: str, instance: Any, deadline: float,
                turn: TurnValidators | None = None) -> ValidationError | None:
    """The first way `instance` breaks the schema, None if it fits; raises Unchecked when it cannot tell.

    Runs where blocking is allowed (a worker thread): it is bounded by `deadline` (time.monotonic()).
    Pass the turn's TurnValidators so that its candidates share one build of each schema.
    """
    token = _deadline.set(deadline)
    try:
        validator = (turn or TurnValidators()).get(schema_json)
        return _unchecked_on_failure(lambda: next(iter(validator.iter_errors(instance)), None))
    finally:
        _deadline.reset(token)


def _unchecked_on_failure(work: Callable[[], _T]) -> _T:
    """work(), with whatever the client's schema makes jsonschema raise turned into Unchecked."""
    try:
        return work()
    except Unchecked:
        raise
    except RecursionError:
        raise Unchecked("too_deep") from None
    except Exception:  # the client's schema drives jsonschema anywhere; never fail the turn
        # Debug, not warning: a client can cause this on every turn; the metric counts it.
        log.debug("checking tool arguments failed; not enforced", exc_info=True)
        raise Unchecked("checker_error") from None


# -- self-reference -----------------------------------------------------------------------------

# Keywords whose subschemas apply to the same value (no progress into the instance) ...
_SAME_VALUE = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "extends")
_SAME_VALUE_MAPS = ("dependentSchemas", "dependencies")
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")
# ... and those that apply to a member of the value.
_MEMBER = ("items", "additionalItems", "contains", "propertyNames", "additionalProperties",
           "unevaluatedItems", "unevaluatedProperties", "prefixItems")
_MEMBER_MAPS = ("properties", "patternProperties")


def _may_refer(schema: dict) -> bool:
    """A quick filter before the walk: a "$ref"-like key shows in the repr (computed in C) as `ref'`."""
    text = repr(schema)
    return "ref'" in text or "Ref'" in text


def _schemas(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


def self_reference(schema: Any) -> str | None:
    """Why the schema can never be evaluated (it refers back to itself on the same value), or None."""
    if not isinstance(schema, dict) or not _may_refer(schema) or not _mentions(schema, _REFS):
        return None  # without a reference a schema is a finite tree
    try:
        root = Resource.from_contents(schema, default_specification=DRAFT202012)
        resolver = _IN_DOCUMENT_ONLY.with_resource(root.id() or "", root).crawl().resolver(root.id() or "")
    except _RESOLVE_ERRORS:
        return None  # ids the registry cannot read: nothing resolves, so nothing loops

    same: dict[int, list[int]] = {}  # id(schema) -> ids of the schemas it applies to the same value
    names: dict[int, str] = {id(schema): "#"}
    stack = [(schema, resolver)]
    while stack:
        node, res = stack.pop()
        if id(node) in same:
            continue
        edges = same[id(node)] = []
        targets: list[tuple[Any, Any, bool]] = []
        for key in _SAME_VALUE:
            targets += [(s, res, True) for s in _schemas(node.get(key))]
        for key in _SAME_VALUE_MAPS:
            if isinstance(node.get(key), dict):
                targets += [(s, res, True) for s in node[key].values() if isinstance(s, dict)]
        for key in _MEMBER:
            targets += [(s, res, False) for s in _schemas(node.get(key))]
        for key in _MEMBER_MAPS:
            if isinstance(node.get(key), dict):
                targets += [(s, res, False) for s in node[key].values() if isinstance(s, dict)]
        for key in _REFS:
            resolved = _lookup(res, node.get(key))
            if resolved is not None and isinstance(resolved.contents, dict):
                names.setdefault(id(resolved.contents), node[key])
                targets.append((resolved.contents, resolved.resolver, True))
        for sub, sub_res, same_value in targets:
            if same_value:
                edges.append(id(sub))
            stack.append((sub, _entered(sub_res, sub)))
    loop = _cycle(same)
    if loop is None:
        return None
    return (f"the schema at {names.get(loop, 'a subschema')!r} refers back to itself without descending "
            "into the value ($ref/allOf/anyOf/oneOf cycle), so it can never be evaluated")


# What a malformed ref, $id or $schema can raise while resolving: such a ref adds no edge.
_RESOLVE_ERRORS = (referencing.exceptions.Unresolvable, referencing.exceptions.CannotDetermineSpecification,
                   UnknownDialect, AttributeError, TypeError, ValueError)


def _lookup(resolver, ref: Any):
    if not isinstance(ref, str):
        return None
    try:
        return resolver.lookup(ref)
    except _RESOLVE_ERRORS:
        return None  # outside the document, or nowhere


def _entered(resolver, sub: dict):
    """The resolver inside `sub`: its own base URI when it declares an $id."""
    if "$id" not in sub and "id" not in sub:
        return resolver
    try:
        return resolver.in_subresource(Resource.from_contents(sub, default_specification=DRAFT202012))
    except _RESOLVE_ERRORS:
        return resolver


def _cycle(edges: dict[int, list[int]]) -> int | None:
    """A node on a cycle of the graph, or None (iterative DFS: schemas may be deep)."""
    state: dict[int, int] = {}  # 1 on the path, 2 done
    for start, children in edges.items():
        if start in state:
            continue
        path: list[tuple[int, Iterator[int]]] = [(start, iter(children))]
        state[start] = 1
        while path:
            node, pending = path[-1]
            child = next(pending, None)
            if child is None:
                state[node] = 2
                path.pop()
            elif state.get(child) == 1:
                return child
            elif child not in state:
                state[child] = 1
                path.append((child, iter(edges.get(child, ()))))
    return None
