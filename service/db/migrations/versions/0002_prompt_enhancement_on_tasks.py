"""prompt enhancement on tasks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enhance", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("style", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("final_prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("enhance_cost", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("enhance_cost")
        batch_op.drop_column("final_prompt")
        batch_op.drop_column("style")
        batch_op.drop_column("enhance")
