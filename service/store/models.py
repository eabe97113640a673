"""The conversation store's tables (SQLAlchemy 2.0). Alembic's migrations/ must agree with these:
tests/test_store_schema.py compares them on SQLite and PostgreSQL.

JSON columns are JSONB on PostgreSQL. Times are timezone-aware UTC. Ids are text: turn ids come
from the gate (`x-turngate-turn-id`), conversation ids are derived by service.store.threading.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT autoincrement on Postgres, INTEGER PRIMARY KEY (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}


EXTERNAL_ID_CHARS = 200  # conversations.external_id: longer ids are stored cut (service.store.boundary)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict] = {dict[str, Any]: JSONType, list[Any]: JSONType,
                                           datetime: DateTime(timezone=True)}
    # Every model here is mapped to a Table (SQLAlchemy types __table__ as any FromClause).
    __table__: ClassVar[Table]


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime] = mapped_column(index=True)
    route: Mapped[str | None] = mapped_column(String(200))
    key_id: Mapped[str | None] = mapped_column(String(64), index=True)  # the inspector and tenancy filter on it
    external_id: Mapped[str | None] = mapped_column(String(EXTERNAL_ID_CHARS), index=True)  # the client's own id
    # What an import carried beside the messages (source, task_id, gold_actions, ...), for export.
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Turn(Base):
    __tablename__ = "turns"
    __table_args__ = (Index("ix_turns_conversation_id_idx", "conversation_id", "idx"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("conversations.id", ondelete="CASCADE"))
    idx: Mapped[int]  # position in the conversation: assistant messages before this turn
    request_messages: Mapped[list[Any]] = mapped_column(JSONType)
    tools: Mapped[list[Any] | None] = mapped_column(JSONType)
    client_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    route: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(32))
    upstream_model: Mapped[str | None] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(32))
    chosen_index: Mapped[int | None]
    critic_name: Mapped[str | None] = mapped_column(String(200))
    critic_version: Mapped[str | None] = mapped_column(String(200))
    latency_total_ms: Mapped[float | None]
    latency_upstream_ms: Mapped[float | None]
    latency_critic_ms: Mapped[float | None]
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    rounds: Mapped[int]
    candidates_saved: Mapped[int]
    feedback_texts: Mapped[list[Any] | None] = mapped_column(JSONType)  # intervention texts
    error: Mapped[str | None] = mapped_column(Text)
    # Candidate calls that failed or were given up while the turn still answered: [{kind, message}].
    upstream_errors: Mapped[list[Any] | None] = mapped_column(JSONType)
    # Which critic chose ("encoder", "llm"; None where no critic ran), and where the cascade called the
    # LLM critic: why (margin, agreement, write) and whether its pick was the encoder's.
    decided_by: Mapped[str | None] = mapped_column(String(16))
    judge_reason: Mapped[str | None] = mapped_column(String(32))
    critics_agreed: Mapped[bool | None]
    judge_prompt_tokens: Mapped[int | None]  # turngate's own cost of the judge: not in the client's usage
    judge_completion_tokens: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(index=True)


class Candidate(Base):
    __tablename__ = "candidates"

    turn_id: Mapped[str] = mapped_column(String(64), ForeignKey("turns.id", ondelete="CASCADE"),
                                         primary_key=True)
    idx: Mapped[int] = mapped_column(primary_key=True)
    round: Mapped[int]
    message: Mapped[dict[str, Any]] = mapped_column(JSONType)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    verdict: Mapped[str] = mapped_column(String(16))
    veto_reason: Mapped[str | None] = mapped_column(String(64))
    veto_detail: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None]
    features: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # the critic's turn features
    contributions: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # their shares of the logit
    upstream_latency_ms: Mapped[float | None]
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # the upstream's, details included
    logprobs: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # kept when the route says record_logprobs
    upstream_request_id: Mapped[str | None] = mapped_column(String(200))  # the upstream's x-request-id
    judge_score: Mapped[float | None]  # the LLM critic's, when the cascade called it on this turn
    judge_reason: Mapped[str | None] = mapped_column(Text)  # its one-sentence reason


class Feedback(Base):
    """An outcome for a turn or a whole conversation. No foreign key on turn_id: feedback may
    arrive while its turn is still in a replica's writer queue or spool.

    The client's idempotency id is unique per client key: (key_id, client_id). Anonymous rows
    (key_id NULL) would never conflict there, NULLs being distinct on both databases, so a
    partial unique index keeps their ids unique among themselves."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("key_id", "client_id"),
        Index("uq_feedback_client_id_anonymous", "client_id", unique=True,
              postgresql_where=text("key_id IS NULL"), sqlite_where=text("key_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    turn_id: Mapped[str | None] = mapped_column(String(64), index=True)
    conversation_id: Mapped[str | None] = mapped_column(String(64), index=True)
    reward: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    client_id: Mapped[str | None] = mapped_column(String(200))  # the client's idempotency id
    key_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(index=True)


class CandidateLabel(Base):
    """A label for one logged candidate, for training: a teacher judge's score (`turngate critic
    label`), a structural veto, or an outcome. One per candidate and labeller: `labeler` names who
    ("judge:<model>@<rubric_version>", "veto", "outcome"), so relabelling with a new rubric adds rows."""

    __tablename__ = "candidate_labels"
    __table_args__ = (UniqueConstraint("turn_id", "candidate_idx", "labeler"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(String(64), index=True)
    candidate_idx: Mapped[int]
    labeler: Mapped[str] = mapped_column(String(200))
    score: Mapped[float]  # in [0, 1]: how good the candidate is
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class ConversationLink(Base):
    """prefix hash -> conversation: how the next turn of a resent history finds its conversation."""

    __tablename__ = "conversation_links"

    prefix_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]


class CriticVersion(Base):
    __tablename__ = "critic_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str | None] = mapped_column(String(128))
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    activated_at: Mapped[datetime | None]


class ApiKey(Base):
    """A client key issued through the admin API. Only an HMAC of the secret is stored (keyed with
    the server-side TURNGATE_KEY_HASH_SECRET), and its first characters to tell keys apart.
    A deleted key keeps its row (revoked_at set): its traffic and spend stay attributable."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    routes: Mapped[list[Any] | None] = mapped_column(JSONType)  # allowed aliases; None = every route
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str | None] = mapped_column(String(8))  # "day" | "month"
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class RouteOverride(Base):
    """A route set through the admin API. It replaces the YAML route of the same alias; `deleted`
    removes one (the YAML file only seeds routes)."""

    __tablename__ = "route_overrides"

    alias: Mapped[str] = mapped_column(String(200), primary_key=True)
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # RouteSettings fields; None when deleted
    deleted: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime]


class AuditEntry(Base):
    """Every control-plane change: who, when, what, before and after (secrets masked). Its id is
    also the control plane's generation: a replica that sees a higher one reloads."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))  # e.g. key.create, route.put, critic.activate
    target: Mapped[str | None] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
