"""Table definitions. The schema itself is created only by the Alembic revisions in `migrations/`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    # On SQLite a timestamp is written in one step instead of two (ours, then the dialect's text conversion): the
    # text is SQLAlchemy's own format, `YYYY-MM-DD HH:MM:SS.ffffff`, which `isoformat` writes in C.

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

        return process


class utc_day(FunctionElement[str]):
    """The UTC calendar day of a timestamp column as `YYYY-MM-DD` text, the same on SQLite (where timestamps are
    stored as UTC text) as on PostgreSQL (whatever the session's time zone)."""

    type = String()
    inherit_cache = True


@compiles(utc_day, "sqlite")
def _utc_day_on_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 10)"


@compiles(utc_day, "postgresql")
def _utc_day_on_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"to_char(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"


JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="active")
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # Per-tenant limits; NULL means the service-wide default.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running_tasks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The same two limits for each of the tenant's end users on their own; NULL means the service-wide default.
    end_user_rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    end_user_max_running_tasks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What each of the tenant's end users may spend: a daily grant at check-in, up to a cap.
    daily_grant: Mapped[int] = mapped_column(BigInteger, default=10, server_default="10")
    balance_cap: Mapped[int] = mapped_column(BigInteger, default=100, server_default="100")
    # What a task run with the tenant's own provider key costs per image, whatever its quality.
    byok_price_per_image: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Spend guards (credits; NULL: none): what the tenant may spend in a UTC day and a UTC calendar month, what each
    # of its end users may spend in a UTC day, and the cost above which a submission must confirm its spending.
    daily_spend_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_spend_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    end_user_daily_spend_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    confirm_above: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # What the tenant spent (debits less their refunds) on the UTC day `spent_day` (YYYY-MM-DD) and in the month
    # `spent_month` (YYYY-MM), kept by the guarded debit itself (service/credits/repository.py, docs §3).
    spent_day: Mapped[str] = mapped_column(String(10), default="", server_default="")
    spent_day_amount: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_month: Mapped[str] = mapped_column(String(7), default="", server_default="")
    spent_month_amount: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # How many days the tenant's result images are kept after their task finished (0: forever); NULL means the
    # service-wide RESULT_RETENTION_DAYS.
    result_retention_days: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The balance under which a debit emits the `credits.low` webhook event, once per crossing; NULL: never.
    low_balance_threshold: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TenantErasure(Base):
    """What is left of an erased tenant: who erased it, when, its balance then, and how much of it was removed. The
    row exists from the moment the erasure starts (`erasing`) and is completed (`erased`) in the transaction that
    removes the tenant's rows."""

    __tablename__ = "tenant_erasures"
    __table_args__ = (Index("ix_tenant_erasures_tenant_id", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # No foreign key: the tenant's row is gone once the erasure has finished.
    tenant_id: Mapped[str] = mapped_column(String(32))
    tenant_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # Rows removed by table, and the stored objects (and their bytes) deleted, once finished.
    removed_rows: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    removed_objects: Mapped[int] = mapped_column(BigInteger, default=0)
    removed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class TenantOrigin(Base):
    """A browser origin the tenant's end users may call the API from (CORS)."""

    __tablename__ = "tenant_origins"
    __table_args__ = (Index("ix_tenant_origins_origin", "origin"),)

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    origin: Mapped[str] = mapped_column(String(255), primary_key=True)


class EndUser(Base):
    """One end user of a tenant (the tenant's own identifier) and the allowance they may spend."""

    __tablename__ = "end_users"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    end_user: Mapped[str] = mapped_column(String(256), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # The UTC day (YYYY-MM-DD) of the last check-in.
    checked_in_on: Mapped[str | None] = mapped_column(String(10), nullable=True)
    # What the end user spent on the UTC day `spent_day`, kept by the guarded debit of their allowance.
    spent_day: Mapped[str] = mapped_column(String(10), default="", server_default="")
    spent_day_amount: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ServiceSecret(Base):
    """Secrets the processes of one deployment share, made once: the key that signs end-user tokens."""

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    salt: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


_REFERENCES_KEPT = text("mode = 'image' AND references_deleted_at IS NULL")
_RESULTS_KEPT = text("mode <> 'canvas' AND images_deleted_at IS NULL")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_tenant_id_id", "tenant_id", "id"),
        Index("ix_tasks_status_lease", "status", "lease_expires_at"),
        Index("ix_tasks_tenant_id_status", "tenant_id", "status"),
        Index("ix_tasks_tenant_id_end_user_id", "tenant_id", "end_user", "id"),
        # Finished image tasks whose references are still stored, for the retention sweep.
        Index(
            "ix_tasks_references_kept", "finished_at", sqlite_where=_REFERENCES_KEPT, postgresql_where=_REFERENCES_KEPT
        ),
        # Finished tasks whose result images are still stored, for the result retention sweep (canvas steps' pictures
        # belong to their canvas and are never expired).
        Index("ix_tasks_results_kept", "finished_at", sqlite_where=_RESULTS_KEPT, postgresql_where=_RESULTS_KEPT),
        CheckConstraint("refunded >= 0 AND refunded <= cost", name="refund_within_cost"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # The end user who submitted it with an end-user token; null when the tenant's key did.
    end_user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(8))
    prompt: Mapped[str] = mapped_column(Text)
    revised_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str] = mapped_column(String(100))
    size: Mapped[str] = mapped_column(String(32))
    requested_size: Mapped[str] = mapped_column(String(32))
    quality: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)
    # Candidates to generate, of which the best one is the task's image (1: no choice, every image is delivered).
    candidates: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    enhance: Mapped[str | None] = mapped_column(String(16), nullable=True)
    style: Mapped[str | None] = mapped_column(String(32), nullable=True)
    final_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    cost: Mapped[int] = mapped_column(BigInteger)
    enhance_cost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    refunded: Mapped[int] = mapped_column(BigInteger, default=0)
    references: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    mask: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # Every image delivered, each with its quality; of a task with candidates, every candidate that passed the quality
    # gate (the chosen one first). The images that failed the gate were not stored: `rejected_images` has their
    # positions and qualities.
    images: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    rejected_images: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list, server_default="[]")
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    upstream: Mapped[str] = mapped_column(String(16))
    upstream_ids: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # The upstream instance of the latest attempt (the one that produced the result, once finished), and whether it
    # accepted the job: an accepted job stays with its instance on every later attempt (no second upstream charge).
    upstream_instance: Mapped[str | None] = mapped_column(String(64), nullable=True)
    upstream_accepted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Every upstream attempt, oldest first: the instance it went to and the error code it ended with (null when it
    # produced the result). Written when an instance accepts the job and when the task ends.
    upstream_attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list, server_default="[]")
    # The upstream instance whose provider key of the tenant runs this task (priced at the tenant's BYOK price);
    # null when the operator's key runs it.
    byok_instance: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # One more at each change of status (claimed, handed back, ended): the id of the task's events
    # (docs/architecture.md §4).
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the storage sweep deleted the reference images (and mask) of this finished task; their records stay.
    references_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the storage sweep deleted the result images of this finished task, past its tenant's retention; their
    # records stay (the ledger audit counts them).
    images_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ProviderKey(Base):
    """A tenant's own key for one upstream instance, sealed by the keyring (service/providerkeys/keyring.py). A
    deleted key keeps its row, revoked, with its ciphertext wiped."""

    __tablename__ = "provider_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    hint: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookEndpoint(Base):
    """Where a tenant wants its events POSTed, and the signing secret, sealed by the keyring under the label of the
    endpoint (service/webhooks/). After a rotation the previous secret stays valid, sealed too, until
    `previous_expires_at`."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_id", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    events: Mapped[list[str]] = mapped_column(JSONType)
    enabled: Mapped[bool] = mapped_column(Boolean)
    ciphertext: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(16))
    previous_ciphertext: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    previous_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


_PENDING = text("status = 'pending'")


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the change it reports, with its body as
    it is sent on every attempt and the record of each attempt. A pending delivery is due at `next_attempt_at`; a
    dispatcher that claims it moves that time past the attempt's timeout (its lease) and names itself the owner."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_tenant_id", "tenant_id"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", sqlite_where=_PENDING, postgresql_where=_PENDING),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"))
    tenant_id: Mapped[str] = mapped_column(String(32))
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class LedgerEntry(Base):
    """Append-only: rows are inserted, never updated, and deleted only with their tenant when it is erased."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        # One debit and at most one refund per task and account: the database refuses a second.
        UniqueConstraint("task_id", "kind", "account", name="uq_ledger_entries_task_kind_account"),
        # An operation outside tasks (an enhancement, say) names its entries, so its refund can happen only once.
        UniqueConstraint("tenant_id", "account", "reference", name="uq_ledger_entries_tenant_account_reference"),
        Index("ix_ledger_entries_tenant_id_id", "tenant_id", "id"),
        Index("ix_ledger_entries_tenant_id_end_user_id", "tenant_id", "end_user", "id"),
        CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # Whose balance the entry moves: the tenant's, or the allowance of its end user `end_user`.
    account: Mapped[str] = mapped_column(String(8), default="tenant", server_default="tenant")
    # The end user the entry is for (on both accounts); null for the tenant's own operations.
    end_user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[str | None] = mapped_column(ForeignKey("tasks.id"), nullable=True)
    reference: Mapped[str | None] = mapped_column(String(255), nullable=True)
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class IdempotencyRecord(Base):
    """The first response to a request sent with an `Idempotency-Key`, replayed to its retries until it expires."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RateBucket(Base):
    """A request-rate token bucket, shared by the API processes (used on PostgreSQL)."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    stamp: Mapped[float] = mapped_column(Float)
    # Whether the request that last touched the bucket was let through: one statement both decides and reports.
    allowed: Mapped[bool] = mapped_column(Boolean, server_default=true())


class CachedEnhancement(Base):
    """A finished prompt enhancement, shared by the API processes (used on PostgreSQL)."""

    __tablename__ = "prompt_cache"
    __table_args__ = (
        Index("ix_prompt_cache_tenant_id", "tenant_id"),
        Index("ix_prompt_cache_created_at", "created_at"),
    )

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Canvas(Base):
    """A tenant's growing image (an end user's, with a token): its current picture is the output of step `head`."""

    __tablename__ = "canvases"
    __table_args__ = (
        Index("ix_canvases_tenant_id_id", "tenant_id", "id"),
        Index("ix_canvases_tenant_id_end_user_id", "tenant_id", "end_user", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    end_user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # `ready` once it has a picture; `creating` while the generation that draws its first one runs; `failed` when
    # that generation failed (the canvas then never gets a picture).
    status: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str] = mapped_column(String(8))
    # The committed step whose output is the current picture (0: the first picture), and how many steps were made.
    head: Mapped[int] = mapped_column(Integer, default=0)
    steps_made: Mapped[int] = mapped_column(Integer, default=0)
    # The task of the step that may be running: the canvas is busy while that task has not ended.
    busy_task: Mapped[str | None] = mapped_column(String(32), nullable=True)
    width: Mapped[int] = mapped_column(Integer, default=0)
    height: Mapped[int] = mapped_column(Integer, default=0)
    image: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # The first picture (the upload, or what step 0 drew), which a revert to step 0 brings back.
    first_image: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CanvasStep(Base):
    """One step of a canvas, run as a task (`tasks.mode = 'canvas'`): the task carries its status, cost and refund;
    the step its geometry, its artifacts and its record."""

    __tablename__ = "canvas_steps"
    __table_args__ = (UniqueConstraint("canvas_id", "n", name="uq_canvas_steps_canvas_id_n"),)

    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    canvas_id: Mapped[str] = mapped_column(ForeignKey("canvases.id"))
    n: Mapped[int] = mapped_column(Integer)
    # Step 0 of a canvas made from a prompt draws the first picture: it has no direction and no base.
    direction: Mapped[str | None] = mapped_column(String(8), nullable=True)
    extension_px: Mapped[int] = mapped_column(Integer, default=0)
    overlap_px: Mapped[int] = mapped_column(Integer, default=0)
    immutable_px: Mapped[int] = mapped_column(Integer, default=0)
    immutable_policy: Mapped[str] = mapped_column(String(8), default="seam")
    # The step whose output this step extends, and that output as it was when the step was submitted.
    base_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    base_image: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # The picture the step committed, what it stored along the way, what it checked and its reproducibility record.
    image: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    record: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)


# The tables themselves, for the statements on the hot paths: a statement built on a table (not on a mapped class)
# runs as plain Core, without the ORM's bulk-update bookkeeping.
TASKS = cast(Table, Task.__table__)
TENANTS = cast(Table, Tenant.__table__)
LEDGER = cast(Table, LedgerEntry.__table__)
END_USERS = cast(Table, EndUser.__table__)
TENANT_ORIGINS = cast(Table, TenantOrigin.__table__)
CANVASES = cast(Table, Canvas.__table__)
CANVAS_STEPS = cast(Table, CanvasStep.__table__)
PROVIDER_KEYS = cast(Table, ProviderKey.__table__)
WEBHOOK_ENDPOINTS = cast(Table, WebhookEndpoint.__table__)
WEBHOOK_DELIVERIES = cast(Table, WebhookDelivery.__table__)
TENANT_ERASURES = cast(Table, TenantErasure.__table__)
