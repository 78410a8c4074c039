"""the evaluation of an older job, asked for on demand: its state, claim and error

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluation_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("evaluation_lease_expires_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("evaluation_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("evaluation_error")
        batch_op.drop_column("evaluation_lease_expires_at")
        batch_op.drop_column("evaluation_status")
