"""image sent_at: when a photograph was last sent

Revision ID: 7d2e4c9a1b36
Revises: 5e0c2b7d9a41
Create Date: 2026-12-06 18:00:00+00:00

A folder job that sends a photograph again (same bytes, clinic, patient and eye) reuses its row;
the purge clock read created_at, so a patient could be purged the day after being screened
again. Existing rows start with sent_at = created_at (what was read until now).

Nullable on purpose (the code always writes it): NOT NULL would make Alembic rebuild the image
table on SQLite, and its DROP TABLE, with foreign keys on, cascades to every prediction and
heatmap row (found by the review before this landed).
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


def downgrade() -> None:
    # not batch_alter_table's drop_column: it rebuilds the table on SQLite (the cascade above);
    # SQLite 3.35+ drops a plain column in place, as PostgreSQL does
    op.execute("ALTER TABLE image DROP COLUMN sent_at")
