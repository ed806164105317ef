"""model_request_stats: per-minute calls, errors and a latency histogram per model deployment

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 18:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: kiln.db.model_stats_models.HISTOGRAM_SIZE at the time of this migration.
HISTOGRAM_SIZE = 37


def upgrade() -> None:
    op.create_table(
        "model_request_stats",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("minute", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("client_errors", sa.Integer(), nullable=False),
        sa.Column("server_errors", sa.Integer(), nullable=False),
        sa.Column("refusals", sa.Integer(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        *(sa.Column(f"h{i:02d}", sa.Integer(), nullable=False) for i in range(HISTOGRAM_SIZE)),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_model_request_stats_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "model_id", "deployment_id", "minute", name=op.f("pk_model_request_stats")
        ),
    )
    op.create_index(
        "ix_model_request_stats_minute", "model_request_stats", ["minute"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_model_request_stats_minute", table_name="model_request_stats")
    op.drop_table("model_request_stats")
