"""model_version activated_at: the release the whole deployment serves

Revision ID: a3c1f07d5e21
Revises: c9e297887592
Create Date: 2026-12-06 05:00:00+00:00

`drscreen model activate name@version` stamps it; the active release is the most recently
activated one. Databases never activated keep NULL everywhere: workers then serve what their own
DRSCREEN_MODEL says, as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3c1f07d5e21"
down_revision: str | None = "c9e297887592"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("activated_at")
