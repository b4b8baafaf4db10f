"""spend guards: tenants' daily and monthly spending caps, an end-user daily cap, the confirm-spend threshold, and
the spending counters of the current UTC day and month that the guarded debit keeps

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("daily_spend_cap", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("monthly_spend_cap", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("end_user_daily_spend_cap", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("confirm_above", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("spent_day", sa.String(length=10), server_default="", nullable=False))
        batch_op.add_column(sa.Column("spent_day_amount", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("spent_month", sa.String(length=7), server_default="", nullable=False))
        batch_op.add_column(sa.Column("spent_month_amount", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("end_users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spent_day", sa.String(length=10), server_default="", nullable=False))
        batch_op.add_column(sa.Column("spent_day_amount", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("end_users", schema=None) as batch_op:
        batch_op.drop_column("spent_day_amount")
        batch_op.drop_column("spent_day")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        for column in (
            "spent_month_amount",
            "spent_month",
            "spent_day_amount",
            "spent_day",
            "confirm_above",
            "end_user_daily_spend_cap",
            "monthly_spend_cap",
            "daily_spend_cap",
        ):
            batch_op.drop_column(column)
