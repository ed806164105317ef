"""session proxy: redeemed hand-off tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 17:20:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "session_handoffs",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_session_handoffs")),
    )
    with op.batch_alter_table("session_handoffs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_session_handoffs_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("session_handoffs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_session_handoffs_expires_at"))
    op.drop_table("session_handoffs")
