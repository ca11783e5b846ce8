"""Model versions (releases): recorded on first use, the one activated for every worker to
serve, the lock its grade writers hold, and the releases that wrote the newest predictions."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.repository._sql import _insert
from core.tables import ModelVersion, Prediction, as_utc, utcnow

#: How far after the latest activation one made on a clock behind it is dated (the databases keep
#: microseconds).
ACTIVATION_STEP = timedelta(microseconds=1)


def get_or_create_model_version(
    session: Session, ref: str, card: dict[str, Any] | None = None
) -> ModelVersion:
    stmt = _insert(session, ModelVersion).values(ref=ref, card=card, created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["ref"]))
    row = session.scalars(select(ModelVersion).where(ModelVersion.ref == ref)).one()
    if card is not None and row.card != card:
        row.card = card
        session.flush()
    return row


def active_release(session: Session) -> str | None:
    """The release the deployment serves (``drscreen model activate``), None when never set."""
    return session.scalar(last_activated(ModelVersion.ref))


def activated_version_id(session: Session) -> int | None:
    """The model version of :func:`active_release`, None when never set."""
    return session.scalar(last_activated(ModelVersion.id))


def last_activated(column: Any) -> Any:
    """``column`` of the activated release's row (a select; ``.scalar_subquery()`` inside SQL)."""
    return (
        select(column)
        .where(ModelVersion.activated_at.is_not(None))
        .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )


def other_active_release(session: Session, ref: str) -> str | None:
    """The activated release when it is not ``ref`` (a worker serving ``ref`` must not grade: a
    patient's result comes from one release), None when it is or when none was activated."""
    active = active_release(session)
    return active if active is not None and active != ref else None


def activate_release(session: Session, ref: str, card: dict[str, Any] | None = None) -> ModelVersion:
    """Make ``ref`` the release every worker must serve (earlier activations stay as history).

    On PostgreSQL it first locks every release row: a worker writing grades holds its release's
    row (:func:`lock_release_for_writing`), so the activation waits for grades being written
    and a write that starts meanwhile waits for it, then sees the new active release."""
    # NO KEY UPDATE: conflicts with the writers' FOR SHARE, not with inserts referencing the rows
    session.execute(select(ModelVersion.id).order_by(ModelVersion.id).with_for_update(key_share=True))
    row = get_or_create_model_version(session, ref, card)
    # After every earlier activation whatever this machine's clock says: the newest activation is
    # the active one, and a rollback run from a machine whose clock was behind the upgrade's (or
    # after an NTP step back) was ignored until the wall clock caught up (the time review).
    before = session.scalar(select(func.max(ModelVersion.activated_at)))
    now = utcnow()
    row.activated_at = now if before is None else max(now, as_utc(before) + ACTIVATION_STEP)
    session.flush()
    return row


def lock_release_for_writing(session: Session, release: ModelVersion) -> str | None:
    """Hold ``release``'s row (shared, PostgreSQL) while its grades are written, then say which
    other release is active (None: this one, or none activated). See :func:`activate_release`."""
    session.execute(select(ModelVersion.id).where(ModelVersion.id == release.id).with_for_update(read=True))
    return other_active_release(session, release.ref)


def get_model_version(session: Session, model_version_id: int) -> ModelVersion | None:
    return session.get(ModelVersion, model_version_id)


def get_model_version_by_ref(session: Session, ref: str) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.ref == ref)).first()


def latest_model_version(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()).limit(1)).first()


def recent_releases(session: Session, last: int = 1000) -> dict[str, datetime]:
    """The releases that wrote the newest ``last`` predictions, with the time of each one's newest.
    More than one: workers serve different releases (each patient's result comes from one, so
    results flip between them) or a rolling upgrade is under way. Read backwards along the primary
    key, so cheap on any table size."""
    newest = select(Prediction.id).order_by(Prediction.id.desc()).limit(last).subquery()
    rows = session.execute(
        select(ModelVersion.ref, func.max(Prediction.created_at))
        .join(Prediction, Prediction.model_version_id == ModelVersion.id)
        .where(Prediction.id.in_(select(newest.c.id)))
        .group_by(ModelVersion.ref)
    ).all()
    return {ref: at for ref, at in rows}
