"""end users: allowances, check-in, browser origins, signing secrets; the ledger gains an account

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("daily_grant", sa.BigInteger(), server_default="10", nullable=False))
        batch_op.add_column(sa.Column("balance_cap", sa.BigInteger(), server_default="100", nullable=False))
    op.create_table(
        "tenant_origins",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("origin", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_origins_tenant_id")),
        sa.PrimaryKeyConstraint("tenant_id", "origin", name=op.f("pk_tenant_origins")),
    )
    op.create_index("ix_tenant_origins_origin", "tenant_origins", ["origin"], unique=False)
    op.create_table(
        "end_users",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("end_user", sa.String(length=256), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("checked_in_on", sa.String(length=10), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("balance >= 0", name=op.f("ck_end_users_balance_not_negative")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_end_users_tenant_id")),
        sa.PrimaryKeyConstraint("tenant_id", "end_user", name=op.f("pk_end_users")),
    )
    op.create_table(
        "service_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_secrets")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("end_user", sa.String(length=256), nullable=True))
        batch_op.create_index("ix_tasks_tenant_id_end_user_id", ["tenant_id", "end_user", "id"], unique=False)
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("account", sa.String(length=8), server_default="tenant", nullable=False))
        batch_op.add_column(sa.Column("end_user", sa.String(length=256), nullable=True))
        batch_op.drop_constraint("uq_ledger_entries_task_kind", type_="unique")
        batch_op.drop_constraint("uq_ledger_entries_tenant_reference", type_="unique")
        batch_op.create_unique_constraint("uq_ledger_entries_task_kind_account", ["task_id", "kind", "account"])
        batch_op.create_unique_constraint(
            "uq_ledger_entries_tenant_account_reference", ["tenant_id", "account", "reference"]
        )
        batch_op.create_index("ix_ledger_entries_tenant_id_end_user_id", ["tenant_id", "end_user", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_tenant_id_end_user_id")
        batch_op.drop_constraint("uq_ledger_entries_tenant_account_reference", type_="unique")
        batch_op.drop_constraint("uq_ledger_entries_task_kind_account", type_="unique")
        batch_op.create_unique_constraint("uq_ledger_entries_tenant_reference", ["tenant_id", "reference"])
        batch_op.create_unique_constraint("uq_ledger_entries_task_kind", ["task_id", "kind"])
        batch_op.drop_column("end_user")
        batch_op.drop_column("account")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_tenant_id_end_user_id")
        batch_op.drop_column("end_user")
    op.drop_table("service_secrets")
    op.drop_table("end_users")
    op.drop_index("ix_tenant_origins_origin", table_name="tenant_origins")
    op.drop_table("tenant_origins")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("balance_cap")
        batch_op.drop_column("daily_grant")
