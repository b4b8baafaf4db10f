"""tasks record when their reference images were deleted, and an index finds those still kept

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEPT = sa.text("mode = 'image' AND references_deleted_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("references_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_tasks_references_kept", "tasks", ["finished_at"], unique=False, sqlite_where=KEPT, postgresql_where=KEPT
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_references_kept", table_name="tasks")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("references_deleted_at")
