"""image.sample_key: a secret random number per photograph that draws the graders' sample

Revision ID: 6a1d3f9b2c47
Revises: 4c8a1e7f2b90
Create Date: 2026-12-07 07:00:00+00:00

The graders' random sample of photographs the service did not refer was drawn from the id, which
the pages show: knowing the rule, a grader could tell a sampled photograph from a referral. Each
photograph gets a random key instead (existing ones here, new ones when they are written).
Nullable for the reason of migration 7d2e4c9a1b36 (NOT NULL would rebuild the table on SQLite).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6a1d3f9b2c47"
down_revision: str | None = "4c8a1e7f2b90"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = 2**31


def upgrade() -> None:
    op.add_column("image", sa.Column("sample_key", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"UPDATE image SET sample_key = floor(random() * {KEYS})::integer")
    else:  # SQLite: random() is a signed 64-bit integer
        op.execute(f"UPDATE image SET sample_key = abs(random() % {KEYS})")


def downgrade() -> None:
    # not batch_alter_table's drop_column: it rebuilds the table on SQLite, and its DROP TABLE,
    # with foreign keys on, cascades to every prediction and heatmap (migration 7d2e4c9a1b36);
    # SQLite 3.35+ drops a plain column in place, as PostgreSQL does
    op.execute("ALTER TABLE image DROP COLUMN sample_key")
