"""Start-up refusals: the server will not run on an unmigrated database, and names the fix;
`kiln db upgrade` applies it. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect
from typer.testing import CliRunner

from kiln.app import create_app
from kiln.cli.main import app as cli
from kiln.db.engine import make_engine
from kiln.db.migrate import DatabaseNotMigrated, current_revision, head_revision
from kiln.settings import Settings
from tests.conftest import _postgres_database


@pytest.fixture
def empty_db_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """A database of the same kind as ``db_url``, but brand new: no tables at all."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        yield from _postgres_database()


def test_the_server_refuses_an_unmigrated_database_until_kiln_db_upgrade(
    empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(env="test", data_dir=tmp_path / "data", database_url=empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="run `kiln db upgrade`"):
            create_app(settings, engine)
        assert inspect(engine).get_table_names() == [], "the check must not create tables"

        monkeypatch.setenv("KILN_CONFIG_FILE", str(tmp_path / "absent.toml"))
        env = {"KILN_DATA_DIR": str(tmp_path / "data"), "KILN_DATABASE_URL": empty_db_url}
        for _ in range(2):  # and running it again changes nothing
            result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
            assert result.exit_code == 0, result.output
            assert "up to date" in result.output
        assert current_revision(engine) == head_revision()
        create_app(settings, engine)
    finally:
        engine.dispose()
