"""conversation store: conversations, turns, candidates, feedback, prefix links, critic versions

Revision ID: 0001
Revises: 
Create Date: 2026-11-24
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('conversations',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('route', sa.String(length=200), nullable=True),
    sa.Column('key_id', sa.String(length=64), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('attributes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations'))
    )
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversations_external_id'), ['external_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_conversations_last_seen'), ['last_seen'], unique=False)

    op.create_table('critic_versions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('version', sa.String(length=200), nullable=False),
    sa.Column('digest', sa.String(length=128), nullable=True),
    sa.Column('manifest', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('activated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_critic_versions')),
    sa.UniqueConstraint('name', 'version', name=op.f('uq_critic_versions_name_version'))
    )
    op.create_table('feedback',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('turn_id', sa.String(length=64), nullable=True),
    sa.Column('conversation_id', sa.String(length=64), nullable=True),
    sa.Column('reward', sa.Float(), nullable=True),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('client_id', sa.String(length=200), nullable=True),
    sa.Column('key_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback')),
    sa.UniqueConstraint('client_id', name=op.f('uq_feedback_client_id'))
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_feedback_conversation_id'), ['conversation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_feedback_turn_id'), ['turn_id'], unique=False)

    op.create_table('conversation_links',
    sa.Column('prefix_hash', sa.String(length=64), nullable=False),
    sa.Column('conversation_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_conversation_links_conversation_id_conversations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('prefix_hash', name=op.f('pk_conversation_links'))
    )
    with op.batch_alter_table('conversation_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_conversation_links_conversation_id'), ['conversation_id'], unique=False)

    op.create_table('turns',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('conversation_id', sa.String(length=64), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('request_messages', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('tools', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('client_metadata', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('route', sa.String(length=200), nullable=False),
    sa.Column('mode', sa.String(length=32), nullable=False),
    sa.Column('upstream_model', sa.String(length=200), nullable=True),
    sa.Column('decision', sa.String(length=32), nullable=False),
    sa.Column('chosen_index', sa.Integer(), nullable=True),
    sa.Column('critic_name', sa.String(length=200), nullable=True),
    sa.Column('critic_version', sa.String(length=200), nullable=True),
    sa.Column('latency_total_ms', sa.Double(), nullable=True),
    sa.Column('latency_upstream_ms', sa.Double(), nullable=True),
    sa.Column('latency_critic_ms', sa.Double(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('rounds', sa.Integer(), nullable=False),
    sa.Column('candidates_saved', sa.Integer(), nullable=False),
    sa.Column('feedback_texts', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_turns_conversation_id_conversations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_turns'))
    )
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.create_index('ix_turns_conversation_id_idx', ['conversation_id', 'idx'], unique=False)
        batch_op.create_index(batch_op.f('ix_turns_created_at'), ['created_at'], unique=False)

    op.create_table('candidates',
    sa.Column('turn_id', sa.String(length=64), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('message', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('verdict', sa.String(length=16), nullable=False),
    sa.Column('veto_reason', sa.String(length=64), nullable=True),
    sa.Column('veto_detail', sa.Text(), nullable=True),
    sa.Column('score', sa.Double(), nullable=True),
    sa.Column('upstream_latency_ms', sa.Double(), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['turn_id'], ['turns.id'], name=op.f('fk_candidates_turn_id_turns'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('turn_id', 'idx', name=op.f('pk_candidates'))
    )


def downgrade() -> None:
    op.drop_table('candidates')
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_turns_created_at'))
        batch_op.drop_index('ix_turns_conversation_id_idx')

    op.drop_table('turns')
    with op.batch_alter_table('conversation_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversation_links_conversation_id'))

    op.drop_table('conversation_links')
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_feedback_turn_id'))
        batch_op.drop_index(batch_op.f('ix_feedback_created_at'))
        batch_op.drop_index(batch_op.f('ix_feedback_conversation_id'))

    op.drop_table('feedback')
    op.drop_table('critic_versions')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_conversations_last_seen'))
        batch_op.drop_index(batch_op.f('ix_conversations_external_id'))

    op.drop_table('conversations')
