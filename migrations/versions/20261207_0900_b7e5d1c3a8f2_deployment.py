"""deployment: which database this is (a random lineage) and its store's key fingerprint

Revision ID: b7e5d1c3a8f2
Revises: 6a1d3f9b2c47
Create Date: 2026-12-07 09:00:00+00:00

The restore ledger (core.ledger) records erasures and key revocations in the store folder; a
restore does them again. Its lines name the database they were made on by this lineage, so that
a restore never settles or replays another database's lines (a staging store, a fresh database),
and the store's key fingerprint lets an erasure on another machine's store be refused.
"""

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e5d1c3a8f2"
down_revision: str | None = "6a1d3f9b2c47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lineage", sa.String(length=32), nullable=False),
        sa.Column("store_key_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployment")),
    )
    op.bulk_insert(table, [{"id": 1, "lineage": uuid.uuid4().hex, "store_key_id": None}])


def downgrade() -> None:
    op.drop_table("deployment")
