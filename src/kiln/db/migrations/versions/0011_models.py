"""models: models, their builds, deployments, replicas, and model API keys; builds.serving

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 13:32:06.133775

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("builds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("serving", sa.Boolean(), server_default=sa.false(), nullable=False)
        )

    op.create_table(
        "model_api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_model_api_keys_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_model_api_keys_key_hash")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("model_api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_api_keys_user_id"), ["user_id"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=2000), nullable=False),
        sa.Column("file", sa.String(length=1024), nullable=False),
        sa.Column("function", sa.String(length=200), nullable=False),
        sa.Column("base_image", sa.String(length=300), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("serving_mode", sa.String(length=16), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("access_key_hash", sa.String(length=64), nullable=False),
        sa.Column("access_key_prefix", sa.String(length=16), nullable=False),
        sa.Column("allow_unauthenticated", sa.Boolean(), nullable=False),
        sa.Column("serving_deployment_id", sa.Integer(), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("concurrency >= 1", name=op.f("ck_models_concurrency_positive")),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_models_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["resource_profiles.id"],
            name=op.f("fk_models_profile_id_resource_profiles"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_models_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("access_key_hash", name=op.f("uq_models_access_key_hash")),
        sa.UniqueConstraint("project_id", "name", name="uq_models_project_id_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "model_builds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.String(length=32), nullable=False),
        sa.Column("file", sa.String(length=1024), nullable=False),
        sa.Column("function", sa.String(length=200), nullable=False),
        sa.Column("comment", sa.String(length=500), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["build_id"],
            ["builds.workload_id"],
            name=op.f("fk_model_builds_build_id_builds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_model_builds_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_model_builds_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_builds")),
        sa.UniqueConstraint("model_id", "number", name="uq_model_builds_model_id_number"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("model_builds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_builds_build_id"), ["build_id"], unique=False)

    op.create_table(
        "model_deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("model_build_id", sa.Integer(), nullable=False),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("cpu_millis", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("gpu", sa.Integer(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("serving_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "replicas >= 0", name=op.f("ck_model_deployments_replicas_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_model_deployments_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_build_id"],
            ["model_builds.id"],
            name=op.f("fk_model_deployments_model_build_id_model_builds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_model_deployments_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["resource_profiles.id"],
            name=op.f("fk_model_deployments_profile_id_resource_profiles"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_deployments")),
        sa.UniqueConstraint("model_id", "number", name="uq_model_deployments_model_id_number"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("model_deployments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_deployments_model_build_id"), ["model_build_id"], unique=False
        )
        batch_op.create_index("ix_model_deployments_state", ["state"], unique=False)

    op.create_table(
        "model_replicas",
        sa.Column("workload_id", sa.String(length=32), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["model_deployments.id"],
            name=op.f("fk_model_replicas_deployment_id_model_deployments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.id"],
            name=op.f("fk_model_replicas_workload_id_workloads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("workload_id", name=op.f("pk_model_replicas")),
    )
    with op.batch_alter_table("model_replicas", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_replicas_deployment_id"), ["deployment_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("builds", schema=None) as batch_op:
        batch_op.drop_column("serving")

    with op.batch_alter_table("model_replicas", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_replicas_deployment_id"))

    op.drop_table("model_replicas")
    with op.batch_alter_table("model_deployments", schema=None) as batch_op:
        batch_op.drop_index("ix_model_deployments_state")
        batch_op.drop_index(batch_op.f("ix_model_deployments_model_build_id"))

    op.drop_table("model_deployments")
    with op.batch_alter_table("model_builds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_builds_build_id"))

    op.drop_table("model_builds")
    op.drop_table("models")
    with op.batch_alter_table("model_api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_api_keys_user_id"))

    op.drop_table("model_api_keys")
