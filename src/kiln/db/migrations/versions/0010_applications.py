"""applications: web apps on their own subdomain; site settings; session web UI ports

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 10:59:43.529291

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "site_settings",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_site_settings")),
    )
    op.create_table(
        "applications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("subdomain", sa.String(length=63), nullable=False),
        sa.Column("description", sa.String(length=2000), nullable=False),
        sa.Column("script", sa.String(length=1024), nullable=False),
        sa.Column("runtime_id", sa.Integer(), nullable=True),
        sa.Column("profile_id", sa.Integer(), nullable=True),
        sa.Column("cpu_millis", sa.Integer(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("desired", sa.String(length=16), nullable=False),
        sa.Column("workload_id", sa.String(length=32), nullable=True),
        sa.Column("next_workload_id", sa.String(length=32), nullable=True),
        sa.Column("crashes", sa.Integer(), nullable=False),
        sa.Column("restart_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_message", sa.String(length=1000), nullable=False),
        sa.Column("last_output", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["users.id"],
            name=op.f("fk_applications_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["next_workload_id"],
            ["workloads.id"],
            name=op.f("fk_applications_next_workload_id_workloads"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["profile_id"],
            ["resource_profiles.id"],
            name=op.f("fk_applications_profile_id_resource_profiles"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_applications_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["runtime_id"],
            ["runtimes.id"],
            name=op.f("fk_applications_runtime_id_runtimes"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["workload_id"],
            ["workloads.id"],
            name=op.f("fk_applications_workload_id_workloads"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_applications")),
        sa.UniqueConstraint("project_id", "name", name="uq_applications_project_id_name"),
        sa.UniqueConstraint("subdomain", name=op.f("uq_applications_subdomain")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("applications", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_applications_project_id"), ["project_id"], unique=False
        )

    with op.batch_alter_table("workloads", schema=None) as batch_op:
        # Existing sessions have no web UI ports.
        batch_op.add_column(
            sa.Column("ports", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("workloads", schema=None) as batch_op:
        batch_op.drop_column("ports")

    with op.batch_alter_table("applications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_applications_project_id"))

    op.drop_table("applications")
    op.drop_table("site_settings")
