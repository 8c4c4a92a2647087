"""Agent for real: model spec, agent integrity and credential revocation on instances,
heartbeat metrics as a time series, agent commands and join tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 16:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('instances', sa.Column('model_spec', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.add_column('instances', sa.Column('agent_integrity', sa.String(length=16), server_default='unknown', nullable=False))
    op.add_column('instances', sa.Column('agent_integrity_detail', sa.Text(), nullable=True))
    op.add_column('instances', sa.Column('credential_revoked_at', sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f('ck_instances_integrity'), 'instances', "agent_integrity IN ('unknown', 'verified', 'mismatch')")
    op.create_table('instance_metrics',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('gpus', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('vllm', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('engine', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_instance_metrics_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance_metrics'))
    )
    op.create_index(op.f('ix_instance_metrics_instance_id_at'), 'instance_metrics', ['instance_id', 'at'], unique=False)
    op.create_index(op.f('ix_instance_metrics_at'), 'instance_metrics', ['at'], unique=False)
    op.create_table('agent_commands',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('args', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('acked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.CheckConstraint("kind IN ('drain', 'restart_engine', 'upgrade', 'stop')", name=op.f('ck_agent_commands_kind')),
    sa.CheckConstraint("outcome IN ('done', 'failed', 'ignored')", name=op.f('ck_agent_commands_outcome')),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_agent_commands_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_agent_commands'))
    )
    op.create_index(op.f('ix_agent_commands_instance_id_acked_at'), 'agent_commands', ['instance_id', 'acked_at'], unique=False)
    op.create_table('join_tokens',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('instance_type', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=512), nullable=False),
    sa.Column('model_spec', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('labels', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('instance_id', sa.UUID(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_join_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_join_tokens_token_hash'))
    )


def downgrade() -> None:
    op.drop_table('join_tokens')
    op.drop_index(op.f('ix_agent_commands_instance_id_acked_at'), table_name='agent_commands')
    op.drop_table('agent_commands')
    op.drop_index(op.f('ix_instance_metrics_at'), table_name='instance_metrics')
    op.drop_index(op.f('ix_instance_metrics_instance_id_at'), table_name='instance_metrics')
    op.drop_table('instance_metrics')
    op.drop_constraint(op.f('ck_instances_integrity'), 'instances', type_='check')
    op.drop_column('instances', 'credential_revoked_at')
    op.drop_column('instances', 'agent_integrity_detail')
    op.drop_column('instances', 'agent_integrity')
    op.drop_column('instances', 'model_spec')
