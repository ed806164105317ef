"""source-to-image builds and their dependency-layer cache

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("workload_id", sa.String(length=32), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("source_commit", sa.String(length=200), nullable=False),
        sa.Column("base_image", sa.String(length=300), nullable=False),
        sa.Column("no_cache", sa.Boolean(), nullable=False),
        sa.Column("command", sa.JSON(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=200), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("commit", sa.String(length=64), nullable=False),
        sa.Column("base_digest", sa.String(length=80), nullable=False),
        sa.Column("dependency_key", sa.String(length=80), nullable=False),
        sa.Column("dependencies_cached", sa.Boolean(), nullable=True),
        sa.Column("layers", sa.JSON(), nullable=False),
        sa.Column("repository", sa.String(length=300), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("image_digest", sa.String(length=80), nullable=False),
        sa.Column("config_digest", sa.String(length=80), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_builds_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.id"],
            name=op.f("fk_builds_workload_id_workloads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workload_id", name=op.f("pk_builds")),
        sa.UniqueConstraint("project_id", "number", name="uq_builds_project_id_number"),
    )
    with op.batch_alter_table("builds", schema=None) as batch_op:
        batch_op.create_index("ix_builds_claimed_by", ["claimed_by"], unique=False)
    op.create_table(
        "build_cache",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("layer", sa.JSON(), nullable=False),
        sa.Column("repository", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_build_cache_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", "key", name=op.f("pk_build_cache")),
    )


def downgrade() -> None:
    op.drop_table("build_cache")
    with op.batch_alter_table("builds", schema=None) as batch_op:
        batch_op.drop_index("ix_builds_claimed_by")
    op.drop_table("builds")
