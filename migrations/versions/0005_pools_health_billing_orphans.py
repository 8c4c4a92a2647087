"""Pools, instance health, billing times and orphan machines (issue 5).

Billing times of existing instances are filled from their history: from the entry into
`booting` until the entry into `terminated` or `provider_deleted`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 12:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('orphan_machines',
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('provider_instance_id', sa.String(length=256), nullable=False),
    sa.Column('instance_tag', sa.String(length=64), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('terminated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('provider', 'provider_instance_id', name=op.f('pk_orphan_machines'))
    )
    op.create_table('pools',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('model', sa.String(length=512), nullable=False),
    sa.Column('model_spec', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('offers', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('gpu_model', sa.String(length=64), nullable=True),
    sa.Column('labels', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('min_size', sa.Integer(), nullable=False),
    sa.Column('max_size', sa.Integer(), nullable=False),
    sa.Column('desired_size', sa.Integer(), nullable=False),
    sa.Column('policy', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('pressure_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('idle_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_scaled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('generation', sa.Integer(), server_default='0', nullable=False),
    sa.Column('deleting_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('desired_size BETWEEN min_size AND max_size', name=op.f('ck_pools_desired')),
    sa.CheckConstraint('min_size >= 0 AND min_size <= max_size AND max_size <= 1000', name=op.f('ck_pools_bounds')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pools')),
    sa.UniqueConstraint('name', name=op.f('uq_pools_name'))
    )
    op.add_column('instances', sa.Column('pool_id', sa.UUID(), nullable=True))
    op.add_column('instances', sa.Column('health', sa.String(length=16), server_default='unknown', nullable=False))
    op.add_column('instances', sa.Column('health_reason', sa.Text(), nullable=True))
    op.add_column('instances', sa.Column('health_changed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('instances', sa.Column('billed_from', sa.DateTime(timezone=True), nullable=True))
    op.add_column('instances', sa.Column('billed_until', sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f('ix_instances_pool_id_status'), 'instances', ['pool_id', 'status'], unique=False)
    op.create_foreign_key(op.f('fk_instances_pool_id_pools'), 'instances', 'pools', ['pool_id'], ['id'], ondelete='SET NULL')
    op.create_check_constraint(op.f('ck_instances_health'), 'instances',
                               "health IN ('unknown', 'healthy', 'unhealthy')")
    op.execute("UPDATE instances i SET billed_from = (SELECT min(at) FROM instance_state_history h"
               " WHERE h.instance_id = i.id AND h.to_status = 'booting'),"
               " billed_until = (SELECT min(at) FROM instance_state_history h WHERE h.instance_id = i.id"
               " AND h.to_status IN ('terminated', 'provider_deleted'))")


def downgrade() -> None:
    op.drop_constraint(op.f('ck_instances_health'), 'instances', type_='check')
    op.drop_constraint(op.f('fk_instances_pool_id_pools'), 'instances', type_='foreignkey')
    op.drop_index(op.f('ix_instances_pool_id_status'), table_name='instances')
    op.drop_column('instances', 'billed_until')
    op.drop_column('instances', 'billed_from')
    op.drop_column('instances', 'health_changed_at')
    op.drop_column('instances', 'health_reason')
    op.drop_column('instances', 'health')
    op.drop_column('instances', 'pool_id')
    op.drop_table('pools')
    op.drop_table('orphan_machines')
