"""First start: the data dir, the schema and the first site admin."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.migrate import upgrade
from kiln.db.models import User
from kiln.domain.identity import create_user
from kiln.settings import Settings
from kiln.storage.store import project_store


@dataclass
class SeededAdmin:
    username: str
    password: str | None  # set only when Kiln generated it (printed once, never stored)


def prepare_data_dir(settings: Settings) -> None:
    """The data dir (owner-only), and the projects in it ready: their filesystems mounted
    again after a reboot, what interrupted uploads left removed. Runs before any service."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    settings.projects_dir.mkdir(exist_ok=True)
    store = project_store(settings)
    store.cleanup_staging()
    if store.volumes is not None:
        store.volumes.mount_all()


def seed_admin(engine: Engine, settings: Settings) -> SeededAdmin | None:
    """Create the first site admin when the database has no users; None otherwise."""
    factory = make_sessionmaker(engine)
    with transaction(factory) as db:
        if db.scalar(select(func.count()).select_from(User)):
            return None
        generated = settings.admin_password is None
        password = settings.admin_password or secrets.token_urlsafe(12)
        create_user(db, settings.admin_username, password, site_admin=True)
    return SeededAdmin(settings.admin_username, password if generated else None)


def migrate(engine: Engine) -> None:
    upgrade(engine)
