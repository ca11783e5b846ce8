"""indexes for reads whose cost grew with the history (the scale review)

Revision ID: 29b2a1e6552c
Revises: b2e5d8a1c3f7
Create Date: 2026-12-08 09:00:00+00:00

A multi-year clinic volume (50,000 patients, 255,000 photographs, 263,000 gradings, 120,000
folder-job items, 1.2 M audit rows) found these reads scanning whole tables:

- ``scoring_job_item (job_id, id)``: a job's items in their order (its failures under a prepared
  statement's generic plan walked the primary key across every item). It replaces the index on
  ``job_id`` alone, which it serves too (and the job's cascade).
- ``scoring_job_item (patient_external_id, job_id)``: an erasure's or a purge's files naming the
  patients (core.retention._items_of, rewritten with it as two indexed lookups).
- ``prediction (created_at)``, ``grader_grade (updated_at)``: /metrics' windows of the last hours
  and days.
- ``image (created_at)``: the store check's oldest photographs (core.ledger), the graders' periods.
- ``bundle (clinic_id, created_at)``: the home page's recent visits; replaces ``bundle (clinic_id)``.
- ``patient_result (computed_at) WHERE is_current IS true AND referable IS true``: the home page's
  patients to refer, without the history. The predicate is written as the query writes it
  (``IS true``; ``IS 1`` on SQLite): PostgreSQL did not use the index with ``WHERE is_current AND
  referable``. It replaces the index on ``is_current`` alone, whose other readers are a patient's
  own rows (by ``ix_patient_result_patient_id_computed_at``) and `drscreen db recheck-patients`,
  which reads every current result (a quarter of the table).
- ``audit_event (action, id)``: the few erasure, purge and replay rows among every request's,
  newest first (core.ledger, core.retention, each worker's start).

Built with a plain ``CREATE INDEX`` inside the migrations' one transaction, not ``CONCURRENTLY``:
migrations/env.py runs every migration in one transaction holding an advisory lock (two
``db upgrade`` at once take turns), and Alembic's autocommit block, which ``CONCURRENTLY`` needs,
would commit that transaction and release the lock halfway; an interrupted concurrent build leaves
an invalid index behind, which a second run would have to find and drop. As earlier index migrations
(5e0c2b7d9a41), writes to these tables wait while their indexes are built, until the commit
(reads go on): all eight took 4.6 s on the review's volume, 3.1 s of them audit_event's, which is
built last since nearly every request writes it. The replaced indexes are dropped at the very end,
DROP INDEX locking its table against reads too. The wait grows with the tables (audit_event's
with its rows): on a much larger deployment, upgrade outside clinic hours.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "29b2a1e6552c"
down_revision: str | None = "b2e5d8a1c3f7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (name, table, columns, partial), audit_event's last (see the docstring).
INDEXES = (
    ("ix_scoring_job_item_job_id_id", "scoring_job_item", ["job_id", "id"], False),
    (
        "ix_scoring_job_item_patient_external_id_job_id",
        "scoring_job_item",
        ["patient_external_id", "job_id"],
        False,
    ),
    ("ix_grader_grade_updated_at", "grader_grade", ["updated_at"], False),
    ("ix_prediction_created_at", "prediction", ["created_at"], False),
    ("ix_image_created_at", "image", ["created_at"], False),
    ("ix_bundle_clinic_id_created_at", "bundle", ["clinic_id", "created_at"], False),
    ("ix_patient_result_computed_at_refers_now", "patient_result", ["computed_at"], True),
    ("ix_audit_event_action_id", "audit_event", ["action", "id"], False),
)
#: The indexes the new ones replace: (name, table, column).
REPLACED = (
    ("ix_scoring_job_item_job_id", "scoring_job_item", "job_id"),
    ("ix_bundle_clinic_id", "bundle", "clinic_id"),
    ("ix_patient_result_is_current", "patient_result", "is_current"),
)


def _refers_now() -> sa.ColumnElement[bool]:
    """The partial index's predicate, rendered by each database's dialect as the queries are:
    ``IS true`` on PostgreSQL, ``IS 1`` on SQLite (both match it against the query's WHERE)."""
    return sa.and_(sa.column("is_current").is_(True), sa.column("referable").is_(True))


def upgrade() -> None:
    for name, table, columns, partial in INDEXES:
        where = {"postgresql_where": _refers_now(), "sqlite_where": _refers_now()} if partial else {}
        op.create_index(name, table, columns, **where)
    for name, table, _ in REPLACED:  # last: DROP INDEX locks its table against reads until the commit
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, column in REPLACED:
        op.create_index(name, table, [column])
    for name, table, _, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
