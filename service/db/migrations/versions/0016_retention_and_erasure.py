"""result images expire (a tenant's own retention, when a task's images were deleted), and erased tenants leave an
audit record

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
KEPT = sa.text("mode <> 'canvas' AND images_deleted_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_retention_days", sa.Float(), nullable=True))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("images_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_tasks_results_kept", "tasks", ["finished_at"], unique=False, sqlite_where=KEPT, postgresql_where=KEPT
    )
    op.create_table(
        "tenant_erasures",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("tenant_name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("removed_rows", JSON, nullable=False),
        sa.Column("removed_objects", sa.BigInteger(), nullable=False),
        sa.Column("removed_bytes", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenant_erasures")),
    )
    op.create_index("ix_tenant_erasures_tenant_id", "tenant_erasures", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_tenant_erasures_tenant_id", table_name="tenant_erasures")
    op.drop_table("tenant_erasures")
    op.drop_index("ix_tasks_results_kept", table_name="tasks")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("images_deleted_at")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("result_retention_days")
