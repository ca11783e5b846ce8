"""What the repository's modules share: a dialect-specific INSERT for upserts, IN lists in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

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


T = TypeVar("T")

#: Values per ``IN (...)`` list: each is a bound parameter, and SQLite allows 32,766 of them,
#: PostgreSQL 65,535 (a job's CSV names every patient of a folder of tens of thousands of files).
IN_BATCH = 1000


def in_batches(values: Sequence[T], size: int | None = None) -> Iterator[list[T]]:
    """``values`` in lists of at most ``size`` (default :data:`IN_BATCH`), one ``IN`` query each."""
    size = size or IN_BATCH
    for start in range(0, len(values), size):
        yield list(values[start : start + size])
