"""model_metrics: what a model's code tracks with cml.metrics_v1, per prediction

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 18:40:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("prediction_uuid", sa.String(length=36), nullable=True),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("end_ms", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["model_deployments.id"],
            name=op.f("fk_model_metrics_deployment_id_model_deployments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_model_metrics_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_metrics")),
        sa.UniqueConstraint("prediction_uuid", name=op.f("uq_model_metrics_prediction_uuid")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("model_metrics", schema=None) as batch_op:
        batch_op.create_index(
            "ix_model_metrics_model_id_start_ms", ["model_id", "start_ms"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_model_metrics_start_ms"), ["start_ms"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_metrics", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_metrics_start_ms"))
        batch_op.drop_index("ix_model_metrics_model_id_start_ms")
    op.drop_table("model_metrics")
