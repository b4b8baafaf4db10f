"""canvases and their steps

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "canvases",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("end_user", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=8), nullable=False),
        sa.Column("head", sa.Integer(), nullable=False),
        sa.Column("steps_made", sa.Integer(), nullable=False),
        sa.Column("busy_task", sa.String(length=32), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("image", JSON, nullable=True),
        sa.Column("first_image", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_canvases_tenant_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canvases")),
    )
    op.create_index("ix_canvases_tenant_id_end_user_id", "canvases", ["tenant_id", "end_user", "id"], unique=False)
    op.create_index("ix_canvases_tenant_id_id", "canvases", ["tenant_id", "id"], unique=False)
    op.create_table(
        "canvas_steps",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("canvas_id", sa.String(length=32), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=True),
        sa.Column("extension_px", sa.Integer(), nullable=False),
        sa.Column("overlap_px", sa.Integer(), nullable=False),
        sa.Column("immutable_px", sa.Integer(), nullable=False),
        sa.Column("immutable_policy", sa.String(length=8), nullable=False),
        sa.Column("base_step", sa.Integer(), nullable=True),
        sa.Column("base_image", JSON, nullable=True),
        sa.Column("image", JSON, nullable=True),
        sa.Column("artifacts", JSON, nullable=False),
        sa.Column("validation", JSON, nullable=True),
        sa.Column("record", JSON, nullable=True),
        sa.ForeignKeyConstraint(["canvas_id"], ["canvases.id"], name=op.f("fk_canvas_steps_canvas_id")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_canvas_steps_task_id")),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_canvas_steps")),
        sa.UniqueConstraint("canvas_id", "n", name="uq_canvas_steps_canvas_id_n"),
    )


def downgrade() -> None:
    op.drop_table("canvas_steps")
    op.drop_index("ix_canvases_tenant_id_id", table_name="canvases")
    op.drop_index("ix_canvases_tenant_id_end_user_id", table_name="canvases")
    op.drop_table("canvases")
