"""explanation.scale: which colour scale a stored heatmap was drawn on

Revision ID: b2e5d8a1c3f7
Revises: 6a1d3f9b2c47
Create Date: 2026-12-07 19:00:00+00:00

Heatmaps were stretched to each photograph's own peak until session 30, when they came to share
one scale (``ml.inference.ensemble.HEATMAP_FULL_SCALE``) and the page's caption said so. The
heatmaps stored before stay NULL here: pages caption them as relative to their photograph, and the
API, serving one, asks for it again, drawn on the new scale by a worker of its release (a grade-0
eye's stretched red spot under a caption saying "little or no colour: nothing raised it much"
would mislead). Nullable, added in place, as
migration 6a1d3f9b2c47's column.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b2e5d8a1c3f7"
down_revision: str | None = "6a1d3f9b2c47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("explanation", sa.Column("scale", sa.Integer(), nullable=True))


def downgrade() -> None:
    # in place, not batch_alter_table's rebuild (see migration 6a1d3f9b2c47's downgrade)
    op.execute("ALTER TABLE explanation DROP COLUMN scale")
