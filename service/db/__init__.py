"""Database access: the engine and sessions, the table definitions and their Alembic migrations."""
