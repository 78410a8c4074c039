"""completion requests in flight, per tenant (the bound on a tenant's concurrent completions)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inference_requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_inference_requests_tenant", "inference_requests", ["tenant", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_inference_requests_tenant", table_name="inference_requests")
    op.drop_table("inference_requests")
