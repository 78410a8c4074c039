"""job priority and devices, device usage

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 05:00:39.536979
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_usage',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=False),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('started_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('ended_at_ms', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('device_usage', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_usage_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_device_usage_worker_device', ['worker', 'device'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch_op.add_column(sa.Column('devices', sa.Integer(), server_default=sa.text('1'), nullable=False))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('devices')
        batch_op.drop_column('priority')

    with op.batch_alter_table('device_usage', schema=None) as batch_op:
        batch_op.drop_index('ix_device_usage_worker_device')
        batch_op.drop_index(batch_op.f('ix_device_usage_job_id'))

    op.drop_table('device_usage')
