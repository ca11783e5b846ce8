"""Every query of drscreen. Functions take a Session, ``flush()`` when they write, and never commit:
the caller's unit of work (``core.db.session_scope`` or the API's request dependency) commits.

Reads that take ``clinic_id`` return None for rows of another clinic, so callers answer 404 for
both unknown and foreign ids.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from core import heartbeat, ledger
from core.aggregation import EyeGradeFn, GradeFn, ImageScore, PatientAggregate, aggregate_patient
from core.errors import InvalidInput, NotFound
from core.settings import Settings, get_settings
from core.tables import (
    EYES,
    ApiKey,
    AuditEvent,
    Bundle,
    Clinic,
    Explanation,
    EyeResult,
    Image,
    ModelVersion,
    Patient,
    PatientResult,
    Prediction,
    ScoringJob,
    ScoringJobItem,
    WebSession,
    WorkerHeartbeat,
    as_utc,
    utcnow,
)

API_KEY_PREFIX = "drs_"
#: A folder job's states until it ends (``done`` or ``failed``).
OPEN_JOB_STATES = ("queued", "running")


def _insert(session: Session, table: Any) -> Any:
    """A dialect-specific INSERT supporting ON CONFLICT (PostgreSQL and SQLite)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are not implemented for {name}")


# --------------------------------------------------------------------------------- clinics, keys


#: Column widths (core.tables) that PostgreSQL enforces and SQLite does not.
CLINIC_NAME_MAX = KEY_LABEL_MAX = 200


def get_or_create_clinic(session: Session, name: str) -> Clinic:
    name = name.strip()
    if not name:
        raise InvalidInput("clinic name is empty")
    if len(name) > CLINIC_NAME_MAX:  # PostgreSQL refuses it with a traceback; SQLite stored it
        raise InvalidInput(f"clinic name is longer than {CLINIC_NAME_MAX} characters")
    stmt = _insert(session, Clinic).values(name=name, created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    clinic = session.scalars(select(Clinic).where(Clinic.name == name)).one()
    return clinic


def import_roots_of(session: Session, clinic_id: int, settings: Settings) -> list[Path]:
    """The import folders this clinic's folder jobs may read (``Settings.import_roots_for``)."""
    clinic = session.get(Clinic, clinic_id)
    return settings.import_roots_for(clinic.name) if clinic is not None else []


def get_clinic_by_name(session: Session, name: str) -> Clinic | None:
    """The clinic of that name, as `get_or_create_clinic` stored it (trimmed)."""
    return session.scalars(select(Clinic).where(Clinic.name == name.strip())).one_or_none()


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, clinic: Clinic, label: str | None = None) -> tuple[ApiKey, str]:
    """Create a key for ``clinic``. Returns the row and the plaintext key (shown once, never stored)."""
    if label is not None and len(label) > KEY_LABEL_MAX:
        raise InvalidInput(f"key label is longer than {KEY_LABEL_MAX} characters")
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(clinic_id=clinic.id, prefix=plaintext[:12], key_hash=hash_api_key(plaintext), label=label)
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate_api_key(session: Session, plaintext: str, *, touch: bool = True) -> ApiKey | None:
    """The active key matching ``plaintext`` (its ``clinic`` loaded), or None."""
    if not plaintext:
        return None
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is not None and touch:
        row.last_used_at = utcnow()
        session.flush()
    return row


def revoke_api_key(
    session: Session, key_id_or_prefix: str | int, store_dir: Path | None = None, *, record: bool = True
) -> int:
    """Revoke keys by id or by prefix (as printed by ``drscreen keys create``). Returns how many.
    Each revocation is also recorded, at the commit, in the restore ledger of ``store_dir``
    (default the configured store; core.ledger): a restore of an older backup revokes the key
    again. ``record=False``: revoke all the same where the ledger cannot be reached (a leaked key
    must not stay usable for want of a store; the caller warns)."""
    if isinstance(key_id_or_prefix, int) or str(key_id_or_prefix).isdigit():
        which = ApiKey.id == int(key_id_or_prefix)
    else:
        which = ApiKey.prefix == str(key_id_or_prefix)[:12]
    hashes = list(session.scalars(select(ApiKey.key_hash).where(which, ApiKey.revoked_at.is_(None))))
    if not hashes:
        return 0
    stmt = update(ApiKey).where(ApiKey.key_hash.in_(hashes), ApiKey.revoked_at.is_(None))
    result = session.execute(stmt.values(revoked_at=utcnow()).execution_options(synchronize_session=False))
    session.flush()
    if record:
        ledger_dir = store_dir if store_dir is not None else get_settings().store_path
        for key_hash in hashes:  # a revocation racing another is recorded twice: replaying it is harmless
            ledger.record(session, ledger_dir, ledger.revocation_entry(key_hash))
    return int(getattr(result, "rowcount", 0) or 0)


def list_api_keys(session: Session, clinic_id: int | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.id)
    if clinic_id is not None:
        stmt = stmt.where(ApiKey.clinic_id == clinic_id)
    return list(session.scalars(stmt))


def create_web_session(session: Session, key: ApiKey) -> str:
    """A new signed-in browser for ``key``: returns the token for its cookie (only its sha256 is
    kept, as for keys)."""
    token = secrets.token_urlsafe(32)
    session.add(WebSession(token_hash=hash_api_key(token), api_key_id=key.id))
    session.flush()
    return token


def web_session_key(
    session: Session, token: str, *, idle: timedelta, longest: timedelta, now: datetime | None = None
) -> ApiKey | None:
    """The active key of the session holding ``token``, or None: no such session, idle for longer
    than ``idle``, older than ``longest``, or its key revoked. Marks it seen (at most once a
    minute: every page would otherwise be a write)."""
    now = now or utcnow()
    row = session.execute(
        select(WebSession, ApiKey)
        .join(ApiKey, ApiKey.id == WebSession.api_key_id)
        .where(WebSession.token_hash == hash_api_key(token), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    web, key = row
    # plain statements, not the ORM row: a sign-out committed in between leaves them nothing to
    # do, where the ORM's flush would fail (StaleDataError: a 500; the review)
    if now - as_utc(web.last_seen_at) > idle or now - as_utc(web.created_at) > longest:
        session.execute(delete(WebSession).where(WebSession.id == web.id))
        return None
    if now - as_utc(web.last_seen_at) > timedelta(minutes=1):
        session.execute(update(WebSession).where(WebSession.id == web.id).values(last_seen_at=now))
    return key


def end_web_session(session: Session, token: str) -> int:
    """Sign a browser out (its cookie's token no longer works anywhere). Returns rows deleted."""
    result = session.execute(delete(WebSession).where(WebSession.token_hash == hash_api_key(token)))
    return int(getattr(result, "rowcount", 0) or 0)


def purge_web_sessions(
    session: Session, *, idle: timedelta, longest: timedelta, now: datetime | None = None
) -> int:
    """Delete sessions that can no longer be used (idle or too old); returns how many."""
    now = now or utcnow()
    result = session.execute(
        delete(WebSession).where(
            (WebSession.last_seen_at < now - idle) | (WebSession.created_at < now - longest)
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


# ------------------------------------------------------------------------------------- patients


def get_or_create_patient(session: Session, clinic_id: int, external_id: str) -> Patient:
    """Race-safe (INSERT ... ON CONFLICT DO NOTHING, then SELECT)."""
    return ensure_patient(session, clinic_id, external_id)[0]


def ensure_patient(session: Session, clinic_id: int, external_id: str) -> tuple[Patient, bool]:
    """:func:`get_or_create_patient`, and whether this transaction created the row (an erasure
    cannot delete a row it cannot see yet; services.routes.images.refuse_if_erased)."""
    external_id = external_id.strip()
    if not external_id:
        raise InvalidInput("patient_id is empty")
    stmt = _insert(session, Patient).values(clinic_id=clinic_id, external_id=external_id, created_at=utcnow())
    # RETURNING says whether a row went in (rowcount is not reliable across the two drivers)
    stmt = stmt.on_conflict_do_nothing(index_elements=["clinic_id", "external_id"]).returning(Patient.id)
    created = session.execute(stmt).first() is not None
    patient = session.scalars(
        select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == external_id)
    ).one()
    return patient, created


def get_patient(session: Session, clinic_id: int, external_id: str) -> Patient | None:
    return session.scalars(
        select(Patient).where(Patient.clinic_id == clinic_id, Patient.external_id == external_id)
    ).one_or_none()


def get_patient_by_id(session: Session, patient_id: int) -> Patient | None:
    return session.get(Patient, patient_id)


# --------------------------------------------------------------------------------------- images


def create_image(
    session: Session,
    *,
    clinic_id: int,
    patient_id: int,
    eye: str,
    sha256: str,
    stored_path: str,
    size_bytes: int,
    width: int | None = None,
    height: int | None = None,
    filename: str | None = None,
    content_type: str | None = None,
    bundle_id: str | None = None,
    job_id: str | None = None,
) -> Image:
    if eye not in EYES:
        raise InvalidInput(f"eye must be one of {', '.join(EYES)}")
    row = Image(
        clinic_id=clinic_id,
        patient_id=patient_id,
        eye=eye,
        sha256=sha256,
        stored_path=stored_path,
        size_bytes=size_bytes,
        width=width,
        height=height,
        filename=filename,
        content_type=content_type,
        bundle_id=bundle_id,
        job_id=job_id,
        status="queued",
    )
    session.add(row)
    session.flush()
    return row


def get_image(session: Session, image_id: str, clinic_id: int | None = None) -> Image | None:
    row = session.get(Image, image_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


def get_images(session: Session, image_ids: Sequence[str]) -> list[Image]:
    if not image_ids:
        return []
    rows = {r.id: r for r in session.scalars(select(Image).where(Image.id.in_(list(image_ids))))}
    return [rows[i] for i in image_ids if i in rows]


def list_patient_images(session: Session, patient_id: int, eye: str | None = None) -> list[Image]:
    stmt = select(Image).where(Image.patient_id == patient_id).order_by(Image.created_at, Image.id)
    if eye is not None:
        stmt = stmt.where(Image.eye == eye)
    return list(session.scalars(stmt))


def claim_image(session: Session, image_id: str, worker: str | None = None) -> Image | None:
    """Status guard for workers: move a not-yet-done image to ``running``, claimed by ``worker``
    (a Celery node name). Returns None when the image is missing or already ``done`` (a
    redelivered message then does nothing)."""
    now = utcnow()
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status != "done")
        .values(
            status="running", started_at=now, updated_at=now, attempts=Image.attempts + 1, claimed_by=worker
        )
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        return None
    session.flush()
    row = session.get(Image, image_id)
    if row is not None:
        session.refresh(row)
    return row


def mark_image_done(
    session: Session, image: Image, *, quality: dict[str, Any] | None, gradable: bool
) -> Image:
    image.status = "done"
    image.quality = quality
    image.gradable = gradable
    image.error = None
    image.finished_at = utcnow()
    session.flush()
    return image


def requeue_image(session: Session, image: Image) -> None:
    """Queue a finished image again to be scored by another model version (a fresh scoring, not a
    retry: its attempt count starts over)."""
    image.status = "queued"
    image.attempts = 0
    image.claimed_by = None
    image.updated_at = utcnow()
    session.flush()


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


def return_to_queue(session: Session, image: Image, *, count_attempt: bool = True) -> None:
    """Give a claimed image back unscored; the sweep sends it again once it has been queued for
    ``stale_queued_minutes``. Its attempt counts (the claim's limit still applies) unless
    ``count_attempt`` is False: it was not tried (its worker's release stopped being the active
    one while it was graded)."""
    image.status = "queued"
    if not count_attempt:
        image.attempts = max(0, image.attempts - 1)
    image.claimed_by = None
    image.updated_at = utcnow()
    session.flush()


#: ``image.claimed_by`` of a queued photograph a worker of another release left for the active one.
LEFT_FOR_ACTIVE_RELEASE = "(left for the active release)"


def leave_for_active_release(session: Session, image_ids: Sequence[str]) -> None:
    """Mark queued photographs a worker serving another release did not grade (its message is
    gone): ``declined_to_resend`` hands them to the sweep as soon as a worker of the active release
    is live, instead of after the staleness limit (15-20 minutes after an upgrade: the operator
    walkthrough). ``updated_at`` is left alone (the queue-age figures read it)."""
    if image_ids:
        session.execute(
            update(Image)
            .where(Image.id.in_(list(image_ids)), Image.status == "queued")
            .values(claimed_by=LEFT_FOR_ACTIVE_RELEASE)
            .execution_options(synchronize_session="fetch")
        )


def declined_to_resend(session: Session, now: datetime) -> list[Image]:
    """The photographs ``leave_for_active_release`` marked, once a live worker serves the active
    release (none while only workers of other releases run: re-sending would only bounce)."""
    active = active_release(session)
    live = heartbeat.live_workers(worker_heartbeats(session), now)
    if active is None or not any(w.release == active for w in live):
        return []
    marked = and_(Image.status == "queued", Image.claimed_by == LEFT_FOR_ACTIVE_RELEASE)
    return list(session.scalars(select(Image).where(marked)))


def _scored_by(image_id: Any, version: ModelVersion, *, active: bool) -> Any:
    """EXISTS a prediction of the image that a patient's result by ``version`` may keep.

    ``version`` the activated release: by it exactly. Only its workers write
    (``lock_release_for_writing``), so whatever another release scored is graded again, whichever
    the database saw first (a switch back to a release seen earlier left the other release's
    photographs unscored by it, and the patient's result called them ungradable for good: the
    operator walkthrough). Otherwise by it or a release seen after it: while workers of two
    releases share a queue the older one leaves the newer one's grades alone, so nothing
    ping-pongs between them. Correlated on the image, so it reads the (image_id, model_version_id)
    unique index."""
    seen = Prediction.model_version_id
    by_it = seen == version.id if active else seen >= version.id
    return select(Prediction.id).where(Prediction.image_id == image_id, by_it).exists()


def images_to_rescore(
    session: Session, patient_id: int, model_version_id: int, visit_window: timedelta | None = None
) -> list[Image]:
    """The finished images of the patient's latest visit (``latest_visit``: the only one the
    patient's result reads) that the model version has to grade again (``_scored_by``). An earlier
    visit keeps its release's grades and its entry in the history."""
    if visit_window is None:
        visit_window = get_settings().visit_window
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        return []
    active = active_release(session) == version.ref
    visit = [im.id for im in latest_visit(list_patient_images(session, patient_id), visit_window)]
    return list(
        session.scalars(
            select(Image)
            .where(Image.id.in_(visit), Image.status == "done", ~_scored_by(Image.id, version, active=active))
            .order_by(Image.created_at)
        )
    )


def needs_rescoring(session: Session, image: Image, model_ref: str) -> bool:
    """A finished image that the model ``model_ref`` must grade again (``_scored_by``). A version
    the database has never seen counts as the newest."""
    if image.status != "done":
        return False
    # the release that will grade it: a folder job may be expanded by a worker of another one
    active = active_release(session)
    version = get_model_version_by_ref(session, active or model_ref)
    if version is None:
        return True
    return not session.scalar(select(_scored_by(image.id, version, active=active is not None)))


def mark_image_failed(session: Session, image: Image, error: str) -> Image:
    image.status = "failed"
    image.error = error[:4000]
    image.finished_at = utcnow()
    session.flush()
    return image


def orphaned_images(
    session: Session,
    live_workers: Iterable[str],
    claimed_before: datetime,
    restarted: tuple[str, datetime] | None = None,
) -> list[Image]:
    """``running`` images claimed before ``claimed_before`` by a worker not in ``live_workers``;
    with ``restarted=(node, since)`` also those ``node`` claimed before ``since`` (an earlier run
    of a worker now running again under the same name)."""
    orphaned = and_(Image.claimed_by.not_in(list(live_workers)), Image.started_at < claimed_before)
    if restarted is not None:
        node, since = restarted
        orphaned = or_(orphaned, and_(Image.claimed_by == node, Image.started_at < since))
    claimed = and_(Image.status == "running", Image.claimed_by.is_not(None))
    return list(session.scalars(select(Image).where(claimed, orphaned)))


def stale_running_images(session: Session, older_than: timedelta) -> list[Image]:
    """Images stuck in ``running`` (their worker died) or ``queued`` for longer than ``older_than``."""
    cutoff = utcnow() - older_than
    return list(
        session.scalars(
            select(Image).where(Image.status.in_(["queued", "running"]), Image.updated_at < cutoff)
        )
    )


# ------------------------------------------------------------------------------- model versions


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
    return session.scalar(
        select(ModelVersion.ref)
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
    row.activated_at = utcnow()
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


# ---------------------------------------------------------------------------------- predictions


def upsert_prediction(
    session: Session,
    *,
    image_id: str,
    model_version_id: int,
    grade: int | None,
    probabilities: Sequence[float] | None,
    members: dict[str, Any] | None,
    referable: bool,
    gradable: bool = True,
) -> Prediction:
    """Idempotent on (image, model version): a redelivered task overwrites with the same values."""
    values = {
        "grade": grade,
        "probabilities": [float(p) for p in probabilities] if probabilities is not None else None,
        "members": members,
        "referable": referable,
        "gradable": gradable,
    }
    stmt = _insert(session, Prediction).values(
        image_id=image_id, model_version_id=model_version_id, created_at=utcnow(), **values
    )
    stmt = stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_=values)
    session.execute(stmt)
    row = session.scalars(
        select(Prediction)
        .where(Prediction.image_id == image_id, Prediction.model_version_id == model_version_id)
        .execution_options(populate_existing=True)
    ).one()
    return row


def get_prediction(session: Session, image_id: str, model_version_id: int | None = None) -> Prediction | None:
    """The prediction for ``image_id`` by that model version (default: the newest one)."""
    stmt = select(Prediction).where(Prediction.image_id == image_id)
    if model_version_id is not None:
        stmt = stmt.where(Prediction.model_version_id == model_version_id)
    return session.scalars(stmt.order_by(Prediction.id.desc()).limit(1)).first()


def predictions_for_images(
    session: Session, image_ids: Sequence[str], model_version_id: int | None = None
) -> dict[str, Prediction]:
    """image id -> its prediction (that model version, or the newest)."""
    if not image_ids:
        return {}
    stmt = select(Prediction).where(Prediction.image_id.in_(list(image_ids)))
    if model_version_id is not None:
        stmt = stmt.where(Prediction.model_version_id == model_version_id)
    out: dict[str, Prediction] = {}
    for row in session.scalars(stmt.order_by(Prediction.id)):
        out[row.image_id] = row  # later (newer) rows win
    return out


# --------------------------------------------------------------------------------- explanations


def upsert_explanation(
    session: Session, *, image_id: str, model_version_id: int, sha256: str, stored_path: str
) -> Explanation:
    values = {"sha256": sha256, "stored_path": stored_path}
    stmt = _insert(session, Explanation).values(
        image_id=image_id, model_version_id=model_version_id, created_at=utcnow(), **values
    )
    session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_=values))
    return session.scalars(
        select(Explanation)
        .where(Explanation.image_id == image_id, Explanation.model_version_id == model_version_id)
        .execution_options(populate_existing=True)
    ).one()


def get_explanation(
    session: Session, image_id: str, model_version_id: int | None = None
) -> Explanation | None:
    stmt = select(Explanation).where(Explanation.image_id == image_id)
    if model_version_id is not None:
        stmt = stmt.where(Explanation.model_version_id == model_version_id)
    return session.scalars(stmt.order_by(Explanation.id.desc()).limit(1)).first()


# ------------------------------------------------------------------------- eye/patient results


def record_patient_result(
    session: Session,
    patient_id: int,
    aggregate: PatientAggregate,
    *,
    model_version_id: int | None,
    trigger: str | None = None,
) -> PatientResult:
    """Store a new current result (one row per eye too); earlier rows stay as history."""
    session.execute(
        update(PatientResult)
        .where(PatientResult.patient_id == patient_id, PatientResult.is_current.is_(True))
        .values(is_current=False)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(EyeResult)
        .where(EyeResult.patient_id == patient_id, EyeResult.is_current.is_(True))
        .values(is_current=False)
        .execution_options(synchronize_session="fetch")
    )
    now = utcnow()
    result = PatientResult(
        patient_id=patient_id,
        model_version_id=model_version_id,
        grade=aggregate.grade,
        gradable=aggregate.gradable,
        referable=aggregate.referable,
        trigger=trigger,
        is_current=True,
        computed_at=now,
    )
    for eye in aggregate.eyes.values():
        result.eyes.append(
            EyeResult(
                patient_id=patient_id,
                eye=eye.eye,
                model_version_id=model_version_id,
                grade=eye.grade,
                gradable=eye.gradable,
                referable=eye.referable,
                probabilities=eye.probabilities,
                image_ids=list(eye.image_ids),
                is_current=True,
                computed_at=now,
            )
        )
    session.add(result)
    session.flush()
    return result


def latest_visit(images: Sequence[Image], window: timedelta) -> list[Image]:
    """The images of the patient's latest screening visit: uploaded within ``window`` of the
    newest one (all of them with a zero window). Upload time stands in for the visit's date,
    which clinic software does not send; a photograph a folder job sends again keeps its first
    upload's (``Image.sent_at`` is the purge's clock, not the visit's): a clinic's export that
    holds every past visit would otherwise pool them all into today's."""
    if not images or window <= timedelta(0):
        return list(images)
    newest = max(im.created_at for im in images)
    return [im for im in images if im.created_at >= newest - window]


def same_photograph_both_eyes(photos: Iterable[tuple[str, str]]) -> set[str]:
    """The sha256 of every photograph given, as (sha256, eye), under both eyes: one eye sent as
    both, and nothing says which. A bundle doing it is refused; elsewhere neither eye counts it."""
    eyes_of: dict[str, set[str]] = {}
    for sha256, eye in photos:
        eyes_of.setdefault(sha256, set()).add(eye)
    return {sha for sha, eyes in eyes_of.items() if len(eyes) > 1}


def recompute_patient(
    session: Session,
    patient_id: int,
    *,
    model_version_id: int,
    grade_fn: GradeFn,
    trigger: str | None = None,
    visit_window: timedelta | None = None,
    eye_grade_fn: EyeGradeFn | None = None,
) -> PatientResult:
    """Apply the contract's rule to the finished images of the patient's latest visit
    (``latest_visit``; ``visit_window`` default ``DRSCREEN_VISIT_WINDOW_HOURS``) scored by that
    model version, and record the result; earlier visits' results stay in the history. Images not
    done yet, failed, or without a prediction count as ungradable."""
    aggregate = patient_aggregate(
        session,
        patient_id,
        model_version_id=model_version_id,
        grade_fn=grade_fn,
        visit_window=visit_window,
        eye_grade_fn=eye_grade_fn,
    )
    return record_patient_result(
        session, patient_id, aggregate, model_version_id=model_version_id, trigger=trigger
    )


def patient_aggregate(
    session: Session,
    patient_id: int,
    *,
    model_version_id: int,
    grade_fn: GradeFn,
    visit_window: timedelta | None = None,
    eye_grade_fn: EyeGradeFn | None = None,
) -> PatientAggregate:
    """What :func:`recompute_patient` would record, without recording it."""
    if visit_window is None:
        visit_window = get_settings().visit_window
    images = latest_visit(list_patient_images(session, patient_id), visit_window)
    preds = predictions_for_images(session, [im.id for im in images], model_version_id)
    scores = []
    counted: set[tuple[str, str]] = set()
    both_eyes = same_photograph_both_eyes((im.sha256, im.eye) for im in images)
    for im in images:
        pred = preds.get(im.id)
        graded = im.status == "done" and bool(im.gradable) and pred is not None and pred.gradable
        # One photograph sent as the left and the right eye shows one eye, and nothing says which:
        # graded for both, the other eye was never screened and read "no referral". It is pooled
        # into neither eye; its own grade still refers both (it is referable, whichever eye it is).
        usable = graded and im.sha256 not in both_eyes
        if usable:
            # The same bytes sent twice for one eye (a retry without Idempotency-Key) are one
            # photograph: counted twice they would outweigh the eye's other photographs.
            if (im.eye, im.sha256) in counted:
                continue
            counted.add((im.eye, im.sha256))
        scores.append(
            ImageScore(
                image_id=im.id,
                eye=im.eye,
                gradable=usable,
                probabilities=pred.probabilities if (usable and pred is not None) else None,
                members=pred.members if (usable and pred is not None) else None,
                grade=pred.grade if (graded and pred is not None) else None,
            )
        )
    return aggregate_patient(scores, grade_fn, eye_grade_fn=eye_grade_fn)


def get_current_patient_result(session: Session, patient_id: int) -> PatientResult | None:
    return session.scalars(
        select(PatientResult)
        .where(PatientResult.patient_id == patient_id)
        .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
        .limit(1)
    ).first()


def patient_history(session: Session, patient_id: int, limit: int | None = 100) -> list[PatientResult]:
    """Results newest first (the current one included); ``limit=None``: all of them."""
    return list(
        session.scalars(
            select(PatientResult)
            .where(PatientResult.patient_id == patient_id)
            .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
            .limit(limit)
        )
    )


def iter_patient_history(session: Session, patient_id: int, batch: int = 50) -> Iterator[PatientResult]:
    """Results newest first, read ``batch`` at a time with their eyes: a reader that stops at the
    first it wants reads no further (a patient with hundreds of results, folder-job chunks and
    re-grades each adding one, was read whole with every eye for one earlier visit's page)."""
    stmt = (
        select(PatientResult)
        .where(PatientResult.patient_id == patient_id)
        .order_by(PatientResult.computed_at.desc(), PatientResult.id.desc())
        .options(selectinload(PatientResult.eyes))
        .execution_options(yield_per=batch)
    )
    results = session.scalars(stmt)
    try:
        yield from results
    finally:
        results.close()  # stopped early: the cursor is let go


# -------------------------------------------------------------------------------------- bundles


def create_bundle(session: Session, clinic_id: int, patient_id: int) -> Bundle:
    row = Bundle(clinic_id=clinic_id, patient_id=patient_id, status="queued")
    session.add(row)
    session.flush()
    return row


def get_bundle(session: Session, bundle_id: str, clinic_id: int | None = None) -> Bundle | None:
    row = session.get(Bundle, bundle_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


def bundle_images(session: Session, bundle_id: str) -> list[Image]:
    return list(
        session.scalars(
            select(Image).where(Image.bundle_id == bundle_id).order_by(Image.eye, Image.created_at)
        )
    )


def combined_status(statuses: Iterable[str]) -> str:
    """Status of a group of images: running while any is unfinished, failed when all failed."""
    statuses = list(statuses)
    if not statuses:
        return "queued"
    if all(s == "queued" for s in statuses):
        return "queued"
    if any(s in ("queued", "running") for s in statuses):
        return "running"
    if all(s == "failed" for s in statuses):
        return "failed"
    return "done"


def refresh_bundle_status(session: Session, bundle_id: str) -> Bundle:
    bundle = session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFound("bundle not found")
    bundle.status = combined_status(im.status for im in bundle_images(session, bundle_id))
    session.flush()
    return bundle


# ----------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobItemSpec:
    path: str
    patient_external_id: str | None
    eye: str | None


def create_job(session: Session, clinic_id: int, folder: str, explain: bool = False) -> ScoringJob:
    row = ScoringJob(clinic_id=clinic_id, folder=folder, status="queued", explain=explain)
    session.add(row)
    session.flush()
    return row


def get_job(session: Session, job_id: str, clinic_id: int | None = None) -> ScoringJob | None:
    row = session.get(ScoringJob, job_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


#: Rows per multi-row INSERT: one statement binds 7 values a row, and SQLite allows 32,766 bound
#: values (a folder of 4,681 files failed with "too many SQL variables"), PostgreSQL 65,535.
INSERT_BATCH_ROWS = 1000


def add_job_items(session: Session, job_id: str, items: Iterable[JobItemSpec]) -> int:
    """Insert items (idempotent on (job, path): re-expanding a folder adds nothing twice)."""
    rows = [
        {
            "job_id": job_id,
            "path": it.path,
            "patient_external_id": it.patient_external_id,
            "eye": it.eye,
            "status": "pending",
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        for it in items
    ]
    for start in range(0, len(rows), INSERT_BATCH_ROWS):
        stmt = _insert(session, ScoringJobItem).values(rows[start : start + INSERT_BATCH_ROWS])
        session.execute(stmt.on_conflict_do_nothing(index_elements=["job_id", "path"]))
    session.flush()
    return len(rows)


def job_items(session: Session, job_id: str, status: str | None = None) -> list[ScoringJobItem]:
    stmt = select(ScoringJobItem).where(ScoringJobItem.job_id == job_id).order_by(ScoringJobItem.id)
    if status is not None:
        stmt = stmt.where(ScoringJobItem.status == status)
    return list(session.scalars(stmt))


def set_job_item(
    session: Session,
    item: ScoringJobItem,
    *,
    status: str,
    image_id: str | None = None,
    error: str | None = None,
) -> ScoringJobItem:
    item.status = status
    if image_id is not None:
        item.image_id = image_id
    item.error = error[:4000] if error else None
    session.flush()
    return item


def job_failures(session: Session, job_id: str, limit: int = 20) -> list[tuple[str, str]]:
    """The first ``limit`` failed files of a job with why, as (path, reason): the file's own
    refusal, else its photograph's scoring failure (the jobs page said only "3 failed")."""
    rows = session.execute(
        select(ScoringJobItem.path, ScoringJobItem.error, Image.error)
        .outerjoin(Image, Image.id == ScoringJobItem.image_id)
        .where(
            ScoringJobItem.job_id == job_id,
            (ScoringJobItem.status == "failed") | (Image.status == "failed"),
        )
        .order_by(ScoringJobItem.id)
        .limit(limit)
    ).all()
    return [(path, item_error or image_error or "failed") for path, item_error, image_error in rows]


def refresh_job_counts(session: Session, job_id: str) -> ScoringJob:
    """Recount total/done/failed from the items and their images; finish the job when all are."""
    job = session.get(ScoringJob, job_id)
    if job is None:
        raise NotFound("job not found")
    rows = session.execute(
        select(ScoringJobItem.status, Image.status)
        .outerjoin(Image, Image.id == ScoringJobItem.image_id)
        .where(ScoringJobItem.job_id == job_id)
    ).all()
    total = len(rows)
    failed = sum(1 for item_status, img_status in rows if item_status == "failed" or img_status == "failed")
    job_open = job.status in OPEN_JOB_STATES
    done = sum(
        1 for item_status, img_status in rows if _item_graded(item_status, img_status, job_open=job_open)
    )
    job.total, job.done, job.failed = total, done, failed
    if job_open and total and done + failed >= total:
        job.status = "done"
        job.finished_at = utcnow()
    elif job.status == "queued" and total:
        job.status = "running"
    session.flush()
    return job


def _item_graded(item_status: str | None, image_status: str | None, *, job_open: bool) -> bool:
    """Whether a job item counts as done. While the job is open, once its image is done: a job
    finishes when every photograph is graded (a photograph a newer release grades again is not,
    until it is). Once finished, also when the item is done: its photograph is being graded again
    by a newer release, its earlier grade stands until then, and the job's counts keep adding up to
    its ``done``. A failure on either side wins."""
    if item_status == "failed" or image_status == "failed":
        return False
    return image_status == "done" or (not job_open and item_status == "done")


def job_grade_counts(session: Session, job_id: str) -> dict[str, int]:
    """Counts of the newest prediction's grade over the job's done items: keys "0".."4" and
    "ungradable"; they add up to the job's ``done`` (``refresh_job_counts``).

    Per item, not per image: two byte-identical files of a folder are one stored image but two
    items, and photographs first submitted by an earlier job are linked, not stored again."""
    job = session.get(ScoringJob, job_id)
    job_open = job is None or job.status in OPEN_JOB_STATES
    rows = session.execute(
        select(Image.id, ScoringJobItem.status, Image.status)
        .join(ScoringJobItem, ScoringJobItem.image_id == Image.id)
        .where(ScoringJobItem.job_id == job_id)
    ).all()
    item_images = [
        image_id
        for image_id, item_status, img_status in rows
        if _item_graded(item_status, img_status, job_open=job_open)
    ]
    counts = {str(g): 0 for g in range(5)} | {"ungradable": 0}
    preds = predictions_for_images(session, sorted(set(item_images)))
    for image_id in item_images:
        pred = preds.get(image_id)
        if pred is not None:
            counts["ungradable" if pred.grade is None else str(pred.grade)] += 1
    return counts


# ----------------------------------------------------------------------------------------- audit


def record_audit(
    session: Session,
    *,
    action: str,
    clinic_id: int | None = None,
    api_key_id: int | None = None,
    patient_id: int | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    row = AuditEvent(
        action=action,
        clinic_id=clinic_id,
        api_key_id=api_key_id,
        patient_id=patient_id,
        target_type=target_type,
        target_id=target_id,
        detail=detail,
        at=at or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def list_audit_events(session: Session, clinic_id: int, limit: int = 100) -> list[AuditEvent]:
    return list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.clinic_id == clinic_id)
            .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
            .limit(limit)
        )
    )


# ----------------------------------------------------------------------------- worker heartbeats


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


def count_failed_images_since(session: Session, since: datetime) -> int:
    """Photographs that ended ``failed`` since ``since`` (their row last changed then)."""
    return int(
        session.scalar(
            select(func.count()).select_from(Image).where(Image.status == "failed", Image.updated_at >= since)
        )
        or 0
    )


def count_clinics_with_keys(session: Session) -> int:
    """Clinics holding at least one API key that is not revoked."""
    return int(
        session.scalar(select(func.count(func.distinct(ApiKey.clinic_id))).where(ApiKey.revoked_at.is_(None)))
        or 0
    )


def count_open_jobs(session: Session) -> int:
    """Folder jobs still ``queued`` or ``running``."""
    return int(
        session.scalar(
            select(func.count()).select_from(ScoringJob).where(ScoringJob.status.in_(OPEN_JOB_STATES))
        )
        or 0
    )
