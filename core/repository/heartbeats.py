"""Workers' heartbeat rows (one per node name): beats, warm shutdowns, forgetting old nodes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.repository._sql import _insert
from core.tables import WorkerHeartbeat


def record_heartbeat(session: Session, node: str, values: dict[str, Any]) -> None:
    """Insert the worker ``node``'s row, or update only the columns in ``values`` (a pool child's
    runtime report and the main process's beats each leave the other's columns alone). One
    statement, so repeating it is harmless."""
    stmt = _insert(session, WorkerHeartbeat).values(node=node, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["node"], set_=values))


def mark_worker_stopped(session: Session, node: str, pid: int, at: datetime) -> int:
    """A warm shutdown of ``node``'s run in process ``pid`` (another process answering to the same
    name, a mistake the sweep logs, keeps its row live)."""
    result = session.execute(
        update(WorkerHeartbeat)
        .where(WorkerHeartbeat.node == node, WorkerHeartbeat.pid == pid)
        .values(stopped_at=at, seen_at=at)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def forget_workers_unseen_since(session: Session, before: datetime) -> int:
    """Delete the rows of workers not seen since ``before`` (node names of machines or containers
    long gone: with generated host names there is a new one per start); returns how many."""
    result = session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < before))
    return int(getattr(result, "rowcount", 0) or 0)


def worker_heartbeats(session: Session) -> list[WorkerHeartbeat]:
    """Every worker row, by node name (one per node name seen in the last
    ``core.heartbeat.FORGOTTEN_AFTER``: each worker's start forgets older ones)."""
    return list(session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.node)))
