"""indexes for lists bounded in SQL: jobs by keyset (per tenant and across tenants), the metadata filter on
Postgres, files by keyset, webhook deliveries per endpoint

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 14:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_created")
        batch_op.create_index("ix_jobs_tenant_created_id", ["tenant", "created_at", "id"], unique=False)
        batch_op.create_index("ix_jobs_created_id", ["created_at", "id"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # JSONB containment (@>) on the metadata filter; SQLite has no such index and reads each row's JSON.
        op.create_index(
            "ix_jobs_user_metadata", "jobs", [sa.text("(CAST(user_metadata AS JSONB))")], postgresql_using="gin"
        )

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index("ix_files_tenant_created_id", ["tenant", "created_at", "id"], unique=False)

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_deliveries_endpoint_created", ["endpoint_id", "created_at", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_endpoint_created")

    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_tenant_created_id")

    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_jobs_user_metadata", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_created_id")
        batch_op.drop_index("ix_jobs_tenant_created_id")
        batch_op.create_index("ix_jobs_tenant_created", ["tenant", "created_at"], unique=False)
