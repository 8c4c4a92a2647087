"""Initial schema: instances, their history, actions and volumes, the event feed,
processed commands and API keys.

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 14:49:05.334049
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('scopes', postgresql.ARRAY(sa.String(length=32)), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_table('events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=True),
    sa.Column('data', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events'))
    )
    op.create_index(op.f('ix_events_instance_id_id'), 'events', ['instance_id', 'id'], unique=False)
    op.create_table('instances',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('zone', sa.String(length=64), nullable=True),
    sa.Column('instance_type', sa.String(length=128), nullable=False),
    sa.Column('model', sa.String(length=512), nullable=False),
    sa.Column('labels', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('status', sa.String(length=32), server_default='provisioning', nullable=False),
    sa.Column('desired_state', sa.String(length=16), server_default='running', nullable=False),
    sa.Column('desired_reason', sa.Text(), nullable=True),
    sa.Column('progress', sa.SmallInteger(), server_default='0', nullable=False),
    sa.Column('phase', sa.String(length=128), nullable=True),
    sa.Column('provider_instance_id', sa.String(length=256), nullable=True),
    sa.Column('ip', sa.String(length=64), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('agent_token_hash', sa.String(length=64), nullable=True),
    sa.Column('agent_version', sa.String(length=64), nullable=True),
    sa.Column('agent_build_date', sa.String(length=32), nullable=True),
    sa.Column('agent_checksum', sa.String(length=64), nullable=True),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_by_command', sa.String(length=256), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('status_changed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('boot_deadline_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('terminated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_check_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('lock_token', sa.UUID(), nullable=True),
    sa.Column('lock_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("desired_state IN ('running', 'drained', 'terminated')", name=op.f('ck_instances_desired')),
    sa.CheckConstraint("status IN ('provisioning', 'booting', 'ready', 'draining', 'terminating', 'terminated', 'archived', 'startup_failed', 'provider_deleted')", name=op.f('ck_instances_status')),
    sa.CheckConstraint('progress BETWEEN 0 AND 100', name=op.f('ck_instances_progress')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('agent_token_hash', name=op.f('uq_instances_agent_token_hash')),
    sa.UniqueConstraint('provider_instance_id', name=op.f('uq_instances_provider_instance_id'))
    )
    op.create_index(op.f('ix_instances_created_at_id'), 'instances', ['created_at', 'id'], unique=False)
    op.create_index(op.f('ix_instances_status_next_check_at'), 'instances', ['status', 'next_check_at'], unique=False)
    op.create_table('processed_commands',
    sa.Column('id', sa.String(length=256), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('instance_id', sa.UUID(), nullable=True),
    sa.Column('stream_entry_id', sa.String(length=64), nullable=True),
    sa.Column('processed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_processed_commands'))
    )
    op.create_table('instance_actions',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=False),
    sa.Column('action_type', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'abandoned')", name=op.f('ck_instance_actions_status')),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_instance_actions_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance_actions'))
    )
    op.create_index(op.f('ix_instance_actions_instance_id_id'), 'instance_actions', ['instance_id', 'id'], unique=False)
    op.create_table('instance_state_history',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=False),
    sa.Column('from_status', sa.String(length=32), nullable=True),
    sa.Column('to_status', sa.String(length=32), nullable=False),
    sa.Column('transition', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_instance_state_history_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance_state_history'))
    )
    op.create_index(op.f('ix_instance_state_history_instance_id_id'), 'instance_state_history', ['instance_id', 'id'], unique=False)
    op.create_table('instance_volumes',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.UUID(), nullable=False),
    sa.Column('provider_volume_id', sa.String(length=256), nullable=False),
    sa.Column('volume_type', sa.String(length=64), nullable=False),
    sa.Column('size_gb', sa.Integer(), nullable=False),
    sa.Column('is_boot', sa.Boolean(), nullable=False),
    sa.Column('delete_on_terminate', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), server_default='attached', nullable=False),
    sa.Column('discovered_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('attached', 'detached', 'deleting', 'deleted', 'kept', 'gone')", name=op.f('ck_instance_volumes_status')),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_instance_volumes_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instance_volumes'))
    )
    op.create_index(op.f('ix_instance_volumes_instance_id_provider_volume_id'), 'instance_volumes', ['instance_id', 'provider_volume_id'], unique=True)


def downgrade() -> None:
    op.drop_index(op.f('ix_instance_volumes_instance_id_provider_volume_id'), table_name='instance_volumes')
    op.drop_table('instance_volumes')
    op.drop_index(op.f('ix_instance_state_history_instance_id_id'), table_name='instance_state_history')
    op.drop_table('instance_state_history')
    op.drop_index(op.f('ix_instance_actions_instance_id_id'), table_name='instance_actions')
    op.drop_table('instance_actions')
    op.drop_table('processed_commands')
    op.drop_index(op.f('ix_instances_status_next_check_at'), table_name='instances')
    op.drop_index(op.f('ix_instances_created_at_id'), table_name='instances')
    op.drop_table('instances')
    op.drop_index(op.f('ix_events_instance_id_id'), table_name='events')
    op.drop_table('events')
    op.drop_table('api_keys')
