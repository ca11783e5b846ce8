"""What the repository's modules share: a dialect-specific INSERT for upserts."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def _insert(session: Session, table: Any) -> Any:
    """A dialect-specific INSERT supporting ON CONFLICT (PostgreSQL and SQLite)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are not implemented for {name}")
