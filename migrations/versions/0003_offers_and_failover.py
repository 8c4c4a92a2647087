"""Failover across offers: the acceptable offers of an instance, the one tried now, and its
hourly price.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 18:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('instances', sa.Column('offers', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False))
    op.add_column('instances', sa.Column('offer_index', sa.SmallInteger(), server_default='0', nullable=False))
    op.add_column('instances', sa.Column('hourly_price', sa.Numeric(precision=12, scale=4), nullable=True))
    op.add_column('instances', sa.Column('currency', sa.String(length=3), nullable=True))


def downgrade() -> None:
    op.drop_column('instances', 'currency')
    op.drop_column('instances', 'hourly_price')
    op.drop_column('instances', 'offer_index')
    op.drop_column('instances', 'offers')
