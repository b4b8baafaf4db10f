"""The readiness probe's query."""

from __future__ import annotations

from sqlalchemy import text

from service.db.engine import Database

_PING = text("SELECT 1")


async def ping(db: Database) -> None:
    """Run the smallest query in a read transaction; raises whatever the database raises when it cannot answer."""
    async with db.read() as session:
        await session.execute(_PING)
