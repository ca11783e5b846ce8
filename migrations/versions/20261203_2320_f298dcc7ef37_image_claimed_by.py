"""image claimed_by: the worker that claimed a running image

Revision ID: f298dcc7ef37
Revises: d609d24f12f8
Create Date: 2026-12-03 23:20:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f298dcc7ef37"
down_revision: str | None = "d609d24f12f8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # rows claimed before this column existed keep NULL: only the staleness rule re-queues them
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_column("claimed_by")
