"""job runs numbered per job (#1, #2, ... of each job), the global id kept for URLs

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-03 10:00:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_run_number", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("job_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("number", sa.Integer(), nullable=True))
    # Existing runs are numbered in the order they were created, per job; each job's counter
    # continues after its newest run. Plain correlated subqueries: SQLite and PostgreSQL alike.
    op.execute(
        "UPDATE job_runs SET number = (SELECT count(*) FROM job_runs AS earlier "
        "WHERE earlier.job_id = job_runs.job_id AND earlier.id <= job_runs.id)"
    )
    op.execute(
        "UPDATE jobs SET last_run_number = (SELECT coalesce(max(number), 0) FROM job_runs "
        "WHERE job_runs.job_id = jobs.id)"
    )
    # SQLite rebuilds the table for these two: keep its AUTOINCREMENT (ids are never reused).
    with op.batch_alter_table(
        "job_runs", schema=None, table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.alter_column("number", existing_type=sa.Integer(), nullable=False)
        batch_op.create_unique_constraint("uq_job_runs_job_id_number", ["job_id", "number"])


def downgrade() -> None:
    with op.batch_alter_table(
        "job_runs", schema=None, table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.drop_constraint("uq_job_runs_job_id_number", type_="unique")
        batch_op.drop_column("number")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("last_run_number")
