"""ORM tables (SQLAlchemy 2.0 style). Singular snake_case names, ``*_at`` timestamps, named constraints.

Public ids (image, bundle, scoring_job) are random 32-hex strings so clinics cannot enumerate them;
internal rows use integer keys. A patient's public id is its ``external_id`` within its clinic.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    and_,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

IMAGE_STATUSES = ("queued", "running", "done", "failed")
JOB_STATUSES = ("queued", "running", "done", "failed")
ITEM_STATUSES = ("pending", "queued", "done", "failed")
EYES = ("left", "right")
IDEMPOTENT_KINDS = ("image", "bundle")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A timestamp read back from the database, with its UTC offset: SQLite hands back naive
    datetimes, and every timestamp drscreen stores is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


#: ``Image.sample_key`` lies in [0, SAMPLE_KEYS).
SAMPLE_KEYS = 2**31


def new_sample_key() -> int:
    return secrets.randbelow(SAMPLE_KEYS)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


metadata = Base.metadata


class Clinic(Base):
    __tablename__ = "clinic"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_key"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    clinic: Mapped[Clinic] = relationship(lazy="joined")


class WebSession(Base):
    """A signed-in browser of the web interface. Its cookie holds a random token (only its sha256
    is kept), not the API key: signing out ends it here, it lapses when idle, and revoking the key
    ends every session of it (the security review: the cookie was the key itself)."""

    __tablename__ = "web_session"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_key.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("clinic_id", "external_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Bundle(Base):
    __tablename__ = "bundle"
    __table_args__ = (
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        # the home page's recent visits of a clinic, newest first (services/web/home.py); also the
        # clinic's index (the clinic's cascade), which it replaced (migration 29b2a1e6552c)
        Index("ix_bundle_clinic_id_created_at", "clinic_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"))
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ScoringJob(Base):
    __tablename__ = "scoring_job"
    __table_args__ = (CheckConstraint(_in("status", JOB_STATUSES), name="status"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"), index=True)
    folder: Mapped[str] = mapped_column(Text)
    # the job's "draw heatmaps" option, kept so that a re-sent expansion or re-queued photograph
    # (workers/sweep.py) honours it
    explain: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class Image(Base):
    __tablename__ = "image"
    __table_args__ = (
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        CheckConstraint(_in("eye", EYES), name="eye"),
        Index("ix_image_patient_id_eye", "patient_id", "eye"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    eye: Mapped[str] = mapped_column(String(8))
    bundle_id: Mapped[str | None] = mapped_column(ForeignKey("bundle.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("scoring_job.id", ondelete="SET NULL"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    # indexed: erasure and purge ask whether any other row still references a stored file
    stored_path: Mapped[str] = mapped_column(Text, index=True)
    filename: Mapped[str | None] = mapped_column(String(255))
    content_type: Mapped[str | None] = mapped_column(String(100))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    quality: Mapped[dict[str, Any] | None]
    gradable: Mapped[bool | None] = mapped_column(Boolean)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # indexed: the graders' figures of a period (core.grading_queue.in_period) and the store check's
    # oldest photographs (core.ledger._holds_named_files)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # when the photograph was last sent: its upload, or a folder job sending the same bytes again
    # (the row is reused, workers/folders.py). The purge clock reads this: a patient re-sent today
    # is not purged by the first upload's date. The visit stays created_at (when it was taken, as
    # near as we know): a clinic's export of every past visit must not pool them. Nullable in the
    # schema only (migration 7d2e4c9a1b36 says why); always written.
    sent_at: Mapped[datetime] = mapped_column(default=utcnow, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    # Celery node name of the worker that last claimed it (None outside Celery): lets the sweep
    # re-queue the claims of a worker that no longer answers a ping without waiting for staleness.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    finished_at: Mapped[datetime | None]
    # A secret random number: the graders' random sample is the photographs whose key is below a
    # threshold (core.grading_queue). Not the id, which pages show: a grader who knew the rule could
    # tell a sampled photograph from a referral by its id. Nullable in the schema only (rows of
    # before migration 6a1d3f9b2c47 got theirs from it); always written.
    sample_key: Mapped[int | None] = mapped_column(Integer, default=new_sample_key, nullable=True)


class ScoringJobItem(Base):
    __tablename__ = "scoring_job_item"
    __table_args__ = (
        UniqueConstraint("job_id", "path"),
        CheckConstraint(_in("status", ITEM_STATUSES), name="status"),
        # a job's items in their order (its pages, its failures); replaced the index on job_id alone
        Index("ix_scoring_job_item_job_id_id", "job_id", "id"),
        # the files naming a patient, job by job (an erasure or a purge: core.retention._items_of)
        Index("ix_scoring_job_item_patient_external_id_job_id", "patient_external_id", "job_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("scoring_job.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    patient_external_id: Mapped[str | None] = mapped_column(String(128))
    eye: Mapped[str | None] = mapped_column(String(8))
    image_id: Mapped[str | None] = mapped_column(ForeignKey("image.id", ondelete="SET NULL"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(String(200), unique=True)
    card: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # set by `drscreen model activate`: the most recent is the release every worker must serve
    activated_at: Mapped[datetime | None]


class Prediction(Base):
    __tablename__ = "prediction"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    grade: Mapped[int | None] = mapped_column(Integer)
    probabilities: Mapped[list[Any] | None]
    members: Mapped[dict[str, Any] | None]
    referable: Mapped[bool] = mapped_column(Boolean)
    gradable: Mapped[bool] = mapped_column(Boolean, default=True)
    # indexed: /metrics counts the gradings of the last hours (services.metrics.recent_counts)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class EyeResult(Base):
    __tablename__ = "eye_result"
    __table_args__ = (
        CheckConstraint(_in("eye", EYES), name="eye"),
        Index("ix_eye_result_patient_id_eye_computed_at", "patient_id", "eye", "computed_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_result_id: Mapped[int] = mapped_column(
        ForeignKey("patient_result.id", ondelete="CASCADE"), index=True
    )
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    eye: Mapped[str] = mapped_column(String(8))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    grade: Mapped[int | None] = mapped_column(Integer)
    gradable: Mapped[bool] = mapped_column(Boolean)
    referable: Mapped[bool] = mapped_column(Boolean)
    probabilities: Mapped[list[Any] | None]
    image_ids: Mapped[list[Any]]
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class PatientResult(Base):
    __tablename__ = "patient_result"
    # a patient's results in the order they were recorded (repository.RECORDED_NEWEST_FIRST; by
    # computed_at before migration d41c7a9e2f06)
    __table_args__ = (Index("ix_patient_result_patient_id_id", "patient_id", "id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id", ondelete="CASCADE"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    grade: Mapped[int | None] = mapped_column(Integer)
    gradable: Mapped[bool] = mapped_column(Boolean)
    referable: Mapped[bool] = mapped_column(Boolean)
    trigger: Mapped[str | None] = mapped_column(String(64))
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)

    eyes: Mapped[list[EyeResult]] = relationship(
        order_by=EyeResult.eye, cascade="all, delete-orphan", lazy="selectin"
    )


def refers_now() -> ColumnElement[bool]:
    """A patient's current result refers them: the home page's worklist (services/web/home.py) and
    the predicate of its partial index below. Written ``IS true`` as the queries write it: PostgreSQL
    uses a partial index only when it can prove the query's WHERE implies the index's, and it did
    not prove ``is_current AND referable`` from ``is_current IS true AND referable IS true`` (the
    scale review); SQLite compares the two expressions term by term (``IS 1`` there)."""
    return and_(PatientResult.is_current.is_(True), PatientResult.referable.is_(True))


# The patients to refer, newest first, read without the history (three results in four are not
# current): replaced the index on is_current alone (migration 29b2a1e6552c).
Index(
    "ix_patient_result_computed_at_refers_now",
    PatientResult.computed_at,
    postgresql_where=refers_now(),
    sqlite_where=refers_now(),
)


class Explanation(Base):
    __tablename__ = "explanation"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str] = mapped_column(Text, index=True)  # see Image.stored_path
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the colour scale it was drawn on (HEATMAP_SCALE); NULL: before heatmaps shared one scale
    scale: Mapped[int | None] = mapped_column(Integer)


#: The heatmaps' colour scale: 1 = one scale for every photograph (``HEATMAP_FULL_SCALE``, session
#: 30). A stored heatmap of another scale is drawn again before it is shown.
HEATMAP_SCALE = 1


class GraderGrade(Base):
    """A human grader's grade of one photograph, recorded by the clinic: the reference the model is
    compared against in production (``GET /v1/agreement``). One per photograph; recording it again
    replaces it (each change is in the audit log). ``grade`` is null when the grader found the
    photograph ungradable."""

    __tablename__ = "grader_grade"
    __table_args__ = (
        CheckConstraint("grade IS NULL OR (grade >= 0 AND grade <= 4)", name="grade"),
        CheckConstraint(
            "(grade IS NULL AND NOT gradable) OR (grade IS NOT NULL AND gradable)", name="gradable"
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"), unique=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"), index=True)
    grade: Mapped[int | None] = mapped_column(Integer)
    gradable: Mapped[bool] = mapped_column(Boolean)
    # who graded (a name or initials the clinic chooses): staff, never the patient
    grader: Mapped[str] = mapped_column(String(100))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_key.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # indexed: /metrics counts the grades recorded in the last 30 days (core.agreement.recent_counts)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)


class AuditEvent(Base):
    __tablename__ = "audit_event"
    __table_args__ = (
        Index("ix_audit_event_clinic_id_at", "clinic_id", "at"),
        # the few rows of one action among every request's (erasures, purges, replays: core.ledger,
        # core.retention), newest first
        Index("ix_audit_event_action_id", "action", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int | None] = mapped_column(ForeignKey("clinic.id", ondelete="SET NULL"))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_key.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patient.id", ondelete="SET NULL"), index=True)
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None]
    at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` of a POST that created work, with what it created (services/idempotency.py).

    The unique (clinic, key) pair is what makes two concurrent first attempts create one resource:
    the second INSERT fails (on PostgreSQL it first waits for the other transaction to end). The
    key itself is not kept, only the sha256 of ``kind:key``."""

    __tablename__ = "idempotency_key"
    __table_args__ = (
        UniqueConstraint("clinic_id", "key_hash"),
        CheckConstraint(_in("kind", IDEMPOTENT_KINDS), name="kind"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    clinic_id: Mapped[int] = mapped_column(ForeignKey("clinic.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64))
    # sha256 of the request's parts (services/idempotency.fingerprint): the same key with another
    # request is a conflict
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(32), index=True)  # erasure finds a photo's keys
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerHeartbeat(Base):
    """One row per Celery node name, written by that worker (workers/heartbeat.py): alive, what it
    serves, and the settings that must be alike across the deployment (``drscreen status`` and
    ``/metrics`` compare them, core/heartbeat.py). A worker restarted under its name reuses the row."""

    __tablename__ = "worker_heartbeat"
    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    seen_at: Mapped[datetime]
    # set on warm shutdown; a worker that died leaves it NULL and simply stops being seen
    stopped_at: Mapped[datetime | None]
    # seconds between its heartbeats: readers judge staleness by each worker's own interval
    interval_s: Mapped[float] = mapped_column(Float)
    release: Mapped[str | None] = mapped_column(String(200))
    # reported by a pool child once it has loaded the model (NULL until then): torch, onnx or
    # openvino, and on OpenVINO each member's precision
    runtime: Mapped[str | None] = mapped_column(String(32))
    precisions: Mapped[dict[str, Any] | None]
    concurrency: Mapped[int | None] = mapped_column(Integer)
    code_version: Mapped[str | None] = mapped_column(String(64))
    # values (never secrets) of the settings that must be alike, by name (core/heartbeat.py)
    settings: Mapped[dict[str, Any] | None]
