"""registry: repositories, blobs, manifests, tags; runtimes from the registry

Revision ID: 0008
Revises: 0004
Create Date: 2026-12-03 09:25:47.089037

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "registry_blobs",
        sa.Column("digest", sa.String(length=140), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_registry_blobs")),
    )
    op.create_table(
        "registry_repositories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_registry_repositories_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_repositories")),
        sa.UniqueConstraint("name", name=op.f("uq_registry_repositories_name")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("registry_repositories", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_registry_repositories_project_id"), ["project_id"], unique=False
        )

    op.create_table(
        "registry_blob_links",
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=140), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["digest"],
            ["registry_blobs.digest"],
            name=op.f("fk_registry_blob_links_digest_registry_blobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["registry_repositories.id"],
            name=op.f("fk_registry_blob_links_repository_id_registry_repositories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("repository_id", "digest", name=op.f("pk_registry_blob_links")),
    )
    with op.batch_alter_table("registry_blob_links", schema=None) as batch_op:
        batch_op.create_index("ix_registry_blob_links_digest", ["digest"], unique=False)

    op.create_table(
        "registry_manifests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=140), nullable=False),
        sa.Column("media_type", sa.String(length=255), nullable=False),
        sa.Column("artifact_type", sa.String(length=255), nullable=False),
        sa.Column("subject_digest", sa.String(length=140), nullable=True),
        sa.Column("annotations", sa.JSON(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["registry_repositories.id"],
            name=op.f("fk_registry_manifests_repository_id_registry_repositories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_manifests")),
        sa.UniqueConstraint("repository_id", "digest", name="uq_registry_manifests_repository_id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("registry_manifests", schema=None) as batch_op:
        batch_op.create_index("ix_registry_manifests_digest", ["digest"], unique=False)
        batch_op.create_index(
            "ix_registry_manifests_subject", ["repository_id", "subject_digest"], unique=False
        )

    op.create_table(
        "registry_manifest_refs",
        sa.Column("manifest_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=140), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["registry_manifests.id"],
            name=op.f("fk_registry_manifest_refs_manifest_id_registry_manifests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("manifest_id", "digest", name=op.f("pk_registry_manifest_refs")),
    )
    with op.batch_alter_table("registry_manifest_refs", schema=None) as batch_op:
        batch_op.create_index("ix_registry_manifest_refs_digest", ["digest"], unique=False)

    op.create_table(
        "registry_tags",
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("manifest_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"],
            ["registry_manifests.id"],
            name=op.f("fk_registry_tags_manifest_id_registry_manifests"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["registry_repositories.id"],
            name=op.f("fk_registry_tags_repository_id_registry_repositories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("repository_id", "name", name=op.f("pk_registry_tags")),
    )
    with op.batch_alter_table("registry_tags", schema=None) as batch_op:
        batch_op.create_index("ix_registry_tags_manifest_id", ["manifest_id"], unique=False)

    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_repository", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("image_digest", sa.String(length=140), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runtimes", schema=None) as batch_op:
        batch_op.drop_column("image_digest")
        batch_op.drop_column("image_repository")

    with op.batch_alter_table("registry_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_tags_manifest_id")

    op.drop_table("registry_tags")
    with op.batch_alter_table("registry_manifest_refs", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_manifest_refs_digest")

    op.drop_table("registry_manifest_refs")
    with op.batch_alter_table("registry_manifests", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_manifests_subject")
        batch_op.drop_index("ix_registry_manifests_digest")

    op.drop_table("registry_manifests")
    with op.batch_alter_table("registry_blob_links", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_blob_links_digest")

    op.drop_table("registry_blob_links")
    with op.batch_alter_table("registry_repositories", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registry_repositories_project_id"))

    op.drop_table("registry_repositories")
    op.drop_table("registry_blobs")
