"""The migrations produce exactly the schema the ORM models describe, on both databases."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text

from kiln.db.engine import make_engine
from kiln.db.migrate import DatabaseNotMigrated, check_migrated, upgrade
from kiln.db.models import Base


def test_models_and_migrations_agree(engine: Engine) -> None:
    check_migrated(engine)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models differ from the migrations: {diff}"


def test_a_database_from_a_newer_kiln_is_named_as_such(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'kiln.db'}")
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_future'"))
    with pytest.raises(DatabaseNotMigrated, match="newer Kiln"):
        check_migrated(engine)
