"""end users get limits of their own: requests a minute and tasks running at once, set per tenant

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("end_user_rate_limit_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("end_user_max_running_tasks", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("end_user_max_running_tasks")
        batch_op.drop_column("end_user_rate_limit_per_minute")
