"""web_session: signed-in browsers of the web interface

Revision ID: 9f3b6d2e8c14
Revises: 7d2e4c9a1b36
Create Date: 2026-12-06 24:00:00+00:00

The web interface's cookie held the clinic's API key itself: signing out only cleared the browser's
copy, and a copied cookie worked until an operator revoked the key. A session row per sign-in,
found by the sha256 of a random token, ends on sign-out, when idle, and with its key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9f3b6d2e8c14"
down_revision: str | None = "7d2e4c9a1b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "web_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_key.id"], name=op.f("fk_web_session_api_key_id_api_key"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_session")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_web_session_token_hash")),
    )
    op.create_index(op.f("ix_web_session_api_key_id"), "web_session", ["api_key_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_web_session_api_key_id"), table_name="web_session")
    op.drop_table("web_session")
