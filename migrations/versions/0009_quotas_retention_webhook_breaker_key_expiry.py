"""quotas, retention, webhook circuit breaker, encrypted webhook secrets, key expiry, opaque event ids

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 05:20:00
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.alter_column('secret', existing_type=sa.String(length=128), type_=sa.String(length=512))
        batch_op.add_column(
            sa.Column('consecutive_failures', sa.Integer(), server_default=sa.text('0'), nullable=False)
        )
        batch_op.add_column(sa.Column('disabled_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('disabled_reason', sa.Text(), nullable=True))

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter_bytes', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bytes', sa.BigInteger(), nullable=True))

    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('public_id', sa.String(length=64), nullable=True))
    # Existing events get random ids too: no event id tells how many events exist.
    connection = op.get_bind()
    events = sa.table('job_events', sa.column('seq', sa.Integer), sa.column('public_id', sa.String))
    for (seq,) in connection.execute(sa.select(events.c.seq)).all():
        connection.execute(
            events.update().where(events.c.seq == seq).values(public_id='ftevent-' + secrets.token_hex(12))
        )
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_events_public_id'), ['public_id'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_events_public_id'))
        batch_op.drop_column('public_id')

    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('bytes')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('adapter_bytes')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('expires_at')

    with op.batch_alter_table('webhook_endpoints', schema=None) as batch_op:
        batch_op.drop_column('disabled_reason')
        batch_op.drop_column('disabled_at')
        batch_op.drop_column('consecutive_failures')
        batch_op.alter_column('secret', existing_type=sa.String(length=512), type_=sa.String(length=128))
