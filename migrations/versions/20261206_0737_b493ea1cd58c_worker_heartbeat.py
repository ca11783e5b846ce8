"""worker_heartbeat: one row per worker node, alive and what it serves

Each worker writes its row at start and every DRSCREEN_HEARTBEAT_INTERVAL_S (workers/heartbeat.py):
`drscreen status` and /metrics list the live workers, their release and runtime, and compare the
settings that must be alike across the deployment. Nothing to copy: the rows appear as workers of
this code start. The downgrade drops the table (the workers' history goes with it).

Revision ID: b493ea1cd58c
Revises: a3c1f07d5e21
Create Date: 2026-12-06 07:37:27+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b493ea1cd58c"
down_revision: str | None = "a3c1f07d5e21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeat",
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("release", sa.String(length=200), nullable=True),
        sa.Column("runtime", sa.String(length=32), nullable=True),
        sa.Column("precisions", sa.JSON(), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("code_version", sa.String(length=64), nullable=True),
        sa.Column("settings", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("node", name=op.f("pk_worker_heartbeat")),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeat")
