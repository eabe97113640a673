"""Client keys issued through the admin API: stored as HMACs, cached whole on every replica.

The secret is shown once, at creation; the database keeps HMAC-SHA256(TURNGATE_KEY_HASH_SECRET,
secret) and its first characters (`prefix`) to tell keys apart. A bare digest would let anyone who
reads the table test guesses offline; the HMAC needs the server-side secret as well.

Every replica holds every key (revoked ones too) in a dict by HMAC, reloaded whole by the control
plane after each change (service.control.plane): the request path computes one HMAC and looks it up,
and never queries the database. Expiry is checked against the clock at request time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.control.key_policy import BudgetPeriod, KeyPolicy
from service.control.plane import audit
from service.store.cursors import decode_cursor, encode_cursor
from service.store.models import ApiKey

SECRET_PREFIX = "tg-"
PREFIX_CHARS = 10  # of the secret, stored and shown: "tg-" and 7 random characters
ID_PATTERN = re.compile(r"key_[0-9a-f]{16}")
ACTOR = "admin"
# What an operator may set on a key (and PATCH); the rest is the server's.
EDITABLE = ("name", "routes", "rpm", "tpm", "budget_tokens", "budget_period", "expires_at")


class KeyHashSecretMissing(Exception):
    """Keys cannot be issued (nor looked up) without TURNGATE_KEY_HASH_SECRET."""


class UnknownKey(Exception):
    """No key with that id, or (for a change) the key was revoked."""


class InvalidKeyFields(ValueError):
    """The fields of a key disagree with each other (after a PATCH merged them)."""


def hash_key(hash_secret: str, key: str) -> str:
    """The stored form of a client key: 64 hex digits."""
    return hmac.new(hash_secret.encode(), key.encode("latin-1", "replace"), hashlib.sha256).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def new_id() -> str:
    return "key_" + secrets.token_hex(8)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands times back without their zone; every stored time is UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def check_budget(budget_tokens: int | None, budget_period: str | None) -> None:
    if budget_period is not None and budget_tokens is None:
        raise InvalidKeyFields("budget_period needs budget_tokens: a budget is N tokens per day or month")
    if budget_tokens is not None and budget_period is None:
        raise InvalidKeyFields("budget_tokens needs budget_period: \"day\" or \"month\"")


def view(row: Any) -> dict[str, Any]:
    """A key as the admin API shows it (and the audit log records it): never the secret nor its HMAC."""
    revoked_at = aware(row.revoked_at)
    return {"id": row.id, "object": "api_key", "name": row.name, "prefix": row.prefix,
            "routes": list(row.routes) if row.routes is not None else None, "rpm": row.rpm, "tpm": row.tpm,
            "budget_tokens": row.budget_tokens, "budget_period": row.budget_period,
            "expires_at": aware(row.expires_at), "created_at": aware(row.created_at),
            "updated_at": aware(row.updated_at), "revoked_at": revoked_at, "revoked": revoked_at is not None}


def _audited(v: dict[str, Any]) -> dict[str, Any]:
    return {k: x.isoformat() if isinstance(x, datetime) else x for k, x in v.items()}


_COLUMNS = [ApiKey.__table__.c[name] for name in
            ("id", "name", "prefix", "routes", "rpm", "tpm", "budget_tokens", "budget_period", "expires_at",
             "created_at", "updated_at", "revoked_at")]


# -- the admin API's operations (each change and its audit row in one transaction) ----------------

async def create_key(engine: AsyncEngine, hash_secret: str | None, fields: dict[str, Any]) -> tuple[dict, str]:
    """(the key's view, its secret). `fields`: validated EDITABLE values."""
    if not hash_secret:
        raise KeyHashSecretMissing()
    check_budget(fields.get("budget_tokens"), fields.get("budget_period"))
    secret, now = new_secret(), datetime.now(UTC)
    values = {**{f: fields.get(f) for f in EDITABLE}, "id": new_id(), "prefix": secret[:PREFIX_CHARS],
              "secret_hash": hash_key(hash_secret, secret), "created_at": now, "updated_at": now,
              "revoked_at": None}
    async with engine.begin() as conn:
        await conn.execute(insert(ApiKey).values(**values))
        created = view((await conn.execute(select(*_COLUMNS).where(ApiKey.id == values["id"]))).one())
        await audit(conn, ACTOR, "key.create", created["id"], None, _audited(created))
    return created, secret


async def list_keys(engine: AsyncEngine, limit: int, cursor: str | None = None,
                    revoked: bool | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of keys, newest first (revoked ones too, or only them, or none), and the cursor of
    the next page (None at the end). BadCursor when `cursor` is not one this function gave out."""
    conds: list[Any] = []
    if revoked is not None:
        conds.append(ApiKey.revoked_at.is_not(None) if revoked else ApiKey.revoked_at.is_(None))
    if cursor is not None:
        at, last_id = decode_cursor(cursor)
        conds.append(or_(ApiKey.created_at < at, and_(ApiKey.created_at == at, ApiKey.id < last_id)))
    q = select(*_COLUMNS).where(*conds).order_by(ApiKey.created_at.desc(), ApiKey.id.desc()).limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    page = rows[:limit]
    more = len(rows) > limit
    return [view(r) for r in page], encode_cursor(page[-1].created_at, page[-1].id) if more and page else None


async def _row(conn: AsyncConnection, key_id: str) -> Any:
    if not ID_PATTERN.fullmatch(key_id):  # not an id turngate issues: no query (and no NUL sent to the database)
        raise UnknownKey(key_id)
    row = (await conn.execute(select(*_COLUMNS).where(ApiKey.id == key_id))).one_or_none()
    if row is None:
        raise UnknownKey(key_id)
    return row


async def _change(conn: AsyncConnection, key_id: str, values: dict[str, Any]) -> None:
    # Only a key still live: of two concurrent revocations, one wins and the other is told 404.
    result = await conn.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(**values))
    if result.rowcount == 0:
        raise UnknownKey(key_id)


async def get_key(engine: AsyncEngine, key_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        return view(await _row(conn, key_id))


async def update_key(engine: AsyncEngine, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes`: the EDITABLE fields the PATCH named (None clears). A revoked key cannot change."""
    async with engine.begin() as conn:
        before = view(await _row(conn, key_id))
        if before["revoked"]:
            raise UnknownKey(key_id)
        if "budget_tokens" in changes and changes["budget_tokens"] is None and "budget_period" not in changes:
            changes = {**changes, "budget_period": None}  # clearing the budget clears its period
        merged = {**before, **changes}
        check_budget(merged["budget_tokens"], merged["budget_period"])
        await _change(conn, key_id, {**changes, "updated_at": datetime.now(UTC)})
        after = view(await _row(conn, key_id))
        await audit(conn, ACTOR, "key.update", key_id, _audited(before), _audited(after))
    return after


async def revoke_key(engine: AsyncEngine, key_id: str) -> dict[str, Any]:
    """Sets revoked_at; the row stays, so the key's turns and spend stay attributable."""
    async with engine.begin() as conn:
        before = view(await _row(conn, key_id))
        if before["revoked"]:
            raise UnknownKey(key_id)
        now = datetime.now(UTC)
        await _change(conn, key_id, {"revoked_at": now, "updated_at": now})
        after = view(await _row(conn, key_id))
        await audit(conn, ACTOR, "key.revoke", key_id, _audited(before), _audited(after))
    return after


# -- the request path's cache -----------------------------------------------------------------------

@dataclass(frozen=True)
class IssuedKey:
    policy: KeyPolicy
    revoked: bool

    def refusal(self, now: datetime) -> str | None:
        """Why this key cannot be used now, or None."""
        if self.revoked:
            return "This API key has been revoked."
        expires = self.policy.expires_at
        if expires is not None and expires <= now:
            return f"This API key expired at {expires.isoformat()}."
        return None


def _policy(row: Any) -> KeyPolicy:
    period: BudgetPeriod | None = row.budget_period if row.budget_period in ("day", "month") else None
    return KeyPolicy(id=row.id, name=row.name, routes=tuple(row.routes) if row.routes is not None else None,
                     rpm=row.rpm, tpm=row.tpm, budget_tokens=row.budget_tokens, budget_period=period,
                     expires_at=aware(row.expires_at))


class KeyCache:
    """Every issued key of the database, by HMAC, on this replica."""

    def __init__(self, hash_secret: str | None, needs_load: bool = False) -> None:
        self.hash_secret = hash_secret
        self._loaded = not needs_load
        self._by_hash: dict[str, IssuedKey] = {}

    async def reload(self, conn: AsyncConnection) -> None:
        rows = (await conn.execute(select(ApiKey))).all()
        by_hash = {r.secret_hash: IssuedKey(_policy(r), r.revoked_at is not None) for r in rows}
        self._by_hash = by_hash  # one assignment: a request sees the old keys or the new ones
        self._loaded = True

    @property
    def ready(self) -> bool:
        """False while a replica that issues keys (a hash secret set) has not read them yet (its
        database was away at start): it cannot tell an issued key, or whether keys are required."""
        return self._loaded or self.hash_secret is None

    def lookup(self, key: str) -> IssuedKey | None:
        """The issued key whose secret `key` is, revoked or expired included; None for any other string."""
        if not self._by_hash or not self.hash_secret:
            return None
        # A dict lookup by HMAC: its timing depends on the HMAC, which tells nothing without the hash secret.
        return self._by_hash.get(hash_key(self.hash_secret, key))

    @property
    def any_issued(self) -> bool:
        """A key was ever issued: client keys are required from then on. Revoking the last one must
        not open the gateway to anyone."""
        return bool(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_hash)
