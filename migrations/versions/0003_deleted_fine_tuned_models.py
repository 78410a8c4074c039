"""deleted fine-tuned models, pause and resume

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 02:40:21.337301
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model_deleted_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('pause_requested', sa.Boolean(), nullable=False, server_default=sa.text('false')))
        batch_op.add_column(sa.Column('resume_key', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('resume_sha256', sa.String(length=64), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('resume_sha256')
        batch_op.drop_column('resume_key')
        batch_op.drop_column('pause_requested')
        batch_op.drop_column('model_deleted_at')

