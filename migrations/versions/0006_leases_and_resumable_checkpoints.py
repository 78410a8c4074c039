"""leases and resumable checkpoints

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 03:49:43.073943
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resumable', sa.Boolean(), server_default=sa.text('false'), nullable=False))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_expires_at', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')

    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('resumable')

