"""The migrations produce exactly the schema the ORM models describe, on both databases."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

from kiln.db.migrate import check_migrated
from kiln.db.models import Base


def test_models_and_migrations_agree(engine: Engine) -> None:
    check_migrated(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models differ from the migrations: {diff}"
