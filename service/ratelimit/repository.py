"""Rate bucket queries (PostgreSQL, where API processes share the buckets). The spend runs often, so it is one
statement built once: only its parameters change."""

from __future__ import annotations

from sqlalchemy import Float, String, bindparam, case, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert

from service.db.engine import Transaction
from service.db.models import RateBucket

_NOW = bindparam("now", type_=Float())
_FULL = bindparam("full", type_=Float())
_COUNT = bindparam("count", type_=Float())
_REFILLED = func.least(_FULL, RateBucket.tokens + (_NOW - RateBucket.stamp) * bindparam("rate", type_=Float()))
_SPEND = (
    postgresql_insert(RateBucket)
    .values(
        key=bindparam("key", type_=String()),
        tokens=_FULL - _COUNT,
        stamp=_NOW,
        allowed=True,
    )
    .on_conflict_do_update(
        index_elements=[RateBucket.key],
        set_={
            "tokens": case((_REFILLED >= _COUNT, _REFILLED - _COUNT), else_=_REFILLED),
            "stamp": _NOW,
            "allowed": _REFILLED >= _COUNT,
        },
    )
    .returning(RateBucket.tokens, RateBucket.allowed)
)


async def spend(tx: Transaction, *, key: str, per_minute: int, now: float, count: int = 1) -> tuple[float, bool]:
    """Spend `count` tokens of `key`'s bucket (full at `per_minute`, refilling continuously) if as many are left, else
    none: the tokens left and whether they were spent. One upsert decides, spends and reports, locking the row for it
    alone."""
    params = {"key": key, "now": now, "full": float(per_minute), "rate": per_minute / 60.0, "count": float(count)}
    [(tokens, allowed)] = await tx.rows(_SPEND, params)
    return float(tokens), bool(allowed)


_TOKENS = select(RateBucket.tokens, RateBucket.stamp).where(RateBucket.key == bindparam("key", type_=String()))


async def tokens_left(tx: Transaction, *, key: str, per_minute: int, now: float) -> float:
    """The tokens `key`'s bucket holds at `now`, refilled, without spending any (a bucket never used is full)."""
    found = await tx.first(_TOKENS, {"key": key})
    if found is None:
        return float(per_minute)
    return min(float(per_minute), float(found.tokens) + (now - float(found.stamp)) * per_minute / 60.0)


async def delete_tenant_buckets(tx: Transaction, tenant_id: str) -> int:
    """Delete the tenant's rate buckets: its own, its enhancements', and each of its end users'; how many."""
    return await tx.execute(
        delete(RateBucket).where(
            or_(
                RateBucket.key.in_([tenant_id, f"enhance:{tenant_id}"]),
                RateBucket.key.startswith(f"user:{tenant_id}:", autoescape=True),
            )
        )
    )
