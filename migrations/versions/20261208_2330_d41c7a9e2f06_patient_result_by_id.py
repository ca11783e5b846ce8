"""a patient's results by the order they were recorded (the time review)

Revision ID: d41c7a9e2f06
Revises: 29b2a1e6552c
Create Date: 2026-12-08 23:30:00+00:00

A patient's newest result was the one with the latest ``computed_at``, the recording worker's wall
clock: with a worker host whose clock was behind another's, or one that NTP stepped back, an older
"no referral" stayed the patient's result while the current one referred them. The reads now take
the results in the order they were recorded (by id), and ``patient_result (patient_id, id)``
answers them as ``(patient_id, computed_at)`` did before, which it replaces: ordered by id over
the old index, PostgreSQL without table statistics (after a restore) walked the primary key
backwards from the newest result of every patient to find one patient's.

Built inside the migrations' one transaction, like 29b2a1e6552c's indexes (see there): writes to
``patient_result`` wait while it is built (a second or two per million results).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "d41c7a9e2f06"
down_revision: str | None = "29b2a1e6552c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_patient_result_patient_id_id", "patient_result", ["patient_id", "id"])
    op.drop_index("ix_patient_result_patient_id_computed_at", table_name="patient_result")


def downgrade() -> None:
    op.create_index(
        "ix_patient_result_patient_id_computed_at", "patient_result", ["patient_id", "computed_at"]
    )
    op.drop_index("ix_patient_result_patient_id_id", table_name="patient_result")
