"""Bare-metal hosts: the inventory of the `baremetal` provider (SSH address, key references,
pinned host key, type, price, availability windows and the instance that claimed each).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('hosts',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), server_default='22', nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('private_key_ref', sa.String(length=1024), nullable=False),
    sa.Column('host_key', sa.Text(), nullable=False),
    sa.Column('instance_type', sa.String(length=128), nullable=False),
    sa.Column('gpus', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('hourly_price', sa.Numeric(precision=12, scale=4), server_default='0', nullable=False),
    sa.Column('currency', sa.String(length=3), server_default='EUR', nullable=False),
    sa.Column('availability', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('requires_gpu_check', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('claimed_by', sa.UUID(), nullable=True),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('port BETWEEN 1 AND 65535', name=op.f('ck_hosts_port')),
    sa.CheckConstraint('hourly_price >= 0', name=op.f('ck_hosts_price')),
    sa.CheckConstraint('(claimed_by IS NULL) = (claimed_at IS NULL)', name=op.f('ck_hosts_claim')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts')),
    sa.UniqueConstraint('claimed_by', name=op.f('uq_hosts_claimed_by')),
    sa.UniqueConstraint('name', name=op.f('uq_hosts_name'))
    )
    op.create_index(op.f('ix_hosts_instance_type'), 'hosts', ['instance_type'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_hosts_instance_type'), table_name='hosts')
    op.drop_table('hosts')
