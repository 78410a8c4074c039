"""validation reports and model modules

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 02:03:49.209784
"""

from alembic import op
import sqlalchemy as sa


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("linear_modules", sa.JSON(), nullable=False, server_default="[]"))

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report", sa.JSON(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validation_report", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("validation_report")

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_column("report")

    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_column("linear_modules")
