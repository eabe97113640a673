"""the critic loop: which critic decided a turn (turns.decided_by, judge_reason, critics_agreed, the
judge's tokens), the LLM critic's score and reason per candidate, and candidate_labels for teacher,
veto and outcome labels; an index on conversations.key_id

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decided_by', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('judge_reason', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('critics_agreed', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('judge_prompt_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('judge_completion_tokens', sa.Integer(), nullable=True))
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('judge_score', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('judge_reason', sa.Text(), nullable=True))
    op.create_table(
        'candidate_labels',
        sa.Column('id', BigId, autoincrement=True, nullable=False),
        sa.Column('turn_id', sa.String(length=64), nullable=False),
        sa.Column('candidate_idx', sa.Integer(), nullable=False),
        sa.Column('labeler', sa.String(length=200), nullable=False),
        sa.Column('score', sa.Double(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_candidate_labels')),
        sa.UniqueConstraint('turn_id', 'candidate_idx', 'labeler',
                            name=op.f('uq_candidate_labels_turn_id_candidate_idx_labeler')),
    )
    op.create_index(op.f('ix_candidate_labels_turn_id'), 'candidate_labels', ['turn_id'], unique=False)
    # The turn inspector's key filter and the per-key feedback lookups join on it.
    op.create_index(op.f('ix_conversations_key_id'), 'conversations', ['key_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_conversations_key_id'), table_name='conversations')
    op.drop_index(op.f('ix_candidate_labels_turn_id'), table_name='candidate_labels')
    op.drop_table('candidate_labels')
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.drop_column('judge_reason')
        batch_op.drop_column('judge_score')
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_column('judge_completion_tokens')
        batch_op.drop_column('judge_prompt_tokens')
        batch_op.drop_column('critics_agreed')
        batch_op.drop_column('judge_reason')
        batch_op.drop_column('decided_by')
