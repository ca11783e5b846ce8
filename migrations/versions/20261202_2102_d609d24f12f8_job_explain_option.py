"""job explain option

Revision ID: d609d24f12f8
Revises: 94695bce9b50
Create Date: 2026-12-02 21:02:50.516610+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d609d24f12f8"
down_revision: str | None = "94695bce9b50"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # existing jobs were created without heatmaps (the option was not stored): false
    with op.batch_alter_table("scoring_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("explain", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("scoring_job", schema=None) as batch_op:
        batch_op.drop_column("explain")
