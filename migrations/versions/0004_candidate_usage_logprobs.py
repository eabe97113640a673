"""candidates.usage, candidates.logprobs and candidates.upstream_request_id: the upstream's usage with
its details, the token logprobs a route keeps, and the id of the call that gave the candidate

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('usage', JSON, nullable=True))
        batch_op.add_column(sa.Column('logprobs', JSON, nullable=True))
        batch_op.add_column(sa.Column('upstream_request_id', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.drop_column('upstream_request_id')
        batch_op.drop_column('logprobs')
        batch_op.drop_column('usage')
