"""grader_grade: human graders' grades of photographs, the reference for agreement in production

Revision ID: 4c8a1e7f2b90
Revises: 9f3b6d2e8c14
Create Date: 2026-12-07 06:00:00+00:00

A screening programme checks its automated grades against human graders (referred patients and a
sample of the others). One row per photograph, replaced when recorded again; deleted with the
photograph.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4c8a1e7f2b90"
down_revision: str | None = "9f3b6d2e8c14"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "grader_grade",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(length=32), nullable=False),
        sa.Column("clinic_id", sa.Integer(), nullable=False),
        sa.Column("grade", sa.Integer(), nullable=True),
        sa.Column("gradable", sa.Boolean(), nullable=False),
        sa.Column("grader", sa.String(length=100), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "grade IS NULL OR (grade >= 0 AND grade <= 4)", name=op.f("ck_grader_grade_grade")
        ),
        sa.CheckConstraint(
            "(grade IS NULL AND NOT gradable) OR (grade IS NOT NULL AND gradable)",
            name=op.f("ck_grader_grade_gradable"),
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_key.id"],
            name=op.f("fk_grader_grade_api_key_id_api_key"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["clinic_id"], ["clinic.id"], name=op.f("fk_grader_grade_clinic_id_clinic"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["image.id"], name=op.f("fk_grader_grade_image_id_image"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grader_grade")),
        sa.UniqueConstraint("image_id", name=op.f("uq_grader_grade_image_id")),
    )
    op.create_index(op.f("ix_grader_grade_clinic_id"), "grader_grade", ["clinic_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_grader_grade_clinic_id"), table_name="grader_grade")
    op.drop_table("grader_grade")
