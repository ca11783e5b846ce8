"""image sent_at: when a photograph was last sent

Revision ID: 7d2e4c9a1b36
Revises: 5e0c2b7d9a41
Create Date: 2026-12-06 18:00:00+00:00

A folder job that sends a photograph again (same bytes, clinic, patient and eye) reuses its row;
the visit and the purge clock read created_at, so the re-sent photograph fell out of the latest
visit and its patient could be purged the day after being screened again. Existing rows start
with sent_at = created_at (what was read until now).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7d2e4c9a1b36"
down_revision: str | None = "5e0c2b7d9a41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE image SET sent_at = created_at")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.alter_column("sent_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_column("sent_at")
