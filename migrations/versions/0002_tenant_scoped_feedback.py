"""feedback idempotency ids scoped by client key; turns.upstream_errors

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANONYMOUS = sa.text('key_id IS NULL')


def upgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_constraint('uq_feedback_client_id', type_='unique')
        batch_op.create_unique_constraint(batch_op.f('uq_feedback_key_id_client_id'), ['key_id', 'client_id'])
    # NULL key ids never conflict in the constraint above: anonymous ids stay unique among themselves.
    op.create_index('uq_feedback_client_id_anonymous', 'feedback', ['client_id'], unique=True,
                    postgresql_where=ANONYMOUS, sqlite_where=ANONYMOUS)
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'upstream_errors', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'),
            nullable=True))


def downgrade() -> None:
    """Fails if two keys hold the same idempotency id: the old schema cannot represent that."""
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('upstream_errors')
    op.drop_index('uq_feedback_client_id_anonymous', table_name='feedback')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_constraint('uq_feedback_key_id_client_id', type_='unique')
        batch_op.create_unique_constraint('uq_feedback_client_id', ['client_id'])
