"""idempotency_key: Idempotency-Key records in a table of their own, unique per clinic and key

The keys were rows of ``audit_event`` (action ``idempotency_key``) looked up before the work was
written, so two concurrent first attempts with one key both created their resource. The unique
(clinic_id, key_hash) constraint now lets only one of them commit.

Nothing is copied over: the old ``audit_event`` rows with action ``idempotency_key`` are simply
ignored from now on (they stay as audit history). A key was valid for 24 h, so at worst a client
retrying, across the upgrade, a POST made less than a day before gets a second resource instead of
the first one. The downgrade drops the table (keys remembered since are forgotten the same way).

Revision ID: c9e297887592
Revises: f298dcc7ef37
Create Date: 2026-12-06 04:26:33.995001+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c9e297887592"
down_revision: str | None = "f298dcc7ef37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clinic_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('image', 'bundle')", name=op.f("ck_idempotency_key_kind")),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinic.id"], name=op.f("fk_idempotency_key_clinic_id_clinic"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_key")),
        sa.UniqueConstraint("clinic_id", "key_hash", name=op.f("uq_idempotency_key_clinic_id_key_hash")),
    )


def downgrade() -> None:
    op.drop_table("idempotency_key")
