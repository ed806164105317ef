"""Schema migrations, run by ``kiln db upgrade`` and ``kiln up``."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is behind the code."""


def _config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    return _script_revisions()[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@functools.cache
def _script_revisions() -> tuple[str | None, frozenset[str]]:
    """The head and every revision this code knows (read once: the scripts are the code's)."""
    script = ScriptDirectory.from_config(_config())
    return script.get_current_head(), frozenset(rev.revision for rev in script.walk_revisions())


def check_migrated(engine: Engine) -> None:
    """Raise ``DatabaseNotMigrated`` naming the fix when the schema is not at head."""
    current = current_revision(engine)
    head, known = _script_revisions()
    if current is not None and current not in known:
        raise DatabaseNotMigrated(
            f"the database is at revision {current}, which this version of Kiln does not know: "
            "it was migrated by a newer Kiln; run that version (downgrades are not supported)"
        )
    if current != head:
        raise DatabaseNotMigrated(
            f"the database is at revision {current or 'none (empty)'} but Kiln needs {head}; "
            "run `kiln db upgrade` first"
        )
