"""The readiness probe's query."""

from __future__ import annotations

from sqlalchemy import text

from service.db.engine import Transaction

_PING = text("SELECT 1")


async def ping(tx: Transaction) -> None:
    """Run the smallest query; raises whatever the database raises when it cannot answer."""
    await tx.execute(_PING)
