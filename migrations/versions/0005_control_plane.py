"""api_keys, route_overrides and audit_log: the control plane's keys, run-time routes and its
audit trail (whose id is the generation every replica polls)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('prefix', sa.String(length=16), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('routes', JSON, nullable=True),
        sa.Column('rpm', sa.Integer(), nullable=True),
        sa.Column('tpm', sa.Integer(), nullable=True),
        sa.Column('budget_tokens', sa.BigInteger(), nullable=True),
        sa.Column('budget_period', sa.String(length=8), nullable=True),
        sa.Column('expires_at', When, nullable=True),
        sa.Column('created_at', When, nullable=False),
        sa.Column('updated_at', When, nullable=False),
        sa.Column('revoked_at', When, nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('secret_hash', name=op.f('uq_api_keys_secret_hash')),
    )
    op.create_table(
        'route_overrides',
        sa.Column('alias', sa.String(length=200), nullable=False),
        sa.Column('spec', JSON, nullable=True),
        sa.Column('deleted', sa.Boolean(), nullable=False),
        sa.Column('updated_at', When, nullable=False),
        sa.PrimaryKeyConstraint('alias', name=op.f('pk_route_overrides')),
    )
    op.create_table(
        'audit_log',
        sa.Column('id', BigId, autoincrement=True, nullable=False),
        sa.Column('at', When, nullable=False),
        sa.Column('actor', sa.String(length=200), nullable=False),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.String(length=200), nullable=True),
        sa.Column('before', JSON, nullable=True),
        sa.Column('after', JSON, nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log')),
    )
    op.create_index(op.f('ix_audit_log_at'), 'audit_log', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_log_at'), table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_table('route_overrides')
    op.drop_table('api_keys')
